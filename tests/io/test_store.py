"""Multi-tenant stores: writer, load_store, one device pool shared by every tenant's model."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jaxmoe
from jaxmoe.errors import StoreError
from jaxmoe.families.mixtral import config, layout
from jaxmoe.io import checkpoint
from jaxmoe.io.store import load_store, store_writer
from jaxmoe.trees import tree_bytes

CFG = config.preset("tiny")
NAMES = ("a", "b")


@pytest.fixture(scope="module")
def tenants():
  """Two tenants: same experts except layer 1 expert 2; different routers."""
  a = layout.init_params(CFG, seed=0)
  b = jax.tree.map(np.array, a)
  b["experts"]["w1"][1 * 4 + 2] += 0.01  # layer 1, expert 2
  b["backbone"]["layers"]["router"][0] += 0.01
  return {"a": a, "b": b}


def write_store(out, tenants):
  """Pool layer 0: the 4 shared experts; layer 1: a's 4 and b's own expert 2 in slot 3."""
  a, b = (layout.split_parts(CFG, tenants[n])[0] for n in NAMES)
  pool1 = {
    n: np.concatenate(
      [a["layer_0001"]["experts"][n][:3], b["layer_0001"]["experts"][n][2:3], a["layer_0001"]["experts"][n][3:]]
    )
    for n in ("w1", "w3", "w2")
  }
  maps = {"a": np.array([[0, 1, 2, 3], [0, 1, 2, 4]]), "b": np.array([[0, 1, 2, 3], [0, 1, 3, 4]])}
  with store_writer(out, CFG, list(NAMES)) as w:
    for name, parts in zip(NAMES, (a, b)):
      for part, tree in parts.items():
        w.write_backbone_part(name, part, tree if part == "globals" else tree["backbone"])
    w.write_pool_layer(0, a["layer_0000"]["experts"])
    w.write_pool_layer(1, pool1)
    return w.finish(maps, {"note": "hand-made"})


@pytest.fixture(scope="module")
def store(tmp_path_factory, tenants):
  out = tmp_path_factory.mktemp("store") / "s"
  write_store(out, tenants)
  return load_store(out)


def test_store_round_trip(store, tenants):
  assert store.tenants == list(NAMES) and store.config == CFG
  assert store.pool["w1"].shape[0] == 9
  assert store.metadata["note"] == "hand-made" and store.metadata["slots_per_layer"] == [4, 5]
  for name in NAMES:
    jax.tree.map(np.testing.assert_array_equal, store.export_params(name), tenants[name])
    assert store.slot_maps[name].dtype == np.int32 and store.slot_maps[name].shape == (2, 4)
  np.testing.assert_array_equal(store.slot_maps["b"], [[0, 1, 2, 3], [4, 5, 7, 8]])  # layer 1 starts at 4


def test_reported_bytes_are_the_stored_arrays(store):
  b = store.metadata["bytes"]
  assert b["pool"] == sum(x.nbytes for x in jax.tree.leaves(store.pool)) == 9 * b["expert"]
  for name in NAMES:
    assert b["backbones"][name] == sum(x.nbytes for x in jax.tree.leaves(store.backbones[name]))
  assert b["total"] == b["pool"] + sum(b["backbones"].values())
  assert b["full_copies"] == sum(b["backbones"].values()) + 2 * 8 * b["expert"]


def test_models_share_one_device_pool_and_generate(store, tenants):
  ma, mb = store.model("a"), store.model("b")
  for x, y in zip(jax.tree.leaves(ma.params["experts"]), jax.tree.leaves(mb.params["experts"])):
    assert x is y and isinstance(x, jax.Array)
  assert store.model("a") is ma
  tokens = np.array([[256, 72, 105, 33]])
  want = jaxmoe.MixtralModel(CFG, store.export_params("b")).logits(tokens)
  np.testing.assert_allclose(mb.logits(tokens), want, atol=1e-5, rtol=0)
  out = mb.generate(tokens, max_new_tokens=3)
  assert out.shape[0] == 1 and out.shape[1] <= 7 and (out[:, :4] == tokens).all()
  assert mb.tokenizer is not None  # tiny vocab: byte tokenizer
  with pytest.raises(ValueError, match="unknown tenant 'c'"):
    store.model("c")


def test_incomplete_or_bad_stores_are_refused(tmp_path, tenants):
  out = tmp_path / "s"
  with pytest.raises(StoreError, match="pool layers"), store_writer(out, CFG, ["a"]) as w:
    w.finish({"a": np.zeros((2, 4), np.int32)})
  assert not out.exists() and list(tmp_path.iterdir()) == []
  with pytest.raises(StoreError, match="not safe"), store_writer(out, CFG, ["../x"]):
    pass
  with pytest.raises(StoreError, match="store.json is missing"):
    load_store(tmp_path)
  write_store(out, tenants)
  header = json.loads((out / "store.json").read_text())
  header["kind"] = "something-else"
  (out / "store.json").write_text(json.dumps(header))
  with pytest.raises(StoreError, match="kind 'something-else'"):
    load_store(out)


def test_checkpoint_reader_reads_what_load_reads(tmp_path, tenants):
  checkpoint.save(tmp_path / "c", CFG, tenants["b"])
  _, params = checkpoint.load(tmp_path / "c")
  with checkpoint.reader(tmp_path / "c") as r:
    assert r.config == CFG and r.slots_per_layer == [4, 4]
    glob = r.read_part("globals")
    layer = r.read_part("layer_0001")
    for part in r.part_names():
      assert r.part_shapes(part) == r.expected_shapes(part)
  np.testing.assert_array_equal(glob["embed"], params["backbone"]["embed"])
  want = ({k: v[1] for k, v in params["backbone"]["layers"].items()}, {k: v[4:8] for k, v in params["experts"].items()})
  jax.tree.map(np.testing.assert_array_equal, (layer["backbone"], layer["experts"]), want)


def test_a_lazily_read_pool_serves_as_the_loaded_one_without_reading_it_all(store):
  from jaxmoe.serving import Engine, EngineConfig, Mode

  lazy = load_store(store.path, host_cache_gb=1e-4)  # 100 kB of host cache: a few experts
  assert lazy._pool is None and lazy.pool_bytes() == tree_bytes(store.pool)
  got = lazy.host_pool.read([0, 4, 8])
  for n in ("w1", "w3", "w2"):
    np.testing.assert_array_equal(np.stack(got[n]), store.pool[n][[0, 4, 8]])
  reqs = [
    {"id": f"r{i}", "model": NAMES[i % 2], "prompt_ids": [3, 1, 4, 1, 5][: i + 1], "max_tokens": 4} for i in range(4)
  ]

  def serve(s, gb):
    engine = Engine(s, EngineConfig(max_seq_len=16, page_size=4, max_batch=2, mode=Mode.MIXED, expert_cache_gb=gb))
    for r in reqs:
      engine.submit(r)
    return {o["id"]: o["token_ids"] for o in engine.run_until_done()}

  gb = 8 * lazy.host_pool.expert_bytes / 1e9  # 8 of 9 slots on the device
  assert serve(lazy, gb) == serve(store, None)
  assert lazy._pool is None  # served without the whole pool in host memory
  with pytest.raises(ValueError, match="host_cache_gb"):
    load_store(store.path, host_cache_gb=0)
