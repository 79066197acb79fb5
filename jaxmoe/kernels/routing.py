"""Fused MoE routing: softmax, top-k, slot remap and a counting sort by slot.

Axis names (jaxmoe/axes.py): T tokens, E logical experts, X pool slots, K
top-k, R sorted rows (whole row tiles), W row tiles; a trailing p (Ep, Kp, Xp)
marks a size padded to a power of two, as the Triton backend requires of every
block.

The kernel takes one block of tokens per program. It computes the router
softmax, top-k by repeated argmax (ties go to the lower expert index, as in
`lax.top_k`), optionally renormalised (Mixtral; Switch's top-1 keeps the
probability), the tenant slot map
(logical expert -> pool slot), and its block's half of a counting sort: how
many (token, k) pairs of the block go to each slot, and each pair's rank among
the block's pairs bound for the same slot. A short jnp epilogue turns the
per-block counts into group sizes and tile-aligned group offsets, places each
pair at its sorted row, and builds the per-tile group metadata that
`gmm` reads in place of scalar prefetch, which Triton lacks.
Pairs keep (token, k) order within a slot, as a stable argsort would.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxmoe.kernels.gmm import num_row_tiles, pow2, tile_metadata


@dataclasses.dataclass(frozen=True)
class RouteConfig:
  """Launch parameters of the routing kernel."""

  block_tokens: int = 64  # tokens per program, a power of two >= 16
  num_warps: int = 4

  def __post_init__(self):
    if self.block_tokens < 16 or self.block_tokens & (self.block_tokens - 1):
      raise ValueError(f"block_tokens={self.block_tokens} must be a power of two >= 16")


class Routing(NamedTuple):
  """Everything the grouped matmul and the combine step need."""

  weights: jax.Array  # [T, K] float32 routing weight of each (token, k) pair
  slots: jax.Array  # [T, K] int32 pool slot of each pair
  group_sizes: jax.Array  # [X] int32 pairs routed to each slot
  group_offsets: jax.Array  # [X + 1] int32 first row of each slot's group; groups padded to tiles
  pair_row: jax.Array  # [T, K] int32 sorted row of each pair
  row_token: jax.Array  # [R] int32 token of each sorted row; 0 on padding rows
  tile_group: jax.Array  # [W] int32 slot of each row tile; -1 past the last used tile


def _route_kernel(
  logits_ref,  # [bt, Ep] float32, -inf on padded experts
  slot_map_ref,  # [Ep] or [bt, Ep] int32
  weights_ref,  # [bt, Kp] float32
  slots_ref,  # [bt, Kp] int32
  rank_ref,  # [bt, Kp] int32 rank among the block's pairs with the same slot
  counts_ref,  # [Xp] int32 the block's pairs per slot
  *,
  num_tokens: int,
  top_k: int,
  renormalise: bool,
):
  bt, ep = logits_ref.shape
  kp, sp = weights_ref.shape[1], counts_ref.shape[0]
  logits = logits_ref[...]
  e = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
  probs = e / jnp.sum(e, axis=1, keepdims=True)
  slot_map = slot_map_ref[...]
  if slot_map.ndim == 1:
    slot_map = jnp.broadcast_to(slot_map[None, :], (bt, ep))
  e_iota = jax.lax.broadcasted_iota(jnp.int32, (bt, ep), 1)
  k_iota = jax.lax.broadcasted_iota(jnp.int32, (bt, kp), 1)
  s_iota = jax.lax.broadcasted_iota(jnp.int32, (bt, sp), 1)
  token = pl.program_id(0) * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)
  valid = token < num_tokens  # [bt, 1] rows past T count for nothing

  weights = jnp.zeros((bt, kp), jnp.float32)
  slots = jnp.zeros((bt, kp), jnp.int32)
  onehots = []  # [bt, Xp] int32 per k
  for k in range(top_k):
    best = jnp.argmax(probs, axis=1).astype(jnp.int32)  # [bt]
    value = jnp.max(probs, axis=1)
    hit = e_iota == best[:, None]
    slot = jnp.sum(jnp.where(hit, slot_map, 0), axis=1)  # [bt]
    probs = jnp.where(hit, -1.0, probs)  # probabilities are >= 0: never picked again
    weights = jnp.where(k_iota == k, value[:, None], weights)
    slots = jnp.where(k_iota == k, slot[:, None], slots)
    onehots.append(((s_iota == slot[:, None]) & valid).astype(jnp.int32))
  if renormalise:
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)

  # Counting sort, block part: pairs are ordered by (token, k) within a slot.
  hist = sum(onehots[1:], onehots[0])  # [bt, Xp] this token's pairs per slot
  earlier = jnp.cumsum(hist, axis=0) - hist  # pairs of earlier tokens in the block
  rank = jnp.zeros((bt, kp), jnp.int32)
  for k in range(top_k):
    before = earlier + sum(onehots[:k], jnp.zeros_like(hist))  # + this token's earlier k
    r = jnp.sum(jnp.where(onehots[k] > 0, before, 0), axis=1)
    rank = jnp.where(k_iota == k, r[:, None], rank)

  weights_ref[...] = weights
  slots_ref[...] = slots
  rank_ref[...] = rank
  counts_ref[...] = jnp.sum(hist, axis=0)


def _route_call(router_logits, slot_map, *, num_slots, top_k, renormalise, config, interpret):
  """Checks inputs, pads to power-of-two blocks and runs the routing kernel."""
  t, e = router_logits.shape
  if slot_map.shape not in ((e,), (t, e)):
    raise ValueError(f"{slot_map.shape=} must be [E] or [T, E] with {router_logits.shape=}")
  if not jnp.issubdtype(slot_map.dtype, jnp.integer):
    raise ValueError(f"{slot_map.dtype=} must be an integer type")
  if not 1 <= top_k <= e:
    raise ValueError(f"{top_k=} must be in [1, E={e}]")
  bt = max(16, min(config.block_tokens, pow2(t, 2)))  # no tensors thinner than 16 rows in Triton
  num_blocks = pl.cdiv(t, bt)
  tp, ep, kp, sp = num_blocks * bt, pow2(e, 2), pow2(top_k, 2), pow2(num_slots, 2)  # no width-1 tensors in Triton
  logits = jnp.pad(router_logits.astype(jnp.float32), ((0, 0), (0, ep - e)), constant_values=-jnp.inf)
  logits = jnp.pad(logits, ((0, tp - t), (0, 0)))  # finite rows past T: no NaN in the kernel
  slot_map = slot_map.astype(jnp.int32)
  if slot_map.ndim == 1:
    slot_map = jnp.pad(slot_map, (0, ep - e))
    slot_map_spec = pl.BlockSpec((ep,), lambda i: (0,))
  else:
    slot_map = jnp.pad(slot_map, ((0, tp - t), (0, ep - e)))
    slot_map_spec = pl.BlockSpec((bt, ep), lambda i: (i, 0))
  pair_spec = pl.BlockSpec((bt, kp), lambda i: (i, 0))
  kernel = functools.partial(_route_kernel, num_tokens=t, top_k=top_k, renormalise=renormalise)
  weights, slots, rank, counts = pl.pallas_call(
    kernel,
    grid=(num_blocks,),
    in_specs=[pl.BlockSpec((bt, ep), lambda i: (i, 0)), slot_map_spec],
    out_specs=[pair_spec, pair_spec, pair_spec, pl.BlockSpec((None, sp), lambda i: (i, 0))],
    out_shape=[
      jax.ShapeDtypeStruct((tp, kp), jnp.float32),
      jax.ShapeDtypeStruct((tp, kp), jnp.int32),
      jax.ShapeDtypeStruct((tp, kp), jnp.int32),
      jax.ShapeDtypeStruct((num_blocks, sp), jnp.int32),
    ],
    compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=1),
    interpret=interpret,
    name="moe_route",
  )(logits, slot_map)
  return weights[:t, :top_k], slots[:t, :top_k], rank[:t, :top_k], counts[:, :num_slots], bt


@functools.partial(jax.jit, static_argnames=("num_slots", "top_k", "renormalise", "block_t", "config", "interpret"))
def route(
  router_logits: jax.Array,
  slot_map: jax.Array,
  *,
  num_slots: int,
  top_k: int,
  renormalise: bool = True,
  block_t: int = 16,
  config: RouteConfig = RouteConfig(),
  interpret: bool = False,
) -> Routing:
  """Routes tokens to pool slots and lays them out for the grouped matmul.

  Args:
    router_logits: [T, E] router outputs, any float dtype.
    slot_map: [E] or [T, E] int32, logical expert -> pool slot in [0, X).
    num_slots: X, the number of slots in the expert pool.
    top_k: K, experts per token.
    renormalise: divide the K weights by their sum (Mixtral); False keeps
      the softmax probabilities (Switch's top-1).
    block_t: rows per tile of the grouped matmul; every group starts on a tile.
    config: launch parameters of the routing kernel.
    interpret: run the kernel in Pallas interpret mode (CPU).

  Returns:
    A `Routing` whose sorted layout has R = W * block_t rows, W from
    `gmm.num_row_tiles(T * K, X, block_t)`.
  """
  t = router_logits.shape[0]
  weights, slots, rank, counts, bt = _route_call(
    router_logits,
    slot_map,
    num_slots=num_slots,
    top_k=top_k,
    renormalise=renormalise,
    config=config,
    interpret=interpret,
  )
  group_sizes = jnp.sum(counts, axis=0)
  earlier_blocks = jnp.cumsum(counts, axis=0) - counts  # [T / bt, X]
  num_tiles = num_row_tiles(t * top_k, num_slots, block_t)
  group_offsets, tile_group = tile_metadata(group_sizes, block_t=block_t, num_tiles=num_tiles)
  block = (jnp.arange(t) // bt)[:, None]
  pair_row = group_offsets[slots] + earlier_blocks[block, slots] + rank
  return _finish(weights, slots, group_sizes, group_offsets, pair_row, tile_group, block_t)


def _finish(weights, slots, group_sizes, group_offsets, pair_row, tile_group, block_t):
  t, k = slots.shape
  tokens = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[:, None], (t, k))
  row_token = jnp.zeros(tile_group.shape[0] * block_t, jnp.int32)
  row_token = row_token.at[pair_row.reshape(-1)].set(tokens.reshape(-1))
  return Routing(weights, slots, group_sizes, group_offsets, pair_row.astype(jnp.int32), row_token, tile_group)


def route_reference(
  router_logits: jax.Array,
  slot_map: jax.Array,
  *,
  num_slots: int,
  top_k: int,
  renormalise: bool = True,
  block_t: int = 16,
) -> Routing:
  """Pure jnp `route`: softmax, `lax.top_k`, the slot map, and a stable argsort."""
  t = router_logits.shape[0]
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if renormalise:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  slot_map = slot_map.astype(jnp.int32)
  slots = slot_map[experts] if slot_map.ndim == 1 else jnp.take_along_axis(slot_map, experts, axis=-1)
  flat = slots.reshape(-1)
  group_sizes = jnp.bincount(flat, length=num_slots).astype(jnp.int32)
  num_tiles = num_row_tiles(t * top_k, num_slots, block_t)
  group_offsets, tile_group = tile_metadata(group_sizes, block_t=block_t, num_tiles=num_tiles)
  order = jnp.argsort(flat, stable=True)
  position = jnp.zeros_like(flat).at[order].set(jnp.arange(flat.shape[0], dtype=flat.dtype))
  starts = jnp.cumsum(group_sizes) - group_sizes  # unpadded group starts
  pair_row = (group_offsets[flat] + position - starts[flat]).reshape(t, top_k)
  return _finish(weights, slots, group_sizes, group_offsets, pair_row, tile_group, block_t)
