"""Cases that need 8 devices: run by test_mesh.py in a subprocess with forced host devices.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/mesh/mesh_cases.py

(jax fixes its device count when it starts, and the main test process may have
started it with one.) Not collected on its own: the name does not match test_*.py.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from jaxmoe.families.mixtral import config
from jaxmoe.families.switch.config import preset as switch_preset
from jaxmoe.nn import expert_parallel, moe_ops, sharding
from jaxmoe.nn import moe as moe_lib
from jaxmoe.serving import Engine, EngineConfig, Mode, placement
from jaxmoe.serving.synthetic import synthetic_store
from tests.helpers import max_abs

if jax.device_count() < 8:
  pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8", allow_module_level=True)


@pytest.fixture(scope="module")
def moe_inputs():
  rng = np.random.default_rng(0)
  t, d, f, x, e = 16, 32, 48, 12, 8
  pool = {
    n: (0.2 * rng.standard_normal(s)).astype(np.float32)
    for n, s in [("w1", (x, d, f)), ("w3", (x, d, f)), ("w2", (x, f, d))]
  }
  tokens = rng.standard_normal((t, d)).astype(np.float32)
  logits = rng.standard_normal((t, e)).astype(np.float32)
  maps = {
    "one map [E]": rng.permutation(x)[:e].astype(np.int32),
    "per-row maps [T, E]": rng.integers(0, x, (t, e)).astype(np.int32),
  }
  return pool, tokens, logits, maps


@functools.cache
def _moe_fn(impl):
  spec = moe_lib.MoeSpec(top_k=2, impl=impl)
  return jax.jit(lambda x, lg, sm, pool: moe_lib.moe(x, lg, sm, pool, spec))


def _place_pool(mesh, pool):
  """(round-robin placement, the pool placed as the engine places it: slots over expert, F over model)."""
  p = placement.round_robin(next(iter(pool.values())).shape[0], mesh.shape.get("expert", 1))
  slot_axis, feature_axis = sharding.mesh_axis("pool", mesh), sharding.mesh_axis("mlp", mesh)
  placed = {
    n: jax.device_put(
      p.rows(w, 0, len(p.order)), NamedSharding(mesh, expert_parallel.pool_spec(n, slot_axis, feature_axis))
    )
    for n, w in pool.items()
  }
  return p, placed


def _on_mesh(fn, mesh, pool, slot_map, *args):
  p, placed = _place_pool(mesh, pool)
  with jax.set_mesh(mesh):
    return np.asarray(fn(*args, p.remap(slot_map), placed))


@pytest.mark.parametrize(
  "spec,impl", [("data:2,expert:4", moe_lib.Impl.ROUTED), ("data:2,expert:4", moe_lib.Impl.DENSE)]
)
def test_expert_parallel_moe_equals_one_device(moe_inputs, spec, impl):
  """Routed: bit-identical. Dense: to 1 ulp-ish, because XLA contracts its running sum over the slots
  into fused multiply-adds, whose rounding depends on which slots a device holds."""
  pool, tokens, logits, maps = moe_inputs
  fn = _moe_fn(impl)
  if impl is moe_lib.Impl.DENSE:  # the reference strategy: one map kind is enough (it compiles slowly)
    maps = {k: v for k, v in maps.items() if v.ndim == 2}
  for name, slot_map in maps.items():
    want = np.asarray(fn(tokens, logits, slot_map, pool))  # compiled once per impl and map kind
    got = _on_mesh(fn, sharding.make_mesh(spec), pool, slot_map, tokens, logits)
    if impl is moe_lib.Impl.ROUTED:
      assert np.array_equal(got, want), (spec, name, max_abs(got, want))
    else:
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{spec} {name} {max_abs(got, want)}")


@pytest.mark.parametrize(
  "spec,impl",
  [
    ("model:4", moe_lib.Impl.ROUTED),
    ("expert:2,model:2", moe_lib.Impl.ROUTED),
    ("data:2,expert:2,model:2", moe_lib.Impl.ROUTED),
    ("expert:2,model:2", moe_lib.Impl.DENSE),
  ],
)
def test_experts_split_by_feature_over_model_equal_one_device(moe_inputs, spec, impl):
  """A model axis splits every expert by F (and an expert axis by slot): each device holds 1 / n of the pool,
  and the output equals one device's to float rounding (the sum over F is split)."""
  pool, tokens, logits, maps = moe_inputs
  fn = _moe_fn(impl)
  mesh = sharding.make_mesh(spec)
  devices = mesh.shape.get("expert", 1) * mesh.shape["model"]
  for n, w in _place_pool(mesh, pool)[1].items():
    assert {s.data.nbytes for s in w.addressable_shards} == {w.nbytes // devices}, n
  for name, slot_map in maps.items():
    want = np.asarray(fn(tokens, logits, slot_map, pool))
    got = _on_mesh(fn, mesh, pool, slot_map, tokens, logits)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, err_msg=f"{spec} {name} {max_abs(got, want)}")


@pytest.fixture(scope="module")
def store():
  return synthetic_store(config.preset("tiny"), k=3, seed=1, own_fraction=0.5, noise=0.05)


@pytest.fixture(scope="module")
def switch_store():
  return synthetic_store(switch_preset("tiny-switch"), k=3, seed=1, own_fraction=0.5, noise=0.05)


def _serve(store, mode, mesh, placement="round_robin"):
  """Two requests per tenant, short enough for one KV page each: every mode admits pairs (prefill [2, 8])
  and decodes [2] over one page, so each engine compiles two programs."""
  rng = np.random.default_rng(0)
  reqs = [
    {
      "id": f"r{i}",
      "model": store.tenants[i % 3],
      "prompt_ids": rng.integers(0, 250, 2 + i % 4).tolist(),
      "max_tokens": 3,
    }
    for i in range(6)
  ]
  engine = Engine(
    store, EngineConfig(mode=mode, max_batch=2, max_seq_len=16, page_size=8, mesh=mesh, placement=placement)
  )
  for r in reqs:
    engine.submit(r)
  out = {o["id"]: (o["token_ids"], o["error"]) for o in engine.run_until_done()}
  assert len(out) == len(reqs) and all(err is None for _, err in out.values()), out
  return out, engine


@pytest.fixture(scope="module")
def one_device(store):
  """The single-device engine's tokens (swap; tests/serving shows every mode gives the same tokens)."""
  return _serve(store, Mode.SWAP, "")[0]


@pytest.mark.parametrize(
  "mode,mesh,placement",
  [
    (Mode.SWAP, "expert:4", "round_robin"),
    (Mode.RESIDENT, "expert:4", "balanced"),  # other slot numbers, the same programs
    (Mode.MIXED, "data:2,expert:4", "round_robin"),
  ],
)
def test_engine_on_mesh_equals_one_device_token_for_token(store, one_device, mode, mesh, placement):
  got, engine = _serve(store, mode, mesh, placement)
  assert got == one_device, (mode, mesh)
  pool_bytes = sum(w.nbytes for w in store.pool.values())
  per_device = engine.mesh.bytes_per_device(engine.weights.pool)
  assert len(per_device) == (8 if mesh.startswith("data:2") else 4)
  for dev, held in per_device.items():  # 16 slots over expert:4: exactly a quarter each, no padding
    assert held == pool_bytes // 4, (dev, held, pool_bytes)
  engine.close()


@pytest.mark.parametrize("mesh", ["data:2,expert:4", "expert:2,model:2"])
def test_switch_engine_on_mesh_equals_one_device(switch_store, mesh):
  """The encoder-decoder family through the same MoE boundary: 24 slots, 3 per device (expert:4), or 12 per
  device, each by half its features, with attention and cross-attention split by head (expert:2,model:2)."""
  want = _serve(switch_store, Mode.MIXED, "")[0]
  got, engine = _serve(switch_store, Mode.MIXED, mesh)
  assert got == want
  pool_bytes = sum(w.nbytes for w in switch_store.pool.values())
  assert set(engine.mesh.bytes_per_device(engine.weights.pool).values()) == {pool_bytes // 4}


def test_a_store_read_from_its_files_is_placed_slot_by_slot(store, tmp_path):
  """A store loaded lazily (as jaxmoe-serve loads one on a mesh) is placed from its files without ever
  being read whole, each slot read once, and serves what the store loaded whole serves on one device."""
  from jaxmoe.consolidate.pipeline import ConsolidateConfig, consolidate
  from jaxmoe.io import checkpoint
  from jaxmoe.io.store import load_store

  pairs = []
  for name in store.tenants:
    checkpoint.save(tmp_path / name, store.config, store.export_params(name))
    pairs.append((name, tmp_path / name))
  consolidate(pairs, tmp_path / "store", ConsolidateConfig(share_fraction=0.5))
  want = _serve(load_store(tmp_path / "store"), Mode.MIXED, "")[0]
  lazy = load_store(tmp_path / "store", host_cache_gb=1e-3)
  got, engine = _serve(lazy, Mode.MIXED, "expert:4")
  assert got == want and lazy._pool is None
  summary = engine.summary()
  assert summary["pool_slots_read"] == summary["pool_slots_held"] == summary["pool_slots"] == lazy.host_pool.num_slots
  engine.close()


def _serve_paged(store, mesh, pages_per_device, mode=Mode.MIXED, **config):
  """Rows of very different lengths over 4-position pages, so few pages per device that admissions wait for
  them; greedy and seeded sampling, every tenant, mixed mode."""
  rng = np.random.default_rng(3)
  reqs = [
    {
      "id": f"p{i}",
      "model": store.tenants[i % len(store.tenants)],
      "prompt_ids": rng.integers(0, 250, 1 + (7 * i) % 13).tolist(),
      "max_tokens": 2 + (5 * i) % 11,
      **({"temperature": 0.9, "seed": i} if i % 3 == 0 else {}),
    }
    for i in range(10)
  ]
  probe = Engine(store, EngineConfig(max_batch=4, max_seq_len=32, page_size=4))
  gb = pages_per_device * probe.page_bytes / 1e9
  probe.close()
  engine = Engine(
    store, EngineConfig(mode=mode, max_batch=4, max_seq_len=32, page_size=4, kv_cache_gb=gb, mesh=mesh, **config)
  )
  for r in reqs:
    engine.submit(r)
  waited = False
  out = {}
  while engine.has_work:
    for o in engine.step():
      out[o["id"]] = (o["token_ids"], o["error"])
    waited |= engine.num_waiting > 0 and engine.free_rows > 0  # a free row, but no shard had the pages
  assert len(out) == len(reqs) and all(err is None for _, err in out.values()), out
  return out, engine, waited


@pytest.mark.parametrize("which", ["mixtral", "switch"])
def test_kv_pages_over_data_equal_one_device_and_split_the_cache(store, switch_store, which):
  """data:2: each device holds half the pages (its shard's block), rows take pages from their own shard, and
  every request's tokens equal the single-device engine's, also when pages run out and admissions wait."""
  s = store if which == "mixtral" else switch_store
  want, _, _ = _serve_paged(s, "", 9)
  got, engine, waited = _serve_paged(s, "data:2", 9)
  assert got == want
  assert waited  # 8 usable pages per shard: the workload's longer requests had to wait
  per_device = engine.mesh.bytes_per_device(engine.kv)
  total = sum(x.nbytes for x in jax.tree.leaves(engine.kv))
  assert len(per_device) == 2 and set(per_device.values()) == {total // 2}, per_device
  assert engine.pages.shards == 2 and engine.stats()["kv_pages"] == 2 * 8
  engine.close()


@pytest.fixture(scope="module")
def even_store():
  """A tiny Mixtral whose vocabulary (260) splits over 4 devices, so the LM head is split too."""
  import dataclasses

  return synthetic_store(dataclasses.replace(config.preset("tiny"), vocab_size=260), k=3, seed=2, own_fraction=0.5)


@pytest.mark.parametrize(
  "mode,mesh", [(Mode.MIXED, "expert:2,model:2"), (Mode.SWAP, "expert:2,model:2"), (Mode.MIXED, "data:2,model:2")]
)
def test_backbones_split_over_expert_and_model_equal_one_device(even_store, mode, mesh):
  """Attention (q, k, v by head, o by output feature), the LM head (by vocabulary) and the KV pages (by
  head) split over the devices of the expert and model axes: each holds its share, and the tokens are the
  single-device engine's, with sampling and rows waiting for pages (data:2)."""
  want, _, _ = _serve_paged(even_store, "", 9 if mesh.startswith("data") else 17)
  got, engine, _ = _serve_paged(even_store, mesh, 9 if mesh.startswith("data") else 17, mode)
  assert got == want, mesh
  split = 2 if mesh.startswith("data") else 4  # over model:2, or over expert:2 x model:2
  backbone = engine.weights.stacked["backbone"] if mode is Mode.MIXED else engine.weights.device_backbone
  kv_split = 2  # M = 2 key/value heads: over model:2, or over expert:2 only (4 does not divide them)
  for name, ways in (("q", split), ("k", kv_split), ("v", kv_split), ("o", split), ("lm_head", split)):
    leaf = backbone[name] if name == "lm_head" else backbone["layers"][name]
    assert {s.data.nbytes for s in leaf.addressable_shards} == {leaf.nbytes // ways}, name
  for pool in (engine.kv.k, engine.kv.v):  # by head, and by page over data
    shares = {s.data.nbytes for s in pool.addressable_shards}
    assert shares == {pool.nbytes // (kv_split * (2 if mesh.startswith("data") else 1))}, shares
  pool_bytes = sum(w.nbytes for w in even_store.pool.values())  # 16 slots by slot over expert, by F over model
  assert set(engine.mesh.bytes_per_device(engine.weights.pool).values()) == {pool_bytes // split}
  engine.close()


@pytest.mark.parametrize("mesh", ["expert:4", "expert:2,model:2", "expert:4,model:2"])
def test_forward_logits_on_a_mesh(even_store, mesh):
  """Backbones replicated (expert:4): the single-device logits bit for bit. Split (a model axis): to float
  rounding only, since no sum is divided between devices (a projection at another width may add its
  products in another order)."""
  from jaxmoe.families.mixtral import model
  from jaxmoe.serving.mesh import EngineMesh

  s, tenant = even_store, even_store.tenants[1]
  tokens = np.random.default_rng(4).integers(0, 256, (4, 12)).astype(np.int32)
  one = {"backbone": s.backbones[tenant], "experts": moe_ops.pack(s.pool), "slot_map": s.slot_maps[tenant]}
  want = np.asarray(model.forward(jax.device_put(one), tokens, s.config, moe_lib.Impl.ROUTED))
  m = EngineMesh(sharding.make_mesh(mesh))
  params = {
    "backbone": m.backbone(s.backbones[tenant]),
    "experts": m.pool(moe_ops.pack(s.pool), s.slot_maps),
    "slot_map": m.slot_map(np.asarray(s.slot_maps[tenant], np.int32)),
  }
  q = params["backbone"]["layers"]["q"]
  split = 1 if "model" not in mesh else 4  # N = 4 heads: one per device, or over expert:4 x model:2 4 of 8
  assert {x.data.nbytes for x in q.addressable_shards} == {q.nbytes // split}
  with m.context():
    got = np.asarray(m.gather(model.forward(params, m.batch(tokens), s.config, moe_lib.Impl.ROUTED)))
  if split == 1:
    assert np.array_equal(got, want), max_abs(got, want)
  else:
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5, err_msg=max_abs(got, want))


@pytest.mark.parametrize("mesh", ["expert:2", "data:2,expert:2,model:2"])
def test_expert_cache_on_a_mesh_equals_one_device(store, mesh):
  """An expert cache smaller than the pool, split like it: each expert shard caches the slots placed on it
  (5 per device, of 8 per shard), copies in misses and evicts within its block, and the tokens equal the
  single-device engine's (every expert on the device)."""
  want, _, _ = _serve_paged(store, "", 17)
  expert = sum(w[0].nbytes for w in store.pool.values())
  model = 2 if "model" in mesh else 1
  gb = 5 * expert / model / 1e9  # per device: 5 experts (of halves, on model:2: 5 slots' features)
  got, engine, _ = _serve_paged(store, mesh, 9 if mesh.startswith("data") else 17, expert_cache_gb=gb)
  assert got == want, mesh
  cache = engine.weights.cache
  assert cache.shards == 2 and cache.per_shard == 5 and engine.weights.pool is None
  for name, buf in cache.buffers.items():
    assert {s.data.nbytes for s in buf.addressable_shards} == {5 * buf[0].nbytes // model}, name
  stats = engine.stats()
  assert stats["expert_cache_misses"] > 0 and stats["expert_cache_hits"] > 0, stats
  engine.close()


def test_expert_cache_on_a_mesh_refuses_a_block_below_a_layers_need(store):
  """Each shard's block must hold one layer's worst case on that shard (4 of a layer's 8 slots)."""
  expert = sum(w[0].nbytes for w in store.pool.values())
  with pytest.raises(ValueError, match="on one expert shard"):
    Engine(store, EngineConfig(mode=Mode.MIXED, max_batch=4, mesh="expert:2", expert_cache_gb=3 * expert / 1e9))


@pytest.mark.parametrize("mesh", ["expert:2,model:2", "data:2,model:2"])
def test_pallas_paged_attention_per_head_shard_equals_the_reference(mesh):
  """The GPU path's kernel (interpret mode here) runs once per head shard under a shard_map over the heads
  axes; each row's output equals the jnp reference on one device."""
  from jaxmoe.nn import paged

  rng = np.random.default_rng(5)
  layers, m, g, h, q_size, b, pages_per_row = 2, 4, 16, 16, 4, 2, 6
  kv = paged.init(layers, 1 + b * pages_per_row, q_size, m, h, jax.numpy.float32)
  kv = kv.replace(
    k=jax.numpy.asarray(rng.standard_normal(kv.k.shape).astype(np.float32)),
    v=jax.numpy.asarray(rng.standard_normal(kv.v.shape).astype(np.float32)),
  )
  tables = rng.permutation(np.arange(1, 1 + b * pages_per_row, dtype=np.int32)).reshape(b, pages_per_row)
  lengths = np.array([24, 9], np.int32)
  q = jax.numpy.asarray(rng.standard_normal((b, 1, m, g, h)).astype(np.float32))
  mesh_ = sharding.make_mesh(mesh)
  split = sharding.fitting(mesh_, kv.k.shape, "heads")
  assert split.spec[0] is not None  # the heads are split on this mesh
  placed = kv.replace(k=jax.device_put(kv.k, split), v=jax.device_put(kv.v, split))
  run = jax.jit(functools.partial(paged.attention_pallas_per_head_shard, scale=h**-0.5, interpret=True))
  for layer in range(layers):
    want = paged.attention_reference(q, kv, layer, tables, (lengths - 1)[:, None], h**-0.5)
    with jax.set_mesh(mesh_):
      got = run(q, placed, layer, tables, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, err_msg=max_abs(got, want))


def test_pallas_per_head_shard_inside_the_data_shards_of_the_pages():
  """data:2,model:2: the pages split over data (each row's in its own shard) and the kernel per head shard
  nested inside the data shard_map, against the reference over the same pages."""
  from jaxmoe.nn import paged

  rng = np.random.default_rng(6)
  layers, m, g, h, q_size, length = 2, 4, 16, 16, 4, 20
  mesh = sharding.make_mesh("data:2,model:2")
  kv = paged.placed(paged.init(layers, 8, q_size, m, h, jax.numpy.float32), mesh, 2, by_head=True)
  tables = np.array([[1, 2, 3, 4, 5, 6, 7], [9, 10, 11, 12, 13, 14, 15]], np.int32)  # shard 0's, shard 1's
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (2, length))
  keys = rng.standard_normal((layers, 2, length, m, h)).astype(np.float32)
  values = rng.standard_normal((layers, 2, length, m, h)).astype(np.float32)
  q = jax.numpy.asarray(rng.standard_normal((2, 1, m, g, h)).astype(np.float32))
  lengths = np.array([20, 11], np.int32)
  pallas = lambda kv, layer, t, q, n: paged.attention_pallas_per_head_shard(q, kv, layer, t, n, h**-0.5, True)  # noqa: E731
  reference = lambda kv, layer, t, q, n: paged.attention_reference(q, kv, layer, t, (n - 1)[:, None], h**-0.5)  # noqa: E731
  with jax.set_mesh(mesh):
    for layer in range(layers):
      kv = jax.jit(paged.write)(kv, layer, tables, positions, jax.numpy.asarray(keys[layer]), values[layer])
    for layer in range(layers):
      got = jax.jit(lambda kv, q, layer: paged.per_row(pallas, kv, layer, tables, q, lengths))(kv, q, layer)
      want = jax.jit(lambda kv, q, layer: paged.per_row(reference, kv, layer, tables, q, lengths))(kv, q, layer)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, err_msg=max_abs(got, want))
      assert np.abs(np.asarray(want)).sum() > 0


def test_an_expert_budget_holding_a_devices_share_of_the_pool_needs_no_cache(store):
  """expert:2: a device holds 8 of the 16 slots, so a budget of 8 experts per device keeps the whole pool
  on the mesh (no cache, no stepped programs), as a budget of the whole pool does on one device."""
  expert = sum(w[0].nbytes for w in store.pool.values())
  engine = Engine(store, EngineConfig(mode=Mode.MIXED, max_batch=4, mesh="expert:2", expert_cache_gb=8 * expert / 1e9))
  assert engine.weights.cache is None
  pool_bytes = sum(w.nbytes for w in store.pool.values())
  assert set(engine.mesh.bytes_per_device(engine.weights.pool).values()) == {pool_bytes // 2}
  engine.close()
