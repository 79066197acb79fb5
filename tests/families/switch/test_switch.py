"""Switch Transformer: parity with HF goldens, encoder-decoder KV cache, padding, conversion.

The fixtures (tests/make_switch_fixtures.py) are tiny transformers checkpoints
with HF's logits and greedy generations. switch_e8_capacity's expert capacity
binds, so it matches HF under Routing.HF_CAPACITY and differs when dropless.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jaxmoe
from jaxmoe.errors import ConfigError, ConversionError
from jaxmoe.families.switch import layout, position
from jaxmoe.families.switch import model as switch
from jaxmoe.families.switch.api import SwitchModel
from jaxmoe.families.switch.config import Routing, SwitchConfig
from jaxmoe.io import checkpoint
from jaxmoe.io.convert import convert
from jaxmoe.nn import moe as moe_lib
from tests.helpers import FIXTURES

NAMES = ("switch_e4_tied", "switch_e8_capacity")
PARITY_ROUTING = {"switch_e4_tied": "dropless", "switch_e8_capacity": "hf_capacity"}


def max_abs(a, b) -> str:
  err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return f"max-abs {err.max():.3g}, relative {err.max() / max(np.abs(b).max(), 1e-30):.3g}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("switch")
  for name in NAMES:
    convert(FIXTURES / name, root / name, dtype="float32", progress=False)
  return {name: root / name for name in NAMES}


@pytest.fixture(scope="module")
def models(converted):
  """name -> the model under the routing its goldens need."""
  return {name: jaxmoe.load(path, routing=PARITY_ROUTING[name]) for name, path in converted.items()}


@pytest.fixture(scope="module")
def golden():
  return {name: dict(np.load(FIXTURES / name / "golden.npz")) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf(models, golden, name):
  ref = golden[name]
  got = models[name].logits(ref["enc_tokens"], ref["dec_tokens"], ref["enc_lengths"])
  assert isinstance(models[name], SwitchModel)
  assert got.dtype == np.float32 and got.shape == ref["logits"].shape
  np.testing.assert_allclose(got, ref["logits"], atol=1e-4, rtol=0, err_msg=max_abs(got, ref["logits"]))


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_hf(models, golden, name):
  ref = golden[name]
  got = models[name].generate(ref["enc_tokens"], 20, lengths=ref["enc_lengths"])
  assert ref["generated"].shape == (2, 21)  # 20 new tokens, no early EOS
  np.testing.assert_array_equal(got, ref["generated"])


def test_capacity_binds_in_the_capacity_fixture(models, golden):
  """Dropless routing differs from HF where HF drops tokens over expert_capacity."""
  model, ref = models["switch_e8_capacity"], golden["switch_e8_capacity"]
  dropless = SwitchModel(model.config.replace(routing=Routing.DROPLESS), model.params)
  got = dropless.logits(ref["enc_tokens"], ref["dec_tokens"], ref["enc_lengths"])
  assert np.abs(got - ref["logits"]).max() > 1e-2


def test_checkpoints_serve_dropless_and_load_gives_hf_capacity(converted):
  cfg, _ = checkpoint.load(converted["switch_e8_capacity"])
  assert cfg.routing is Routing.DROPLESS and cfg.architecture == "switch"  # what the engine runs
  assert jaxmoe.load(converted["switch_e8_capacity"]).config.routing is Routing.HF_CAPACITY
  with pytest.raises(ValueError, match="not a valid Routing"):
    jaxmoe.load(converted["switch_e4_tied"], routing="sometimes")


def test_kv_cache_decoding_equals_full_forward(models, golden):
  """Decoder tokens one at a time over the cache = the full pass (shapes shared with the parity tests)."""
  model, ref = models["switch_e4_tied"], golden["switch_e4_tied"]
  cfg, params = model.config, model.params
  enc = np.zeros((2, 16), np.int32)  # generate's prompt bucket
  enc[:, :13] = ref["enc_tokens"]
  enc_len, dec = jnp.asarray(ref["enc_lengths"], jnp.int32), ref["dec_tokens"]
  with model._precision():
    full = np.asarray(
      switch.forward(params, jnp.asarray(ref["enc_tokens"]), enc_len, jnp.asarray(dec), cfg, model.impl)
    )  # the impl as Model passes it: one compiled program
    enc_out = switch.encode(params, jnp.asarray(enc), enc_len, cfg, model.impl)
    # Pages of 4 positions, handed out out of order, so rows cross page boundaries through their tables.
    kv = switch.init_kv(cfg, 1 + 2 * (4 + 4), 4)
    pages = np.random.default_rng(0).permutation(np.arange(1, 17, dtype=np.int32))
    tables, cross = jnp.asarray(pages[:8].reshape(2, 4)), jnp.asarray(pages[8:].reshape(2, 4))
    assert dec[0, 0] == cfg.decoder_start_token_id
    logits, kv = switch.start(params, enc_out, enc_len, kv, tables, cross, cfg, model.impl)
    steps = [np.asarray(logits)]
    for t in range(1, dec.shape[1]):
      lengths = jnp.full((2,), t, jnp.int32)
      logits, kv = switch.decode_step(
        params, jnp.asarray(dec[:, t]), kv, tables, cross, lengths, enc_len, cfg, model.impl
      )
      steps.append(np.asarray(logits))
  decoded = np.stack(steps, axis=1)
  np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=0, err_msg=max_abs(decoded, full))
  want = ref["logits"]
  np.testing.assert_allclose(decoded, want, atol=1e-4, rtol=0, err_msg=max_abs(decoded, want))


def test_mixed_encoder_lengths_equal_each_alone(models, golden):
  """Rows of a right-padded batch are independent: of their padding, their neighbours, their order.

  Shapes are those of the parity tests (and the text test's single prompt), so nothing recompiles.
  """
  model, ref = models["switch_e4_tied"], golden["switch_e4_tied"]
  vocab, rng = model.config.vocab_size, np.random.default_rng(2)
  prompts = [rng.integers(3, vocab, size=n) for n in (3, 11, 13)]
  enc = np.zeros((2, 13), np.int64)
  for i, p in enumerate(prompts[:2]):
    enc[i, : len(p)] = p
  lengths, dec = np.array([3, 11]), ref["dec_tokens"]
  batch = model.generate(prompts[:2], 12, stop_at_eos=False)
  swapped = model.generate([prompts[2], prompts[0]], 12, stop_at_eos=False)  # row 0 moves, new neighbour
  np.testing.assert_array_equal(batch[0], swapped[1])
  np.testing.assert_array_equal(batch[0], model.generate([prompts[0]], 12, stop_at_eos=False)[0])  # alone
  logits = model.logits(enc, dec, lengths)
  other = model.logits(np.stack([prompts[2], enc[0]]), dec[::-1], np.array([13, 3]))
  np.testing.assert_allclose(logits[0], other[1], atol=1e-5, rtol=0, err_msg=max_abs(logits[0], other[1]))


def test_text_prompt_through_the_tokenizer(models):
  model = models["switch_e4_tied"]
  ids = model.encode("hello")
  assert ids == [ord(c) - 32 + 3 for c in "hello"]
  out = model.generate([ids], 5)
  assert out.shape[0] == 1 and out[0, 0] == model.config.decoder_start_token_id
  assert isinstance(model.decode(out[0, 1:]), str)


# The MoE boundary with ReLU experts and HF's capacity.
def relu_loop(x, logits, slot_map, pool, capacity=None, group=None):
  """Token-by-token numpy reference: top-1 softmax router, relu(x wi) wo, HF capacity per group."""
  x, logits = np.asarray(x, np.float64), np.asarray(logits, np.float64)
  out, seen = np.zeros_like(x), {}
  for t in range(x.shape[0]):
    probs = np.exp(logits[t] - logits[t].max())
    probs /= probs.sum()
    e = int(np.argmax(probs))
    key = (t // group if group else 0, e)
    seen[key] = seen.get(key, 0) + 1
    if capacity is not None and seen[key] > capacity:
      continue  # dropped: the MoE adds nothing, the residual passes the token through
    s = slot_map[t, e] if slot_map.ndim == 2 else slot_map[e]
    wi, wo = (np.asarray(pool[n][s], np.float64) for n in ("wi", "wo"))
    out[t] = probs[e] * (np.maximum(x[t] @ wi, 0) @ wo)
  return out


@pytest.mark.parametrize("capacity", [None, 2])
@pytest.mark.parametrize("impl", [moe_lib.Impl.DENSE, moe_lib.Impl.ROUTED, moe_lib.Impl.RAGGED])
def test_relu_moe_strategies_match_per_expert_loop(impl, capacity):
  rng = np.random.default_rng(4)
  t, d, f, e, s = 12, 16, 24, 4, 6
  x = rng.standard_normal((t, d)).astype(np.float32)
  logits = (3 * rng.standard_normal((t, e))).astype(np.float32)
  logits[:, 1] += 3.0  # crowd expert 1 so the capacity drops tokens
  pool = {
    "wi": (0.3 * rng.standard_normal((s, d, f))).astype(np.float32),
    "wo": (0.3 * rng.standard_normal((s, f, d))).astype(np.float32),
  }
  slot_map = rng.integers(0, s, size=(t, e)).astype(np.int32)
  spec = moe_lib.MoeSpec(top_k=1, router=moe_lib.Router.TOP1, impl=impl, capacity=capacity, group_size=6)
  got = jax.jit(lambda *a: moe_lib.moe(*a, spec))(x, logits, slot_map, pool)
  want = relu_loop(x, logits, slot_map, pool, capacity, group=6)
  if capacity is not None:
    assert np.sum(np.all(want == 0, axis=1)) >= 2  # some tokens were dropped
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4, err_msg=max_abs(got, want))


def test_pallas_refuses_relu_experts():
  pool = {"wi": np.zeros((2, 4, 8), np.float32), "wo": np.zeros((2, 8, 4), np.float32)}
  spec = moe_lib.MoeSpec(top_k=1, router=moe_lib.Router.TOP1, impl=moe_lib.Impl.PALLAS_INTERPRET)
  with pytest.raises(ValueError, match="SwiGLU experts only"):
    moe_lib.moe(np.zeros((3, 4), np.float32), np.zeros((3, 2), np.float32), np.arange(2), pool, spec)


def test_relative_buckets_known_values():
  """T5 buckets at the float32 boundaries where torch truncates 1.99999 down (num_buckets 17, max 27)."""
  cfg = SwitchConfig(
    vocab_size=8,
    hidden_size=8,
    intermediate_size=8,
    num_heads=1,
    head_dim=8,
    num_encoder_layers=1,
    num_decoder_layers=1,
    num_experts=2,
    encoder_sparse_step=1,
    decoder_sparse_step=1,
    relative_attention_num_buckets=17,
    relative_attention_max_distance=27,
  )
  rel = jnp.asarray([0, -1, -7, -8, -12, -18, -26, -27, -500, 3])
  # From transformers' _relative_position_bucket(bidirectional=False, num_buckets=17, max_distance=27).
  np.testing.assert_array_equal(
    np.asarray(position.relative_buckets(rel, cfg, False)), [0, 1, 7, 8, 10, 13, 16, 16, 16, 0]
  )


# Conversion.
def expected_params(t: dict[str, np.ndarray], cfg: SwitchConfig) -> dict:
  """The jaxmoe tree the HF tensors `t` must convert to, spelled out from the layout."""
  d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
  heads = lambda w: w.T.reshape(d, n, h)  # noqa: E731  [N*H, D] -> [D, N, H]
  out_proj = lambda w: w.T.reshape(n, h, d)  # noqa: E731  [D, N*H] -> [N, H, D]
  bb, experts = {}, []
  for stack, sparse in (("encoder", cfg.encoder_sparse), ("decoder", cfg.decoder_sparse)):
    layers, ff = [], 1 if stack == "encoder" else 2
    for i, is_sparse in enumerate(sparse):
      p = f"{stack}.block.{i}.layer."
      layer = {"attn_norm": t[p + "0.layer_norm.weight"]}
      layer.update({k: heads(t[p + f"0.SelfAttention.{k}.weight"]) for k in "qkv"})
      layer["o"] = out_proj(t[p + "0.SelfAttention.o.weight"])
      if stack == "decoder":
        layer["cross_norm"] = t[p + "1.layer_norm.weight"]
        layer.update({"c" + k: heads(t[p + f"1.EncDecAttention.{k}.weight"]) for k in "qkv"})
        layer["co"] = out_proj(t[p + "1.EncDecAttention.o.weight"])
      layer["mlp_norm"] = t[p + f"{ff}.layer_norm.weight"]
      if is_sparse:
        layer["router"] = t[p + f"{ff}.mlp.router.classifier.weight"].T
        experts.append(
          {
            w: np.stack([t[p + f"{ff}.mlp.experts.expert_{e}.{w}.weight"].T for e in range(cfg.num_experts)])
            for w in ("wi", "wo")
          }
        )
      else:
        layer.update({w: t[p + f"{ff}.mlp.{w}.weight"].T for w in ("wi", "wo")})
      layers.append(layer)
    period = layout.period(cfg, stack)  # block i is block_{i % period} of group i // period
    grouped = {
      f"block_{j}": {k: np.stack([layer[k] for layer in layers[j::period]]) for k in layers[j]} for j in range(period)
    }
    bb[stack] = {
      "rel_bias": t[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
      "layers": grouped,
      "norm": t[f"{stack}.final_layer_norm.weight"],
    }
    if not cfg.tie_word_embeddings:
      bb[stack]["embed"] = t[f"{stack}.embed_tokens.weight"]
  if cfg.tie_word_embeddings:
    bb["embed"] = t["shared.weight"]
  else:
    bb["lm_head"] = t["lm_head.weight"].T
  slot_map = np.arange(cfg.num_moe_layers * cfg.num_experts, dtype=np.int32).reshape(cfg.num_moe_layers, -1)
  pool = {w: np.concatenate([x[w] for x in experts]) for w in ("wi", "wo")}
  return {"backbone": bb, "experts": pool, "slot_map": slot_map}


@pytest.mark.parametrize("name", NAMES)
def test_conversion_round_trips_every_leaf(converted, name):
  cfg, params = checkpoint.load(converted[name])
  want = expected_params(load_file(str(FIXTURES / name / "model.safetensors")), cfg)
  got_flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  want_flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
  assert sorted(got_flat) == sorted(want_flat)
  for path, w in want_flat.items():
    assert got_flat[path].shape == w.shape and np.array_equal(got_flat[path], w), path
  header = json.loads((converted[name] / "jaxmoe.json").read_text())
  assert header["config"]["architecture"] == "switch"
  assert header["slots_per_layer"] == [cfg.num_experts] * cfg.num_moe_layers


def test_config_from_hf_mirrors_transformers():
  hf = json.loads((FIXTURES / "switch_e8_capacity" / "config.json").read_text())
  cfg = SwitchConfig.from_hf(hf)
  assert (cfg.encoder_sparse, cfg.decoder_sparse) == ((False, True, False, True), (False, True, False))
  assert cfg.moe_blocks == (("encoder", 1), ("encoder", 3), ("decoder", 1)) and cfg.num_moe_layers == 3
  del hf["encoder_sparse_step"], hf["decoder_sparse_step"]  # derived from num_sparse_*_layers as HF does
  assert SwitchConfig.from_hf(hf).encoder_sparse == cfg.encoder_sparse
  assert SwitchConfig.from_json(cfg.to_json()) == cfg


def _hf_copy(tmp_path, name="switch_e4_tied", config=None, tensors=None):
  src = tmp_path / "hf"
  shutil.copytree(FIXTURES / name, src)
  if config is not None:
    hf = json.loads((src / "config.json").read_text())
    config(hf)
    (src / "config.json").write_text(json.dumps(hf))
  if tensors is not None:
    t = load_file(str(src / "model.safetensors"))
    tensors(t)
    save_file(t, str(src / "model.safetensors"))
  return src


DEC1_FF = "decoder.block.1.layer.2"  # the second decoder block's feed-forward (sparse)
BAD = {
  "missing_key": (dict(config=lambda hf: hf.pop("d_kv")), ConfigError, r"missing required key 'd_kv'"),
  "gelu": (dict(config=lambda hf: hf.update(dense_act_fn="gelu")), ConfigError, r"dense_act_fn='gelu'"),
  "unknown_type": (dict(config=lambda hf: hf.update(model_type="t5")), ConfigError, r"model_type='t5'"),
  "missing_tensor": (
    dict(tensors=lambda t: t.pop(f"{DEC1_FF}.mlp.experts.expert_3.wo.weight")),
    ConversionError,
    r"missing tensor.*expert_3\.wo",
  ),
  "wrong_shape": (
    dict(tensors=lambda t: t.update({"encoder.final_layer_norm.weight": np.ones(5, "f4")})),
    ConversionError,
    r"'encoder.final_layer_norm.weight' has shape \(5,\)",
  ),
  "extra_tensor": (
    dict(tensors=lambda t: t.update({"encoder.block.9.x": np.ones(2, np.float32)})),
    ConversionError,
    r"unexpected tensor.*encoder.block.9.x",
  ),
  "more_experts": (dict(config=lambda hf: hf.update(num_experts=5)), ConversionError, r"missing tensor.*expert_4"),
  "untied_copy": (
    dict(tensors=lambda t: t.update({"lm_head.weight": t["shared.weight"] + 1})),
    ConversionError,
    r"'lm_head.weight' differs from 'shared.weight'",
  ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_raise_and_write_nothing(tmp_path, case):
  changes, error, pattern = BAD[case]
  src = _hf_copy(tmp_path, **changes)
  with pytest.raises(error, match=pattern):
    convert(src, tmp_path / "out", progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_equal_tied_copies_and_untied_fallback_convert(tmp_path, converted):
  src = _hf_copy(tmp_path, tensors=lambda t: t.update({"lm_head.weight": t["shared.weight"].copy()}))
  convert(src, tmp_path / "tied", progress=False)
  _, a = checkpoint.load(tmp_path / "tied")
  _, b = checkpoint.load(converted["switch_e4_tied"])
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # transformers 4 saved untied models with only shared.weight for the two stacks' embeddings.
  src = _hf_copy(
    tmp_path / "u",
    "switch_e8_capacity",
    tensors=lambda t: [t.pop(k) for k in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")],
  )
  convert(src, tmp_path / "untied", progress=False)
  _, params = checkpoint.load(tmp_path / "untied")
  shared = load_file(str(FIXTURES / "switch_e8_capacity" / "model.safetensors"))["shared.weight"]
  np.testing.assert_array_equal(params["backbone"]["encoder"]["embed"], shared)
