"""Mixtral model: parity with HF goldens, KV cache, padding, MoE strategies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe import config as config_lib
from jaxmoe import moe as moe_lib
from jaxmoe import params as params_lib
from jaxmoe.api import Model
from jaxmoe.models import mixtral

NAMES = ("gqa4x2", "mqa4x1_window")


def max_abs(a, b) -> str:
  err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return f"max-abs {err.max():.3g}, relative {err.max() / max(np.abs(b).max(), 1e-30):.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf(models, golden, name):
  ref = golden[name]
  got = models[name].logits(ref["tokens"])
  assert got.dtype == np.float32 and got.shape == ref["logits"].shape
  np.testing.assert_allclose(got, ref["logits"], atol=1e-4, rtol=0, err_msg=max_abs(got, ref["logits"]))


@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation_matches_hf(models, golden, name):
  ref = golden[name]["generated"]
  prompt = golden[name]["tokens"][:1]
  got = models[name].generate(prompt, max_new_tokens=ref.shape[1] - prompt.shape[1])
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name", NAMES)
def test_kv_cache_decoding_equals_full_forward(models, name):
  model = models[name]
  cfg = model.config
  rng = np.random.default_rng(1)
  seq = rng.integers(0, cfg.vocab_size, size=(2, 14)).astype(np.int32)
  full = np.asarray(mixtral.forward(model.params, jnp.asarray(seq), cfg, model.impl))
  prompt_len = 5
  cache = mixtral.init_cache(cfg, 2, 64)
  padded = np.zeros((2, 8), np.int32)
  padded[:, :prompt_len] = seq[:, :prompt_len]
  lengths = jnp.full((2,), prompt_len, jnp.int32)
  logits, cache = mixtral.prefill(model.params, jnp.asarray(padded), lengths, cache, cfg, model.impl)
  steps = [np.asarray(logits)]
  for t in range(prompt_len, seq.shape[1]):
    logits, cache = mixtral.decode_step(model.params, jnp.asarray(seq[:, t]), cache, cfg, model.impl)
    steps.append(np.asarray(logits))
  decoded = np.stack(steps, axis=1)  # logits after positions prompt_len-1 .. 13
  want = full[:, prompt_len - 1 :]
  np.testing.assert_allclose(decoded, want, atol=2e-5, rtol=0, err_msg=max_abs(decoded, want))


def test_mixed_prompt_lengths_equal_each_alone(models):
  model = models["mqa4x1_window"]
  rng = np.random.default_rng(2)
  prompts = [rng.integers(3, model.config.vocab_size, size=n) for n in (3, 11, 7)]
  batch = model.generate(prompts, 10, stop_at_eos=False)
  for i, p in enumerate(prompts):
    alone = model.generate([p], 10, stop_at_eos=False)
    np.testing.assert_array_equal(batch[i, : len(p) + 10], alone[0], err_msg=f"prompt {i} (length {len(p)})")


def test_sampling_is_seeded_and_stays_in_vocab(models):
  model = models["gqa4x2"]
  prompt = np.array([[5, 6, 7]])
  a = model.generate(prompt, 8, temperature=1.0, seed=3, stop_at_eos=False)
  b = model.generate(prompt, 8, temperature=1.0, seed=3, stop_at_eos=False)
  np.testing.assert_array_equal(a, b)
  assert a.min() >= 0 and a.max() < model.config.vocab_size


def test_sliding_window_changes_long_contexts(models):
  model = models["mqa4x1_window"]
  cfg = model.config
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, size=(1, 16)), jnp.int32)
  windowed = np.asarray(mixtral.forward(model.params, tokens, cfg))
  unwindowed = np.asarray(mixtral.forward(model.params, tokens, cfg.replace(sliding_window=None)))
  w = cfg.sliding_window
  np.testing.assert_allclose(windowed[:, :w], unwindowed[:, :w], atol=1e-5)
  assert np.abs(windowed[:, w:] - unwindowed[:, w:]).max() > 1e-3


def per_expert_loop(x, router_logits, slot_map, pool, top_k):
  """Token-by-token numpy reference of the routed SwiGLU MoE."""
  x, router_logits = np.asarray(x, np.float64), np.asarray(router_logits, np.float64)
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    probs = np.exp(router_logits[t] - router_logits[t].max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[:top_k]
    weights = probs[top] / probs[top].sum()
    for e, w in zip(top, weights):
      s = slot_map[t, e] if slot_map.ndim == 2 else slot_map[e]
      w1, w3, w2 = (np.asarray(pool[n][s], np.float64) for n in ("w1", "w3", "w2"))
      gate = x[t] @ w1
      out[t] += w * (((gate / (1 + np.exp(-gate))) * (x[t] @ w3)) @ w2)
  return out


@pytest.mark.parametrize("per_token_map", [False, True])
@pytest.mark.parametrize("impl", [moe_lib.Impl.DENSE, moe_lib.Impl.SLOTS, moe_lib.Impl.RAGGED])
def test_moe_strategies_match_per_expert_loop(impl, per_token_map):
  rng = np.random.default_rng(4)
  t, d, f, e, s, k = 11, 16, 24, 4, 6, 2
  x = rng.standard_normal((t, d)).astype(np.float32)
  logits = rng.standard_normal((t, e)).astype(np.float32)
  pool = {n: (0.3 * rng.standard_normal(sh)).astype(np.float32)
          for n, sh in (("w1", (s, d, f)), ("w3", (s, d, f)), ("w2", (s, f, d)))}
  slot_map = rng.integers(0, s, size=(t, e) if per_token_map else (e,)).astype(np.int32)
  spec = moe_lib.MoeSpec(top_k=k, impl=impl)
  got = jax.jit(lambda *a: moe_lib.moe(*a, spec))(x, logits, slot_map, pool)
  want = per_expert_loop(x, logits, slot_map, pool, k)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4, err_msg=max_abs(got, want))


def test_slot_map_reaches_experts_through_the_pool():
  """Permuting the pool and the slot map together leaves the model unchanged."""
  cfg = config_lib.preset("tiny")
  params = params_lib.init_params(cfg, seed=5)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, size=(1, 6)), jnp.int32)
  base = np.asarray(mixtral.forward(params, tokens, cfg))
  perm = np.random.default_rng(6).permutation(cfg.num_experts)
  inv = np.argsort(perm)
  moved = dict(params, experts=[{n: w[perm] for n, w in p.items()} for p in params["experts"]],
               slot_map=np.tile(inv.astype(np.int32), (cfg.num_layers, 1)))
  np.testing.assert_allclose(np.asarray(mixtral.forward(moved, tokens, cfg)), base, atol=1e-6)


def test_bfloat16_model_runs_close_to_float32():
  cfg = config_lib.preset("tiny")
  params = params_lib.init_params(cfg, seed=7, scale=0.1)
  bf = cfg.replace(dtype="bfloat16")
  params_bf = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.dtype == np.float32 else a, params)
  tokens = np.random.default_rng(7).integers(0, cfg.vocab_size, size=(1, 6))
  f32 = Model(cfg, params).logits(tokens)
  b16 = Model(bf, params_bf).logits(tokens)
  assert b16.dtype == np.float32
  assert np.abs(b16 - f32).max() < 0.05 * np.abs(f32).max() + 0.05, max_abs(b16, f32)
  out = Model(bf, params_bf).generate(tokens, 4, stop_at_eos=False)
  assert out.shape == (1, 10)


def test_bad_tokens_are_refused(models):
  model = models["gqa4x2"]
  with pytest.raises(ValueError, match="token ids must be in"):
    model.logits(np.array([[1, model.config.vocab_size]]))
  with pytest.raises(ValueError, match="max_new_tokens"):
    model.generate(np.array([[1, 2]]), 0)


def test_slots_strategy_is_bit_stable_when_the_pool_grows():
  """Adding unrelated slots (and moving a token's experts) must not change a single bit."""
  rng = np.random.default_rng(9)
  t, d, f, e, k = 7, 16, 24, 4, 3
  x = rng.standard_normal((t, d)).astype(np.float32)
  logits = rng.standard_normal((t, e)).astype(np.float32)
  pool = {n: (0.3 * rng.standard_normal(sh)).astype(np.float32)
          for n, sh in (("w1", (e, d, f)), ("w3", (e, d, f)), ("w2", (e, f, d)))}
  spec = moe_lib.MoeSpec(top_k=k, impl=moe_lib.Impl.SLOTS)
  base = np.asarray(moe_lib.moe(x, logits, np.arange(e, dtype=np.int32), pool, spec))
  order = np.array([5, 0, 3, 1, 2, 4])  # experts scattered over a pool of 6, two extra slots
  big = {n: np.zeros((6, *w.shape[1:]), np.float32) for n, w in pool.items()}
  for n, w in pool.items():
    big[n][order[:e]] = w
    big[n][order[e:]] = rng.standard_normal((2, *w.shape[1:]))
  grown = np.asarray(moe_lib.moe(x, logits, order[:e].astype(np.int32), big, spec))
  np.testing.assert_array_equal(grown, base)


@pytest.mark.parametrize("project", [mixtral.grouped_linear, mixtral.block_linear, mixtral.gathered_linear])
def test_mixed_tenant_projections_match_per_row_products(project):
  rng = np.random.default_rng(10)
  x = rng.standard_normal((5, 3, 8)).astype(np.float32)
  w = rng.standard_normal((4, 8, 6)).astype(np.float32)
  ids = np.array([2, 0, 3, 2, 1], np.int32)
  want = np.stack([x[b] @ w[ids[b]] for b in range(5)])
  got = np.asarray(jax.jit(project)(x, w, ids))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=max_abs(got, want))


@pytest.mark.parametrize("gather_limit", [0, mixtral.GATHER_LIMIT_BYTES])
@pytest.mark.parametrize("tokens", [1, 3])
def test_mixed_tenants_linear_matches_per_row_products(monkeypatch, gather_limit, tokens):
  """Whichever CPU variant the shapes and the copy limit pick, rows get their own tenant's product."""
  monkeypatch.setattr(mixtral, "GATHER_LIMIT_BYTES", gather_limit)
  rng = np.random.default_rng(11)
  x = rng.standard_normal((5, tokens, 4, 2)).astype(np.float32)  # [B, T, N, H]
  w = rng.standard_normal((3, 4, 2, 6)).astype(np.float32)  # [K, N, H, D]
  ids = np.array([1, 0, 2, 2, 1], np.int32)
  want = np.stack([np.einsum("TNH,NHD->TD", x[b], w[ids[b]]) for b in range(5)])
  ops = mixtral.MixedTenants(jnp.asarray(ids))
  got = np.asarray(ops.linear("BTNH,NHD->BTD", jnp.asarray(x), jnp.asarray(w)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=max_abs(got, want))
