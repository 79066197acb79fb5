"""The MoE layer boundary: routing plus expert compute over a pool reached through a slot map.

Every family calls `moe(x, router_logits, slot_map, pool, spec)`. The pool is
one array per expert leaf, `[X, ...]` over all MoE layers; `slot_map` holds the
pool slots of this layer's logical experts. The strategies behind it are
separate functions in one table (`STRATEGIES`); the model never branches on them:

  dense     every pool slot on every token, keep the routed ones (the readable reference)
  experts   each of the layer's E logical experts on every token (differentiable: training)
  routed    each distinct routed slot on every token, one slot per loop step (CPU default)
  ragged    the distinct routed slots gathered, one ragged_dot per weight
  pallas    the Triton kernels of jaxmoe.kernels (GPU default for SwiGLU experts)

The expert function follows from the pool's leaf names (`EXPERT_KINDS`):
{w1, w3, w2} is a SwiGLU expert (Mixtral), {wi, wo} a ReLU expert (Switch).
Routing is dropless unless `MoeSpec.capacity` is set: then HF Switch's expert
capacity applies (`drop_over_capacity`), for parity with transformers. Those
pieces, which every strategy shares, live in `jaxmoe.nn.moe_ops`; a pool split
over a mesh's `expert` or `model` axis goes to `jaxmoe.nn.expert_parallel`.

Products run in the weights' dtype with float32 accumulation; nothing makes a
float32 copy of the pool.
"""

from __future__ import annotations

import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from jaxmoe.axes import ArrayLike, Float, Int, checked
from jaxmoe.kernels.moe import moe_swiglu
from jaxmoe.nn import sharding
from jaxmoe.nn.expert_parallel import EXPERT_AXIS, MODEL_AXIS, moe_expert_parallel
from jaxmoe.nn.moe_ops import (
  Impl,
  MoeSpec,
  Router,
  chunk_rows,
  expert_kind,
  expert_slots,
  grouped_terms,
  num_slots,
  pallas_supports,
  resolve,
  routing,
  slot_bound,
  slot_weights,
  sum_k,
  unique_slots,
)


class MoeFn(Protocol):
  def __call__(self, x, router_logits, slot_map, pool, spec: MoeSpec) -> jax.Array: ...


def moe_dense(x, router_logits, slot_map, pool, spec: MoeSpec):
  """Reference: run every pool slot on every token, keep the routed ones."""
  weights, experts = routing(router_logits, spec)
  slots = expert_slots(experts, slot_map)
  names, expert = expert_kind(pool)
  y = jnp.zeros(x.shape, jnp.float32)
  for s in range(num_slots(pool)):
    gate = jnp.sum(jnp.where(slots == s, weights, 0.0), axis=-1)  # [T]
    y = y + gate[:, None] * expert(x, *slot_weights(pool, names, s, x.dtype))
  return y.astype(x.dtype)


def moe_experts(x, router_logits, slot_map, pool, spec: MoeSpec):
  """Each logical expert e of the layer, at slot slot_map[e], on every token; differentiable."""
  if slot_map.ndim != 1:
    raise ValueError("the 'experts' MoE strategy needs one slot map [E] for every token")
  weights, experts = routing(router_logits, spec)
  names, expert = expert_kind(pool)
  y = jnp.zeros(x.shape, jnp.float32)
  for e in range(slot_map.shape[0]):
    gate = jnp.sum(jnp.where(experts == e, weights, 0.0), axis=-1)  # [T]
    y = y + gate[:, None] * expert(x, *slot_weights(pool, names, slot_map[e], x.dtype))
  return y.astype(x.dtype)


def moe_routed(x, router_logits, slot_map, pool, spec: MoeSpec):
  """Each distinct routed slot on every token, one per loop step: reads only the routed experts.

  At decode a batch of B rows reads at most min(B*K, reachable) experts; the
  loop's trip count is the number of distinct slots (not differentiable).
  """
  weights, experts = routing(router_logits, spec)
  slots = expert_slots(experts, slot_map)  # [T, K]
  names, expert = expert_kind(pool)
  rows = chunk_rows(x.shape[0], spec.k, router_logits.shape[-1])
  acc = grouped_terms(x, slots, weights, pool, names, expert, slot_bound(slots, pool, spec), rows)
  return sum_k(acc).astype(x.dtype)


def moe_ragged(x, router_logits, slot_map, pool, spec: MoeSpec):
  """Sort (token, k) pairs by slot; the distinct routed slots gathered, one ragged matmul per weight."""
  t, k = router_logits.shape[0], spec.k
  names, expert = expert_kind(pool)
  weights, experts = routing(router_logits, spec)
  slots = expert_slots(experts, slot_map)
  uniq, _ = unique_slots(slots, slot_bound(slots, pool, spec))
  local = jnp.searchsorted(uniq, slots.reshape(t * k)).astype(jnp.int32)  # index into uniq
  order = jnp.argsort(local, stable=True)
  token = order // k
  group_sizes = jnp.bincount(local, length=uniq.shape[0]).astype(jnp.int32)

  def dot(a, w):  # rows sorted by slot [T*K, ...] x gathered experts [U, ...]
    return jax.lax.ragged_dot(a, w, group_sizes, preferred_element_type=jnp.float32)

  ys = expert(x[token], *slot_weights(pool, names, uniq, x.dtype), dot=dot)
  ys = ys * weights.reshape(t * k)[order][:, None]
  return jnp.zeros((t, x.shape[1]), jnp.float32).at[token].add(ys).astype(x.dtype)


def moe_pallas(x, router_logits, slot_map, pool, spec: MoeSpec, *, interpret: bool):
  if not pallas_supports(pool, spec):
    raise ValueError(
      f"the Pallas MoE strategy supports dropless SwiGLU experts only; "
      f"got pool leaves {sorted(pool)}, capacity={spec.capacity}"
    )
  return moe_swiglu(
    x,
    router_logits,
    slot_map,
    pool["w1"],
    pool["w3"],
    pool["w2"],
    top_k=spec.k,
    renormalise=spec.router is Router.TOPK_RENORM,
    interpret=interpret,
  )


STRATEGIES: dict[Impl, MoeFn] = {
  Impl.DENSE: moe_dense,
  Impl.EXPERTS: moe_experts,
  Impl.ROUTED: moe_routed,
  Impl.RAGGED: moe_ragged,
  Impl.PALLAS: functools.partial(moe_pallas, interpret=False),
  Impl.PALLAS_INTERPRET: functools.partial(moe_pallas, interpret=True),
}


@checked
def moe(
  x: Float[ArrayLike, "T D"],
  router_logits: Float[ArrayLike, "T E"],
  slot_map: Int[ArrayLike, "E"] | Int[ArrayLike, "T E"],
  pool: dict,
  spec: MoeSpec,
) -> Float[jax.Array, "T D"]:
  """Routed expert FFN.

  Args:
    x: [T, D] token activations.
    router_logits: [T, E] router outputs for these tokens.
    slot_map: [E] or [T, E] int32, logical expert -> pool slot (per token for
      batches that mix tenants).
    pool: {"w1": [X, D, F], "w3": [X, D, F], "w2": [X, F, D]} (SwiGLU) or
      {"wi": [X, D, F], "wo": [X, F, D]} (ReLU).
    spec: top-k, router kind, implementation and expert capacity.

  Returns:
    [T, D], the weighted sum of the routed experts' outputs, in x's dtype.
  """
  impl = resolve(spec.impl, pool, spec)
  pool = {n: jnp.asarray(w) for n, w in pool.items()}  # numpy pools cannot be indexed by traced slots
  if sharding.axis_size(EXPERT_AXIS) > 1 or sharding.axis_size(MODEL_AXIS) > 1:  # the pool split over a mesh
    return moe_expert_parallel(x, router_logits, jnp.asarray(slot_map), pool, spec)
  if impl in (Impl.PALLAS, Impl.PALLAS_INTERPRET) and any(w.dtype == jnp.uint16 for w in pool.values()):
    pool = {n: jax.lax.bitcast_convert_type(w, x.dtype) if w.dtype == jnp.uint16 else w for n, w in pool.items()}
  return STRATEGIES[impl](x, router_logits, jnp.asarray(slot_map), pool, spec)
