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
capacity applies (`drop_over_capacity`), for parity with transformers.

Products run in the weights' dtype with float32 accumulation; nothing makes a
float32 copy of the pool.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxmoe import buckets
from jaxmoe.axes import ArrayLike, Float, Int, checked
from jaxmoe.kernels.moe import moe_swiglu
from jaxmoe.nn import sharding


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


class MoeFn(Protocol):
  def __call__(self, x, router_logits, slot_map, pool, spec: MoeSpec) -> jax.Array: ...


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
  reinterpreted as its float type after it is sliced (`_slots`).
  """
  if jax.default_backend() != "cpu":
    return pool
  out = {}
  for n, w in pool.items():
    if jnp.issubdtype(w.dtype, jnp.floating) and jnp.dtype(w.dtype).itemsize == 2:
      w = np.asarray(w).view(np.uint16) if isinstance(w, np.ndarray) else jax.lax.bitcast_convert_type(w, jnp.uint16)
    out[n] = w
  return out


def _slots(pool: dict, names, index, dtype) -> list:
  """Each leaf's slot(s) `index` (a slot or an array of slots), reinterpreted from packed bits if needed."""
  out = []
  for n in names:
    w = pool[n][index]
    out.append(jax.lax.bitcast_convert_type(w, dtype) if w.dtype == jnp.uint16 else w)
  return out


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
  """Rows per expert program of `_grouped_terms`: a power of two about twice a slot's mean share of the
  (token, k) pairs, at most the tokens. Decode (few pairs per slot) reads each routed slot once; a
  prefill computes about the pairs it routes, not every token on every routed slot."""
  return buckets.pow2(2 * -(-num_tokens * k // num_experts), cap=num_tokens)


def _grouped_terms(x, slots, weights, pool, names, expert, bound: int, rows: int, absent: int | None = None):
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
    y = expert(x[tok], *_slots(pool, names, sorted_slots[starts[g]], x.dtype))  # [rows, D]
    terms = flat_weights[pair][:, None] * y
    return acc.at[pair % k, jnp.where(valid, tok, t)].set(terms, mode="drop")

  acc = jnp.zeros((k, *x.shape), jnp.float32)
  return jax.lax.fori_loop(0, chunk_end[-1], body, acc)


def _sum_k(acc):
  """The K terms of each token added in routing order."""
  y = acc[0]
  for k in range(1, acc.shape[0]):
    y = y + acc[k]
  return y


def moe_dense(x, router_logits, slot_map, pool, spec: MoeSpec):
  """Reference: run every pool slot on every token, keep the routed ones."""
  weights, experts = routing(router_logits, spec)
  slots = expert_slots(experts, slot_map)
  names, expert = expert_kind(pool)
  y = jnp.zeros(x.shape, jnp.float32)
  for s in range(num_slots(pool)):
    gate = jnp.sum(jnp.where(slots == s, weights, 0.0), axis=-1)  # [T]
    y = y + gate[:, None] * expert(x, *_slots(pool, names, s, x.dtype))
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
    y = y + gate[:, None] * expert(x, *_slots(pool, names, slot_map[e], x.dtype))
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
  acc = _grouped_terms(x, slots, weights, pool, names, expert, slot_bound(slots, pool, spec), rows)
  return _sum_k(acc).astype(x.dtype)


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

  ys = expert(x[token], *_slots(pool, names, uniq, x.dtype), dot=dot)
  ys = ys * weights.reshape(t * k)[order][:, None]
  return jnp.zeros((t, x.shape[1]), jnp.float32).at[token].add(ys).astype(x.dtype)


def pallas_supports(pool, spec: MoeSpec) -> bool:
  """The Pallas kernels fuse SwiGLU experts and route dropless."""
  return set(pool) == {"w1", "w3", "w2"} and spec.capacity is None


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


def resolve(impl: Impl, pool=None, spec: MoeSpec | None = None) -> Impl:
  """AUTO -> routed off GPUs; on GPUs Pallas where `pallas_supports`, else ragged_dot."""
  if impl is not Impl.AUTO:
    return impl
  if jax.default_backend() != "gpu":
    return Impl.ROUTED
  if pool is not None and spec is not None and not pallas_supports(pool, spec):
    return Impl.RAGGED
  return Impl.PALLAS


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


# Expert parallelism: the MoE boundary over a pool sharded by slot across the mesh's `expert` axis.
#
# Each device of the expert axis holds a contiguous block of Xl = X / n pool
# slots (which slots land together is the placement's choice,
# jaxmoe/serving/placement.py: the pool is permuted and the slot maps
# renumbered before the pool is sharded). Every device of an expert group sees
# the same tokens (the batch is split over `data` only), routes them (the router
# is replicated, so every device computes the same routing), computes the
# (token, k) pairs whose slots it holds and zeroes the rest, and one all-reduce
# (`psum` over `expert`) combines the groups: per token and layer, T x D float32.
#
# Exactness. Each (token, k) pair has exactly one nonzero term, computed by one
# device with the single-device program for its slot, so the all-reduce adds
# zeros to it. With K <= 2 the devices sum their pairs first and the all-reduce
# adds at most two nonzero float32 values (a + b = b + a exactly); with K > 2
# the [K, T, D] terms are reduced and summed in k order as on one device. The
# output is therefore bit-identical to the single-device `routed` and `dense`
# strategies on the same tokens; sharding the tokens over `data` changes only
# which rows each device multiplies.
#
# Bytes. The all-reduce moves 2 (n-1)/n x T x D x 4 bytes per device and layer;
# an all-to-all dispatch of the pairs and their return moves 2 (n-1)/n x T x K
# x D x itemsize: the same for K = 2 in bf16, and this needs no capacity
# factor, no token drops and no sorting (bench/mesh.py tabulates both).
#
# Strategies per shard: `dense` (the reference) and `routed` (the default
# elsewhere); the Pallas kernels route internally and cannot skip the pairs of
# other shards, and ragged_dot is left for later, so both run `routed` per
# shard.
#
# Expert features over `model`. A mesh's `model` axis splits every expert by
# its hidden features F instead (w1, w3, wi by their last dim, w2, wo by their
# first after the slot: `FEATURE_DIMS`), as tensor parallelism splits an MLP:
# a device holds 1 / n of every slot it holds, computes every pair of those
# slots over its F slice (silu and relu act per feature), and the same
# all-reduce, over `model` too, adds the slices' partial products. No device is
# busier than another (the load is even whatever the routing), at the price
# of exactness: the sum over F is split, so the output equals one device's to
# float rounding, not bit for bit. Both axes together: slots over `expert`,
# features over `model`.

EXPERT_AXIS = "expert"
MODEL_AXIS = "model"
FEATURE_DIMS = {"w1": 2, "w3": 2, "wi": 2, "w2": 1, "wo": 1}  # the F dim of each pool leaf [X, ...]


def _local_pairs(slots, weights, lo, num_local):
  """Pairs of slots [T, K] held here: (local slots, sentinel `num_local` elsewhere; weights zeroed there)."""
  here = (slots >= lo) & (slots < lo + num_local)
  return jnp.where(here, slots - lo, num_local), jnp.where(here, weights, 0.0)


def _terms_routed(x, local, weights, pool, spec, num_experts: int):
  """Per (k, token) float32 terms [K, T, D] of this shard's pairs (`_grouped_terms`, the rest skipped)."""
  names, expert = expert_kind(pool)
  num_local = num_slots(pool)
  bound = (
    min(local.size, num_local + 1) if spec.max_slots is None else min(local.size, num_local + 1, spec.max_slots + 1)
  )
  rows = chunk_rows(x.shape[0], spec.k, num_experts)
  return _grouped_terms(x, local, weights, pool, names, expert, bound, rows, absent=num_local)


def _terms_dense(x, local, weights, pool, spec, num_experts: int):
  """Per (k, token) terms [K, T, D]: every local slot on every token, kept where routed."""
  del spec, num_experts
  names, expert = expert_kind(pool)
  acc = jnp.zeros((local.shape[1], *x.shape), jnp.float32)
  for s in range(num_slots(pool)):
    gate = jnp.where(local == s, weights, 0.0).T  # [K, T]
    acc = acc + gate[:, :, None] * expert(x, *_slots(pool, names, s, x.dtype))[None]
  return acc


def moe_expert_parallel(x, router_logits, slot_map, pool, spec: MoeSpec):
  """`moe` with the pool's slots split over the context mesh's `expert` axis and its experts' features
  over `model` (either or both; see the comments above).

  Args and result as `jaxmoe.nn.moe.moe`; the pool's slot count must be a
  multiple of the expert axis' size (placement pads it).
  """
  mesh = sharding.context_mesh()
  slot_axis, feature_axis = sharding.mesh_axis("pool", mesh), sharding.mesh_axis("mlp", mesh)  # expert, model
  n = sharding.axes_size(mesh, slot_axis)
  reduce_axes = tuple(a for a in (slot_axis, feature_axis) if a is not None)
  x_slots = num_slots(pool)
  if x_slots % n:
    raise ValueError(f"the pool's {x_slots} slots do not split over expert:{n}; place it with jaxmoe.serving.placement")
  impl = resolve(spec.impl, pool, spec)
  terms = _terms_dense if impl is Impl.DENSE else _terms_routed
  per_row = slot_map.ndim == 2
  tokens = sharding.mesh_axis("batch", mesh)
  if tokens is not None and (x.shape[0] % mesh.shape[tokens] or spec.capacity is not None):
    tokens = None  # a batch data does not divide (a prefill of one), or capacity groups: every group computes all
  k = spec.k

  def shard(x, router_logits, slot_map, pool):
    weights, experts = routing(router_logits, spec)
    slots = expert_slots(experts, slot_map)
    num_local = num_slots(pool)
    if slot_axis is not None:
      local, weights = _local_pairs(slots, weights, jax.lax.axis_index(slot_axis) * num_local, num_local)
    else:
      local = slots
    acc = terms(x, local, weights, pool, spec, router_logits.shape[-1])
    if k <= 2:  # two nonzero float32 terms per token at most: their sum does not depend on the order
      return jax.lax.psum(_sum_k(acc), reduce_axes).astype(x.dtype)
    return _sum_k(jax.lax.psum(acc, reduce_axes)).astype(x.dtype)

  pool_specs = {name: pool_spec(name, slot_axis, feature_axis) for name in pool}
  run = jax.shard_map(
    shard,
    in_specs=(P(tokens), P(tokens), P(tokens) if per_row else P(), pool_specs),
    out_specs=P(tokens),
    check_vma=False,
  )
  return run(x, router_logits, slot_map, pool)


def pool_spec(name: str, slot_axis: str | None, feature_axis: str | None) -> P:
  """How a pool leaf [X, ...] is split: slots over `slot_axis`, its F dim over `feature_axis`."""
  dims = [slot_axis, None, None]
  if feature_axis is not None:
    dims[FEATURE_DIMS[name]] = feature_axis
  return P(*dims)


def all_reduce_bytes(tokens: int, d_model: int, n: int) -> float:
  """Bytes one device sends (and receives) in the ring all-reduce of one MoE layer's output."""
  return 2 * (n - 1) / n * tokens * d_model * 4


def all_to_all_bytes(tokens: int, d_model: int, k: int, n: int, itemsize: int) -> float:
  """Bytes one device sends for the dispatch and return all-to-alls of one MoE layer, uniform routing."""
  return 2 * (n - 1) / n * tokens * k * d_model * itemsize
