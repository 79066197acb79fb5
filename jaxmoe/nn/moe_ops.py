"""What every MoE strategy shares: routing, the expert functions, the pool's slots.

`route` turns router logits into (weights, experts); `expert_slots` maps the
logical experts to pool slots through a slot map; `EXPERT_KINDS` picks the
expert function from the pool's leaf names; `grouped_terms` runs each routed
slot on its own (token, k) pairs, the routed strategy's loop, which the
expert-parallel shards reuse. `jaxmoe.nn.moe` builds its strategy table on
these, `jaxmoe.nn.expert_parallel` its sharded boundary; this module imports
neither.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import buckets
from jaxmoe.kernels.cpu import slot_ffn


class Router(enum.Enum):
  """How router logits become (weights, experts)."""

  TOPK_RENORM = "topk_renorm"  # Mixtral: softmax, top-k, renormalise
  TOP1 = "top1"  # Switch: softmax, argmax, weight = max probability


class Impl(enum.Enum):
  AUTO = "auto"  # Pallas (or ragged) on GPUs, routed elsewhere
  DENSE = "dense"
  EXPERTS = "experts"
  ROUTED = "routed"
  RAGGED = "ragged"
  PALLAS = "pallas"
  PALLAS_INTERPRET = "pallas_interpret"  # the Pallas kernels in interpret mode (CPU tests)


@dataclasses.dataclass(frozen=True)
class MoeSpec:
  top_k: int
  router: Router = Router.TOPK_RENORM
  impl: Impl = Impl.AUTO
  capacity: int | None = None  # HF expert capacity per group of tokens; None: dropless
  group_size: int = 0  # tokens per capacity group (consecutive rows of x); 0: one group
  max_slots: int | None = None  # distinct slots this layer's tokens can reach (E per tenant in the batch)

  @property
  def k(self) -> int:
    """Experts per token."""
    return 1 if self.router is Router.TOP1 else self.top_k


def route(router_logits, top_k: int, router: Router) -> tuple[jax.Array, jax.Array]:
  """Router logits [T, E] -> (weights [T, K] float32, experts [T, K] int32)."""
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  if router is Router.TOP1:
    return jnp.max(probs, -1, keepdims=True), jnp.argmax(probs, -1)[:, None].astype(jnp.int32)
  weights, experts = jax.lax.top_k(probs, top_k)
  weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights, experts.astype(jnp.int32)


def expert_slots(experts, slot_map) -> jax.Array:
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


def routing(router_logits, spec: MoeSpec) -> tuple[jax.Array, jax.Array]:
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
  grouped `ragged_dot` over several (`moe_ragged`).
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


def pack(pool: dict) -> dict:
  """A pool as the MoE boundary takes it on this backend (host or device arrays in, same kind out).

  On CPUs, 16-bit float leaves travel as their uint16 bit patterns: XLA's CPU
  backend computes bf16 products in float32 and converts a loop-invariant bf16
  operand once, whole, before the loop, which would materialise a float32 copy
  of the entire pool; integers are never converted, and each slot is
  reinterpreted as its float type after it is sliced (`slot_weights`).
  """
  if jax.default_backend() != "cpu":
    return pool
  out = {}
  for n, w in pool.items():
    if jnp.issubdtype(w.dtype, jnp.floating) and jnp.dtype(w.dtype).itemsize == 2:
      w = np.asarray(w).view(np.uint16) if isinstance(w, np.ndarray) else jax.lax.bitcast_convert_type(w, jnp.uint16)
    out[n] = w
  return out


def slot_weights(pool: dict, names, index, dtype) -> list:
  """Each leaf's slot(s) `index` (a slot or an array of slots), reinterpreted from packed bits if needed."""
  out = []
  for n in names:
    w = pool[n][index]
    out.append(jax.lax.bitcast_convert_type(w, dtype) if w.dtype == jnp.uint16 else w)
  return out


def slot_expert(expert, x, pool, names, slot):
  """One slot's expert on the rows x. On CPUs, for a few rows, one kernel call runs the whole expert and reads
  the slot in place (`jaxmoe.kernels.cpu.slot_ffn`) rather than after XLA's copy of it out of
  the pool."""
  leaves = [pool[n] for n in names]
  if EXPERT_KINDS.get(tuple(names)) is expert and slot_ffn.supports(x.shape[0], leaves, x.dtype):
    return slot_ffn.slot_ffn(x, leaves, slot)
  return expert(x, *slot_weights(pool, names, slot, x.dtype))


def num_slots(pool) -> int:
  return next(iter(pool.values())).shape[0]


def unique_slots(slots, bound: int) -> tuple[jax.Array, jax.Array]:
  """Distinct values of slots [T, K], ascending, padded to `bound` with the largest: ([bound], count).

  The padding keeps the list sorted (for searchsorted) and repeats a real slot.
  """
  flat = slots.reshape(-1)
  uniq = jnp.unique(flat, size=bound, fill_value=jnp.max(flat))
  count = jnp.sum(jnp.concatenate([jnp.ones(1, bool), uniq[1:] > uniq[:-1]]))
  return uniq, count


def slot_bound(slots, pool, spec: MoeSpec) -> int:
  """A static bound on the distinct slots of `slots` [T, K]."""
  bound = min(slots.size, num_slots(pool))
  return bound if spec.max_slots is None else min(bound, spec.max_slots)


def chunk_rows(num_tokens: int, k: int, num_experts: int) -> int:
  """Rows per expert program of `grouped_terms`: a power of two about twice a slot's mean share of the
  (token, k) pairs, at most the tokens. Decode (few pairs per slot) reads each routed slot once; a
  prefill computes about the pairs it routes, not every token on every routed slot."""
  return buckets.pow2(2 * -(-num_tokens * k // num_experts), cap=num_tokens)


def grouped_terms(x, slots, weights, pool, names, expert, bound: int, rows: int, absent: int | None = None):
  """Per (k, token) float32 terms [K, T, D] of the routed experts, slot by slot in chunks of `rows` pairs.

  The (token, k) pairs are sorted by slot (stably); each loop step runs one
  slot's expert on the next `rows` of its pairs (gathered tokens) and writes
  each pair's weighted output to its own (k, token) cell. A pair's value thus
  depends on its slot's pairs only, in the same order and chunk whatever the
  pool's size or the slot's number: a tenant's output bits do not change when
  its experts move into a bigger (consolidated) pool. Pairs whose slot is
  `absent` (held by another shard) are skipped. `bound` bounds the distinct
  slots (static).
  """
  x, (t, k) = jnp.asarray(x), slots.shape
  n = t * k
  flat = slots.reshape(n)
  order = jnp.argsort(flat, stable=True)  # pair indices, grouped by slot
  sorted_slots = flat[order]
  first = jnp.concatenate([jnp.ones(1, bool), sorted_slots[1:] != sorted_slots[:-1]])
  group = jnp.cumsum(first) - 1  # [n] each sorted pair's group (distinct slot)
  here = 1 if absent is None else (sorted_slots != absent).astype(jnp.int32)  # absent pairs: a group of 0
  counts = jnp.zeros(bound, jnp.int32).at[group].add(here, mode="drop")
  starts = jnp.cumsum(counts) - counts
  chunks = -(-counts // rows)
  chunk_end = jnp.cumsum(chunks)
  lane = jnp.arange(rows)
  flat_weights = weights.reshape(n)

  def body(c, acc):
    g = jnp.searchsorted(chunk_end, c, side="right")  # the group of chunk c
    done = (c - (chunk_end[g] - chunks[g])) * rows  # its pairs run by earlier chunks
    pos = starts[g] + done + lane
    valid = lane < counts[g] - done
    pair = order[jnp.minimum(pos, n - 1)]
    tok = pair // k
    y = slot_expert(expert, x[tok], pool, names, sorted_slots[starts[g]])  # [rows, D]
    terms = flat_weights[pair][:, None] * y
    return acc.at[pair % k, jnp.where(valid, tok, t)].set(terms, mode="drop")

  acc = jnp.zeros((k, *x.shape), jnp.float32)
  return jax.lax.fori_loop(0, chunk_end[-1], body, acc)


def sum_k(acc):
  """The K terms of each token added in routing order."""
  y = acc[0]
  for k in range(1, acc.shape[0]):
    y = y + acc[k]
  return y


def pallas_supports(pool, spec: MoeSpec) -> bool:
  """The Pallas kernels fuse SwiGLU experts and route dropless."""
  return set(pool) == {"w1", "w3", "w2"} and spec.capacity is None


def resolve(impl: Impl, pool=None, spec: MoeSpec | None = None) -> Impl:
  """AUTO -> routed off GPUs; on GPUs Pallas where `pallas_supports`, else ragged_dot."""
  if impl is not Impl.AUTO:
    return impl
  if jax.default_backend() != "gpu":
    return Impl.ROUTED
  if pool is not None and spec is not None and not pallas_supports(pool, spec):
    return Impl.RAGGED
  return Impl.PALLAS
