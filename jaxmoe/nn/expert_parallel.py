"""Expert parallelism: the MoE boundary over a pool sharded by slot across the mesh's `expert` axis.

Each device of the expert axis holds a contiguous block of Xl = X / n pool
slots (which slots land together is the placement's choice,
jaxmoe/serving/placement.py: the pool is permuted and the slot maps
renumbered before the pool is sharded). Every device of an expert group sees
the same tokens (the batch is split over `data` only), routes them (the router
is replicated, so every device computes the same routing), computes the
(token, k) pairs whose slots it holds and zeroes the rest, and one all-reduce
(`psum` over `expert`) combines the groups: per token and layer, T x D float32.

Exactness. Each (token, k) pair has exactly one nonzero term, computed by one
device with the single-device program for its slot, so the all-reduce adds
zeros to it. With K <= 2 the devices sum their pairs first and the all-reduce
adds at most two nonzero float32 values (a + b = b + a exactly); with K > 2
the [K, T, D] terms are reduced and summed in k order as on one device. The
output is therefore bit-identical to the single-device `routed` and `dense`
strategies on the same tokens; sharding the tokens over `data` changes only
which rows each device multiplies.

Bytes. The all-reduce moves 2 (n-1)/n x T x D x 4 bytes per device and layer;
an all-to-all dispatch of the pairs and their return moves 2 (n-1)/n x T x K
x D x itemsize: the same for K = 2 in bf16, and this needs no capacity
factor, no token drops and no sorting (bench/mesh.py tabulates both).

Strategies per shard: `dense` (the reference) and `routed` (the default
elsewhere); the Pallas kernels route internally and cannot skip the pairs of
other shards, and ragged_dot is left for later, so both run `routed` per
shard.

Expert features over `model`. A mesh's `model` axis splits every expert by
its hidden features F instead (w1, w3, wi by their last dim, w2, wo by their
first after the slot: `FEATURE_DIMS`), as tensor parallelism splits an MLP:
a device holds 1 / n of every slot it holds, computes every pair of those
slots over its F slice (silu and relu act per feature), and the same
all-reduce, over `model` too, adds the slices' partial products. No device is
busier than another (the load is even whatever the routing), at the price
of exactness: the sum over F is split, so the output equals one device's to
float rounding, not bit for bit. Both axes together: slots over `expert`,
features over `model`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxmoe.nn import sharding
from jaxmoe.nn.moe_ops import (
  Impl,
  MoeSpec,
  chunk_rows,
  expert_kind,
  expert_slots,
  grouped_terms,
  num_slots,
  resolve,
  routing,
  slot_bound,
  slot_weights,
  sum_k,
)

EXPERT_AXIS = "expert"
MODEL_AXIS = "model"
FEATURE_DIMS = {"w1": 2, "w3": 2, "wi": 2, "w2": 1, "wo": 1}  # the F dim of each pool leaf [X, ...]


def _local_pairs(slots, weights, lo, num_local):
  """Pairs of slots [T, K] held here: (local slots, sentinel `num_local` elsewhere; weights zeroed there)."""
  here = (slots >= lo) & (slots < lo + num_local)
  return jnp.where(here, slots - lo, num_local), jnp.where(here, weights, 0.0)


def _terms_routed(x, local, weights, pool, spec, num_experts: int):
  """Per (k, token) float32 terms [K, T, D] of this shard's pairs (`grouped_terms`, the rest skipped)."""
  names, expert = expert_kind(pool)
  num_local = num_slots(pool)
  bound = min(slot_bound(local, pool, spec) + 1, local.size)  # one more: the sentinel of pairs held elsewhere
  rows = chunk_rows(x.shape[0], spec.k, num_experts)
  return grouped_terms(x, local, weights, pool, names, expert, bound, rows, absent=num_local)


def _terms_dense(x, local, weights, pool, spec, num_experts: int):
  """Per (k, token) terms [K, T, D]: every local slot on every token, kept where routed."""
  del spec, num_experts
  names, expert = expert_kind(pool)
  acc = jnp.zeros((local.shape[1], *x.shape), jnp.float32)
  for s in range(num_slots(pool)):
    gate = jnp.where(local == s, weights, 0.0).T  # [K, T]
    acc = acc + gate[:, :, None] * expert(x, *slot_weights(pool, names, s, x.dtype))[None]
  return acc


def moe_expert_parallel(x, router_logits, slot_map, pool, spec: MoeSpec):
  """`moe` with the pool's slots split over the context mesh's `expert` axis and its experts' features
  over `model` (either or both; see the module docstring).

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
      return jax.lax.psum(sum_k(acc), reduce_axes).astype(x.dtype)
    return sum_k(jax.lax.psum(acc, reduce_axes)).astype(x.dtype)

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
