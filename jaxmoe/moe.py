"""The MoE layer boundary: routing plus grouped expert compute over a slot pool.

Every model family calls `moe(x, router_logits, slot_map, pool, spec)`. The
strategies behind it (dense reference, ragged_dot, Pallas kernels) are
separate functions registered by name; the model never branches on them.

Axis legend: T tokens, D model dim, F ffn dim, E logical experts, S pool slots,
K top-k.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Protocol

import jax
import jax.numpy as jnp


class Router(enum.Enum):
  """How router logits become (weights, experts)."""

  TOPK_RENORM = "topk_renorm"  # Mixtral: softmax, top-k, renormalise
  TOP1 = "top1"  # Switch: softmax, argmax, weight = max probability


class Impl(enum.Enum):
  AUTO = "auto"  # Pallas on GPU, ragged_dot elsewhere
  DENSE = "dense"  # every slot on every token: slow, readable reference
  RAGGED = "ragged"  # sort by slot, jax.lax.ragged_dot
  PALLAS = "pallas"  # pallas_kernels.routing + pallas_kernels.gmm
  PALLAS_INTERPRET = "pallas_interpret"  # the same kernels in interpret mode (CPU tests)


@dataclasses.dataclass(frozen=True)
class MoeSpec:
  top_k: int
  router: Router = Router.TOPK_RENORM
  impl: Impl = Impl.AUTO


class MoeFn(Protocol):
  def __call__(self, x, router_logits, slot_map, pool, spec: MoeSpec) -> jax.Array: ...


_IMPLS: dict[Impl, MoeFn] = {}


def register(impl: Impl) -> Callable[[MoeFn], MoeFn]:
  def deco(fn: MoeFn) -> MoeFn:
    _IMPLS[impl] = fn
    return fn

  return deco


def route(router_logits: jax.Array, top_k: int, router: Router) -> tuple[jax.Array, jax.Array]:
  """Router logits [T, E] -> (weights [T, K] float32, experts [T, K] int32)."""
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  if router is Router.TOP1:
    return jnp.max(probs, -1, keepdims=True), jnp.argmax(probs, -1)[:, None].astype(jnp.int32)
  weights, experts = jax.lax.top_k(probs, top_k)
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


def expert_slots(experts: jax.Array, slot_map: jax.Array) -> jax.Array:
  """Logical experts [T, K] -> pool slots [T, K]; slot_map is [E] or per token [T, E]."""
  if slot_map.ndim == 1:
    return slot_map[experts]
  return jnp.take_along_axis(slot_map, experts, axis=-1)


def swiglu(x, w1, w3, w2):
  """One expert: (silu(x w1) * (x w3)) w2, float32 accumulation."""
  f32 = jnp.float32
  gate = jnp.einsum("TD,DF->TF", x, w1, preferred_element_type=f32)
  up = jnp.einsum("TD,DF->TF", x, w3, preferred_element_type=f32)
  h = (jax.nn.silu(gate) * up).astype(x.dtype)
  return jnp.einsum("TF,FD->TD", h, w2, preferred_element_type=f32)


@register(Impl.DENSE)
def moe_dense(x, router_logits, slot_map, pool, spec: MoeSpec):
  """Reference: run every pool slot on every token, keep the routed ones."""
  weights, experts = route(router_logits, spec.top_k, spec.router)
  slots = expert_slots(experts, slot_map)
  y = jnp.zeros(x.shape, jnp.float32)
  for s in range(pool["w1"].shape[0]):
    gate = jnp.sum(jnp.where(slots == s, weights, 0.0), axis=-1)  # [T]
    y = y + gate[:, None] * swiglu(x, pool["w1"][s], pool["w3"][s], pool["w2"][s])
  return y.astype(x.dtype)


@register(Impl.RAGGED)
def moe_ragged(x, router_logits, slot_map, pool, spec: MoeSpec):
  """Sort (token, k) pairs by slot and run the pool as one ragged matmul per weight."""
  t, k = router_logits.shape[0], spec.top_k if spec.router is Router.TOPK_RENORM else 1
  num_slots = pool["w1"].shape[0]
  weights, experts = route(router_logits, spec.top_k, spec.router)
  flat_slots = expert_slots(experts, slot_map).reshape(t * k)
  order = jnp.argsort(flat_slots, stable=True)
  token = order // k
  group_sizes = jnp.bincount(flat_slots, length=num_slots).astype(jnp.int32)
  xs = x[token]  # [T*K, D]
  f32 = jnp.float32
  gate = jax.lax.ragged_dot(xs, pool["w1"], group_sizes, preferred_element_type=f32)
  up = jax.lax.ragged_dot(xs, pool["w3"], group_sizes, preferred_element_type=f32)
  h = (jax.nn.silu(gate) * up).astype(x.dtype)
  ys = jax.lax.ragged_dot(h, pool["w2"], group_sizes, preferred_element_type=f32)
  ys = ys * weights.reshape(t * k)[order][:, None]
  return jnp.zeros((t, x.shape[1]), f32).at[token].add(ys).astype(x.dtype)


def resolve(impl: Impl) -> Impl:
  if impl is not Impl.AUTO:
    return impl
  if jax.default_backend() != "gpu":
    return Impl.RAGGED
  import pallas_kernels.moe  # noqa: F401  registers the Pallas strategies

  return Impl.PALLAS


def moe(x, router_logits, slot_map, pool, spec: MoeSpec) -> jax.Array:
  """Routed expert FFN.

  Args:
    x: [T, D] token activations.
    router_logits: [T, E] router outputs for these tokens.
    slot_map: [E] or [T, E] int32, logical expert -> pool slot (per token for
      batches that mix tenants).
    pool: {"w1": [S, D, F], "w3": [S, D, F], "w2": [S, F, D]}.
    spec: top-k, router kind and implementation.

  Returns:
    [T, D], the weighted sum of the routed experts' outputs, in x's dtype.
  """
  impl = resolve(spec.impl)
  if impl in (Impl.PALLAS, Impl.PALLAS_INTERPRET) and impl not in _IMPLS:
    import pallas_kernels.moe  # noqa: F401  registers the Pallas strategies
  if impl not in _IMPLS:
    raise ValueError(f"MoE implementation {impl.value!r} is not available")
  return _IMPLS[impl](x, router_logits, slot_map, pool, spec)
