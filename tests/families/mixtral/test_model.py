"""Mixtral model: parity with HF goldens, KV cache, padding, layout, precision."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import trees
from jaxmoe.families.mixtral import MixtralModel, config, layout, model
from jaxmoe.nn.tenancy import MixedTenants
from tests.helpers import HF_FIXTURES, max_abs


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_logits_match_hf(models, golden, name):
  ref = golden[name]
  got = models[name].logits(ref["tokens"])
  assert got.dtype == np.float32 and got.shape == ref["logits"].shape
  np.testing.assert_allclose(got, ref["logits"], atol=1e-4, rtol=0, err_msg=max_abs(got, ref["logits"]))


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_greedy_generation_matches_hf(models, golden, name):
  ref = golden[name]["generated"]
  prompt = golden[name]["tokens"][:1]
  got = models[name].generate(prompt, max_new_tokens=ref.shape[1] - prompt.shape[1])
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", HF_FIXTURES)
def test_kv_cache_decoding_equals_full_forward(models, name):
  m = models[name]
  cfg = m.config
  rng = np.random.default_rng(1)
  seq = rng.integers(0, cfg.vocab_size, size=(2, 14)).astype(np.int32)
  full = np.asarray(model.forward(m.params, jnp.asarray(seq), cfg, m.impl))
  # Rows of different prompt lengths, pages of 4 positions handed out out of order: rows cross page
  # boundaries through their block tables, and decode attends over a growing slice of them.
  prompt_len = np.array([5, 2])
  kv = model.init_kv(cfg, 1 + 2 * 4, 4)
  tables = np.random.default_rng(1).permutation(np.arange(1, 9, dtype=np.int32)).reshape(2, 4)
  padded = np.zeros((2, 8), np.int32)
  for b in range(2):
    padded[b, : prompt_len[b]] = seq[b, : prompt_len[b]]
  lengths = jnp.asarray(prompt_len, jnp.int32)
  logits, kv = model.prefill(m.params, jnp.asarray(padded), lengths, kv, jnp.asarray(tables), cfg, m.impl)
  steps = [np.asarray(logits)]
  for step in range(seq.shape[1] - prompt_len.max()):
    pos = prompt_len + step
    width = -(-int(pos.max() + 1) // 4)
    logits, kv = model.decode_step(
      m.params,
      jnp.asarray(seq[np.arange(2), pos]),
      kv,
      jnp.asarray(tables[:, :width]),
      jnp.asarray(pos, jnp.int32),
      cfg,
      m.impl,
    )
    steps.append(np.asarray(logits))
  decoded = np.stack(steps, axis=1)  # row b: logits after positions prompt_len[b]-1, ...
  for b in range(2):
    want = full[b, prompt_len[b] - 1 : prompt_len[b] - 1 + decoded.shape[1]]
    np.testing.assert_allclose(decoded[b], want, atol=2e-5, rtol=0, err_msg=max_abs(decoded[b], want))


def test_mixed_prompt_lengths_equal_each_alone(models):
  m = models["mqa4x1_window"]
  rng = np.random.default_rng(2)
  prompts = [rng.integers(3, m.config.vocab_size, size=n) for n in (3, 11, 7)]
  batch = m.generate(prompts, 10, stop_at_eos=False)
  for i, p in enumerate(prompts):
    alone = m.generate([p], 10, stop_at_eos=False)
    np.testing.assert_array_equal(batch[i, : len(p) + 10], alone[0], err_msg=f"prompt {i} (length {len(p)})")


def test_sampling_is_seeded_and_stays_in_vocab(models):
  m = models["gqa4x2"]
  prompt = np.array([[5, 6, 7]])
  a = m.generate(prompt, 8, temperature=1.0, seed=3, stop_at_eos=False)
  b = m.generate(prompt, 8, temperature=1.0, seed=3, stop_at_eos=False)
  np.testing.assert_array_equal(a, b)
  assert a.min() >= 0 and a.max() < m.config.vocab_size


def test_sliding_window_changes_long_contexts(models):
  m = models["mqa4x1_window"]
  cfg = m.config
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, size=(1, 16)), jnp.int32)
  windowed = np.asarray(model.forward(m.params, tokens, cfg))
  unwindowed = np.asarray(model.forward(m.params, tokens, cfg.replace(sliding_window=None)))
  w = cfg.sliding_window
  np.testing.assert_allclose(windowed[:, :w], unwindowed[:, :w], atol=1e-5)
  assert np.abs(windowed[:, w:] - unwindowed[:, w:]).max() > 1e-3


def test_slot_map_reaches_experts_through_the_pool():
  """Permuting the pool and the slot map together leaves the model unchanged."""
  cfg = config.preset("tiny")
  params = layout.init_params(cfg, seed=5)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, size=(1, 6)), jnp.int32)
  base = np.asarray(model.forward(params, tokens, cfg))
  perm = np.random.default_rng(6).permutation(cfg.num_layers * cfg.num_experts)
  inv = np.argsort(perm).astype(np.int32)
  moved = dict(params, experts={n: w[perm] for n, w in params["experts"].items()}, slot_map=inv[params["slot_map"]])
  np.testing.assert_allclose(np.asarray(model.forward(moved, tokens, cfg)), base, atol=1e-6)


def test_modules_variables_are_exactly_the_layout():
  """The Flax modules' init creates exactly the backbone the layout declares, single and stacked."""
  cfg = config.preset("tiny")
  params = layout.init_params(cfg)
  tokens = jnp.zeros((2, 4), jnp.int32)
  pos = jnp.zeros((2, 4), jnp.int32)
  for ops, lead in ((model.SingleTenant(), ()), (MixedTenants(jnp.zeros(2, jnp.int32), 3), (3,))):
    smap = params["slot_map"] if not lead else np.stack([params["slot_map"]] * 3)
    init = model.Mixtral(cfg, tenants=ops.num_tenants).init
    variables = jax.eval_shape(init, jax.random.key(0), tokens, pos, None, None, params["experts"], smap, ops)
    assert set(variables) == {"params"}
    want = layout.backbone_shapes(cfg)
    if lead:
      want = {k: ({n: (s[0], 3, *s[1:]) for n, s in v.items()} if k == "layers" else (3, *v)) for k, v in want.items()}
    assert trees.flat_shapes(variables["params"]) == trees.flat_shapes(want)


def test_bfloat16_model_runs_close_to_float32():
  cfg = config.preset("tiny")
  params = layout.init_params(cfg, seed=7, scale=0.1)
  bf = cfg.replace(dtype="bfloat16")
  params_bf = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == np.float32 else a, params)
  tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(1, 6))
  f32 = MixtralModel(cfg, params).logits(tokens)
  b16 = MixtralModel(bf, params_bf).logits(tokens)
  assert b16.dtype == np.float32
  assert np.abs(b16 - f32).max() < 0.05 * np.abs(f32).max() + 0.05, max_abs(b16, f32)
  out = MixtralModel(bf, params_bf).generate(tokens, 4, stop_at_eos=False)
  assert out.shape == (1, 10)


def test_bad_tokens_are_refused(models):
  m = models["gqa4x2"]
  with pytest.raises(ValueError, match="token ids must be in"):
    m.logits(np.array([[1, m.config.vocab_size]]))
  with pytest.raises(ValueError, match="max_new_tokens"):
    m.generate(np.array([[1, 2]]), 0)


def test_parts_round_trip_through_the_served_layout():
  cfg = config.preset("tiny")
  params = layout.init_params(cfg, seed=8)
  parts, local = layout.split_parts(cfg, params)
  assert list(parts) == layout.part_names(cfg)
  back = layout.join_parts(cfg, parts, local)
  jax.tree.map(np.testing.assert_array_equal, back, params)
