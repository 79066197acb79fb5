"""The MoE layer boundary: routing plus grouped expert compute over a slot pool.

Every model family calls `moe(x, router_logits, slot_map, pool, spec)`. The
strategies behind it (dense reference, ragged_dot, Pallas kernels) are
separate functions registered by name; the model never branches on them.

The expert function follows from the pool's leaf names (`EXPERT_KINDS`):
{w1, w3, w2} is a SwiGLU expert (Mixtral), {wi, wo} a ReLU expert (Switch).
Routing is dropless unless `MoeSpec.capacity` is set: then HF Switch's expert
capacity applies (`drop_over_capacity`), for parity with transformers.

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
  AUTO = "auto"  # Pallas on GPU, per-slot loop elsewhere
  DENSE = "dense"  # every slot on every token: slow, readable reference
  SLOTS = "slots"  # one slot at a time in a loop: results independent of the pool's size
  RAGGED = "ragged"  # sort by slot, jax.lax.ragged_dot
  PALLAS = "pallas"  # pallas_kernels.routing + pallas_kernels.gmm
  PALLAS_INTERPRET = "pallas_interpret"  # the same kernels in interpret mode (CPU tests)


@dataclasses.dataclass(frozen=True)
class MoeSpec:
  top_k: int
  router: Router = Router.TOPK_RENORM
  impl: Impl = Impl.AUTO
  capacity: int | None = None  # HF expert capacity per group of tokens; None: dropless
  group_size: int = 0  # tokens per capacity group (consecutive rows of x); 0: one group


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


def drop_over_capacity(weights, experts, num_experts: int, capacity: int, group_size: int = 0):
  """HF Switch expert capacity: (weights [T, K], experts [T, K]) -> weights with drops zeroed.

  Mirrors transformers' SwitchTransformersTop1Router: within each group of
  `group_size` consecutive tokens (a sequence; 0: all T tokens), the n-th
  (token, k) pair routed to an expert, in token order, is kept iff
  n <= capacity. A dropped pair gets weight 0, so its MoE output is 0 and the
  residual passes the token through unchanged, as in SwitchTransformersSparseMLP.
  """
  t, k = experts.shape
  g = group_size or t
  onehot = jax.nn.one_hot(experts, num_experts, dtype=jnp.int32).reshape(t // g, g * k, num_experts)
  priority = jnp.cumsum(onehot, axis=1)  # per group and expert: 1 for the first pair routed there, ...
  keep = jnp.sum(onehot * (priority <= capacity), axis=-1).reshape(t, k)
  return jnp.where(keep > 0, weights, 0.0)


def routing(router_logits: jax.Array, spec: MoeSpec) -> tuple[jax.Array, jax.Array]:
  """`route`, then HF's expert capacity when the spec sets one: (weights [T, K], experts [T, K])."""
  weights, experts = route(router_logits, spec.top_k, spec.router)
  if spec.capacity is not None:
    weights = drop_over_capacity(weights, experts, router_logits.shape[-1], spec.capacity, spec.group_size)
  return weights, experts


def _dot(x, w):
  return jnp.matmul(x, w, preferred_element_type=jnp.float32)


def swiglu(x, w1, w3, w2, dot=_dot):
  """One expert: (silu(x w1) * (x w3)) w2, float32 accumulation.

  `dot(x, w)` does the contractions: one expert's matmul by default, or a
  grouped `ragged_dot` over a whole pool (moe_ragged).
  """
  gate = dot(x, w1)  # [T, F]
  up = dot(x, w3)
  h = (jax.nn.silu(gate) * up).astype(x.dtype)
  return dot(h, w2)  # [T, D]


def relu_ffn(x, wi, wo, dot=_dot):
  """One T5/Switch expert: relu(x wi) wo, float32 accumulation (`dot` as in `swiglu`)."""
  h = jax.nn.relu(dot(x, wi)).astype(x.dtype)  # [T, F]
  return dot(h, wo)  # [T, D]


# Pool leaf names, in argument order -> the expert function they feed.
EXPERT_KINDS: dict[tuple[str, ...], Callable] = {
    ("w1", "w3", "w2"): swiglu,
    ("wi", "wo"): relu_ffn,
}


def expert_kind(pool) -> tuple[tuple[str, ...], Callable]:
  """(leaf names, expert function) of a pool, from its leaf names."""
  for names, fn in EXPERT_KINDS.items():
    if set(pool) == set(names):
      return names, fn
  raise ValueError(f"expert pool leaves {sorted(pool)} match no expert kind; known: {list(EXPERT_KINDS)}")


@register(Impl.DENSE)
def moe_dense(x, router_logits, slot_map, pool, spec: MoeSpec):
  """Reference: run every pool slot on every token, keep the routed ones."""
  weights, experts = routing(router_logits, spec)
  slots = expert_slots(experts, slot_map)
  names, expert = expert_kind(pool)
  y = jnp.zeros(x.shape, jnp.float32)
  for s in range(pool[names[0]].shape[0]):
    gate = jnp.sum(jnp.where(slots == s, weights, 0.0), axis=-1)  # [T]
    y = y + gate[:, None] * expert(x, *(pool[n][s] for n in names))
  return y.astype(x.dtype)


@register(Impl.SLOTS)
def moe_slots(x, router_logits, slot_map, pool, spec: MoeSpec):
  """Each slot's expert on every token, one slot per loop iteration.

  A token's output bits depend only on the token and its experts, never on how
  many slots the pool has or where its experts sit: the per-slot products are
  the same programs whatever S is (a rolled loop, which XLA cannot merge into
  one batched product as it does the unrolled DENSE loop), each (token, k)
  pair receives exactly one nonzero term, and the k terms are summed in
  routing order. So consolidating experts into a bigger pool leaves a
  tenant's logits bit-identical on CPUs. Costs S expert products per token.
  """
  weights, experts = routing(router_logits, spec)
  slots = expert_slots(experts, jnp.asarray(slot_map))  # [T, K]
  pool = jax.tree.map(jnp.asarray, pool)  # numpy pools cannot be indexed by the loop counter
  names, expert = expert_kind(pool)

  def body(s, acc):  # acc [K, T, D]
    y = expert(x, *(pool[n][s] for n in names))
    gate = jnp.where(slots == s, weights, 0.0).T  # [K, T]
    return acc + gate[:, :, None] * y[None]

  acc = jnp.zeros((slots.shape[1], *x.shape), jnp.float32)
  acc = jax.lax.fori_loop(0, pool[names[0]].shape[0], body, acc)
  y = acc[0]
  for k in range(1, acc.shape[0]):
    y = y + acc[k]
  return y.astype(x.dtype)


@register(Impl.RAGGED)
def moe_ragged(x, router_logits, slot_map, pool, spec: MoeSpec):
  """Sort (token, k) pairs by slot and run the pool as one ragged matmul per weight."""
  t, k = router_logits.shape[0], spec.top_k if spec.router is Router.TOPK_RENORM else 1
  names, expert = expert_kind(pool)
  num_slots = pool[names[0]].shape[0]
  weights, experts = routing(router_logits, spec)
  flat_slots = expert_slots(experts, slot_map).reshape(t * k)
  order = jnp.argsort(flat_slots, stable=True)
  token = order // k
  group_sizes = jnp.bincount(flat_slots, length=num_slots).astype(jnp.int32)
  xs = x[token]  # [T*K, D]

  def dot(a, w):  # rows sorted by slot [T*K, ...] x pool [S, ...]
    return jax.lax.ragged_dot(a, w, group_sizes, preferred_element_type=jnp.float32)

  ys = expert(xs, *(pool[n] for n in names), dot=dot)
  ys = ys * weights.reshape(t * k)[order][:, None]
  return jnp.zeros((t, x.shape[1]), jnp.float32).at[token].add(ys).astype(x.dtype)


def pallas_supports(pool, spec: MoeSpec) -> bool:
  """The Pallas kernels fuse SwiGLU experts and route dropless."""
  return set(pool) == {"w1", "w3", "w2"} and spec.capacity is None


def resolve(impl: Impl, pool=None, spec: MoeSpec | None = None) -> Impl:
  """AUTO -> the per-slot loop off GPUs; on GPUs Pallas where `pallas_supports`, else ragged_dot."""
  if impl is not Impl.AUTO:
    return impl
  if jax.default_backend() != "gpu":
    return Impl.SLOTS
  if pool is not None and spec is not None and not pallas_supports(pool, spec):
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
    pool: {"w1": [S, D, F], "w3": [S, D, F], "w2": [S, F, D]} (SwiGLU) or
      {"wi": [S, D, F], "wo": [S, F, D]} (ReLU).
    spec: top-k, router kind, implementation and expert capacity.

  Returns:
    [T, D], the weighted sum of the routed experts' outputs, in x's dtype.
  """
  impl = resolve(spec.impl, pool, spec)
  if impl in (Impl.PALLAS, Impl.PALLAS_INTERPRET):
    if not pallas_supports(pool, spec):
      raise ValueError(f"MoE implementation {impl.value!r} supports dropless SwiGLU experts only; "
                       f"got pool leaves {sorted(pool)}, capacity={spec.capacity}")
    if impl not in _IMPLS:
      import pallas_kernels.moe  # noqa: F401  registers the Pallas strategies
  if impl not in _IMPLS:
    raise ValueError(f"MoE implementation {impl.value!r} is not available")
  return _IMPLS[impl](x, router_logits, slot_map, pool, spec)
