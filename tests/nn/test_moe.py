"""The MoE boundary: every strategy against a per-expert loop; bit stability when the pool grows."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxmoe.nn import moe as moe_lib
from jaxmoe.nn import moe_ops
from tests.helpers import max_abs


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


def random_case(rng, t, d=16, f=24, e=4, x_slots=6, per_token_map=False):
  x = rng.standard_normal((t, d)).astype(np.float32)
  logits = rng.standard_normal((t, e)).astype(np.float32)
  pool = {
    n: (0.3 * rng.standard_normal(sh)).astype(np.float32)
    for n, sh in (("w1", (x_slots, d, f)), ("w3", (x_slots, d, f)), ("w2", (x_slots, f, d)))
  }
  slot_map = rng.integers(0, x_slots, size=(t, e) if per_token_map else (e,)).astype(np.int32)
  return x, logits, slot_map, pool


# The experts strategy takes one slot map for all tokens (its refusal of per-token maps is tested below);
# the Pallas kernels have their own tests (tests/kernels).
CASES = [
  (impl, per_token)
  for impl in (moe_lib.Impl.DENSE, moe_lib.Impl.EXPERTS, moe_lib.Impl.ROUTED, moe_lib.Impl.RAGGED)
  for per_token in (False, True)
  if not (impl is moe_lib.Impl.EXPERTS and per_token)
]


@pytest.mark.parametrize("t", [1, 11])
@pytest.mark.parametrize(("impl", "per_token_map"), CASES)
def test_moe_strategies_match_per_expert_loop(impl, per_token_map, t):
  x, logits, slot_map, pool = random_case(np.random.default_rng(4), t, per_token_map=per_token_map)
  spec = moe_lib.MoeSpec(top_k=2, impl=impl)
  got = jax.jit(lambda *a: moe_lib.moe(*a, spec))(x, logits, slot_map, pool)
  want = per_expert_loop(x, logits, slot_map, pool, 2)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4, err_msg=max_abs(got, want))


def test_experts_strategy_refuses_per_token_maps():
  x, logits, slot_map, pool = random_case(np.random.default_rng(4), 3, per_token_map=True)
  with pytest.raises(ValueError, match="one slot map"):
    moe_lib.moe(x, logits, slot_map, pool, moe_lib.MoeSpec(top_k=2, impl=moe_lib.Impl.EXPERTS))


@pytest.mark.parametrize("impl", [moe_lib.Impl.ROUTED, moe_lib.Impl.EXPERTS])
def test_strategy_is_bit_stable_when_the_pool_grows(impl):
  """Adding unrelated slots (and moving a token's experts) must not change a single bit."""
  rng = np.random.default_rng(9)
  t, d, f, e, k = 7, 16, 24, 4, 3
  x = rng.standard_normal((t, d)).astype(np.float32)
  logits = rng.standard_normal((t, e)).astype(np.float32)
  pool = {
    n: (0.3 * rng.standard_normal(sh)).astype(np.float32)
    for n, sh in (("w1", (e, d, f)), ("w3", (e, d, f)), ("w2", (e, f, d)))
  }
  spec = moe_lib.MoeSpec(top_k=k, impl=impl)
  base = np.asarray(moe_lib.moe(x, logits, np.arange(e, dtype=np.int32), pool, spec))
  order = np.array([5, 0, 3, 1, 2, 4])  # experts scattered over a pool of 6, two extra slots
  big = {n: np.zeros((6, *w.shape[1:]), np.float32) for n, w in pool.items()}
  for n, w in pool.items():
    big[n][order[:e]] = w
    big[n][order[e:]] = rng.standard_normal((2, *w.shape[1:]))
  grown = np.asarray(moe_lib.moe(x, logits, order[:e].astype(np.int32), big, spec))
  np.testing.assert_array_equal(grown, base)


def test_routed_strategy_never_reads_unrouted_slots():
  """NaN in every slot no token is routed to leaves the output finite: those weights are not read."""
  x, logits, slot_map, pool = random_case(np.random.default_rng(12), 2, e=4, x_slots=12)
  weights, experts = moe_ops.route(logits, 2, moe_lib.Router.TOPK_RENORM)
  used = set(np.asarray(slot_map)[np.asarray(experts)].reshape(-1).tolist())
  poisoned = {n: w.copy() for n, w in pool.items()}
  for s in set(range(12)) - used:
    for w in poisoned.values():
      w[s] = np.nan
  spec = moe_lib.MoeSpec(top_k=2, impl=moe_lib.Impl.ROUTED)
  got = np.asarray(moe_lib.moe(x, logits, slot_map, poisoned, spec))
  want = np.asarray(moe_lib.moe(x, logits, slot_map, pool, spec))
  np.testing.assert_array_equal(got, want)


def test_unique_slots_counts_distinct_values():
  slots = np.array([[3, 1], [3, 7], [1, 1]], np.int32)
  uniq, count = moe_ops.unique_slots(slots, 6)
  assert int(count) == 3 and list(np.asarray(uniq)[:3]) == [1, 3, 7]


def test_shapes_are_checked():
  x, logits, slot_map, pool = random_case(np.random.default_rng(4), 3)
  with pytest.raises(Exception, match="router_logits|T E"):
    moe_lib.moe(x, logits[:, :3][:2], slot_map, pool, moe_lib.MoeSpec(top_k=2))


# routed (the CPU default) holds one slot at a time; ragged gathers the routed slots of a layer.
@pytest.mark.parametrize(("impl", "bound"), [(moe_lib.Impl.ROUTED, 0.6), (moe_lib.Impl.RAGGED, 1.0)])
def test_a_bf16_pool_is_never_copied_to_float32(impl, bound):
  """The compiled forward of a bf16 model needs less temporary memory than its pool (CPUs upcast bf16
  products: a float32 copy of the pool would be twice its size)."""
  from jaxmoe.families.mixtral import config, layout, model

  cfg = config.preset("tiny").replace(hidden_size=128, intermediate_size=1024, dtype="bfloat16")
  params = layout.init_params(cfg)
  params = jax.device_put({**params, "experts": moe_ops.pack(params["experts"])})
  pool_bytes = sum(x.nbytes for x in jax.tree.leaves(params["experts"]))
  compiled = model.forward.lower(params, jax.numpy.zeros((2, 32), "int32"), cfg, impl).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp < bound * pool_bytes, f"temporaries {temp / 1e6:.1f} MB for a pool of {pool_bytes / 1e6:.1f} MB"
