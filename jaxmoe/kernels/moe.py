"""One routed SwiGLU MoE layer from the kernels: fused routing, the tiled grouped matmul, a combine.

`jaxmoe.nn.moe` registers `moe_swiglu` as its Pallas strategies (compiled
with the Triton backend on GPUs, or in interpret mode anywhere). Only the
experts a batch routes to are read: the routing step lays tokens out in tiles
per pool slot, and the grouped matmul skips slots that own no tile.

Axis names (jaxmoe/axes.py): T tokens, D model dim, F ffn dim, E logical
experts, X pool slots, K top-k, R sorted rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmoe.kernels.gmm import GmmConfig, num_row_tiles, pow2, swiglu
from jaxmoe.kernels.routing import RouteConfig, route

_SMS = 132  # streaming multiprocessors of an H100/H200; an A100 has 108
_SHARED_MEMORY = 128 * 1024  # bytes of pipelined tiles per program; A100 allows 164 KiB


@dataclasses.dataclass(frozen=True)
class MoeKernelConfig:
  """Block sizes of the three kernels of one MoE layer; up and down share block_t."""

  route: RouteConfig
  up: GmmConfig  # fused w1/w3 + SwiGLU
  down: GmmConfig  # w2

  @classmethod
  def for_shape(cls, num_tokens: int, top_k: int, num_slots: int, d: int, f: int, itemsize: int = 2) -> MoeKernelConfig:
    """A heuristic pick, not yet tuned on hardware: small tiles and split-K for decode."""
    pairs = num_tokens * top_k
    per_slot = max(1, pairs // num_slots)
    bt = min(64, pow2(per_slot, 16))
    if bt <= 16:  # decode: few rows; stream the routed experts' weights with many programs
      up = GmmConfig(block_t=bt, block_n=64, block_k=128, num_warps=4, num_stages=4)
    else:  # two [bt, bn] float32 accumulators: 8 warps keep them in registers
      up = GmmConfig(block_t=bt, block_n=128, block_k=64, num_warps=8, num_stages=3)
    up = _fit_shared_memory(up, itemsize, rhs_blocks=2)
    down = _fit_shared_memory(dataclasses.replace(up, num_warps=4), itemsize, rhs_blocks=1)
    tiles = num_row_tiles(pairs, num_slots, bt)
    programs = tiles * -(-d // down.block_n)
    splits = max(1, min(8, -(-f // down.block_k), -(-2 * _SMS // programs)))
    return cls(route=RouteConfig(), up=up, down=dataclasses.replace(down, k_splits=splits))


def _fit_shared_memory(config: GmmConfig, itemsize: int, rhs_blocks: int) -> GmmConfig:
  """Fewer stages, then narrower blocks, until the pipelined tiles fit in shared memory."""

  def footprint(c):
    per_stage = (c.block_t * c.block_k + rhs_blocks * c.block_k * c.block_n) * itemsize
    return per_stage * c.num_stages

  while footprint(config) > _SHARED_MEMORY and config.num_stages > 2:
    config = dataclasses.replace(config, num_stages=config.num_stages - 1)
  while footprint(config) > _SHARED_MEMORY and config.block_n > 16:
    config = dataclasses.replace(config, block_n=config.block_n // 2)
  return config


def moe_swiglu(
  x,
  router_logits,
  slot_map,
  w1,
  w3,
  w2,
  *,
  top_k: int,
  renormalise: bool = True,
  interpret: bool = False,
  config: MoeKernelConfig | None = None,
):
  """Routed SwiGLU experts through the Pallas kernels.

  Args:
    x: [T, D] token activations.
    router_logits: [T, E] router outputs.
    slot_map: [E] or [T, E] int32, logical expert -> pool slot.
    w1, w3: [X, D, F] gate and up projections of the pool; w2: [X, F, D].
    top_k: K experts per token; `renormalise` divides their weights by their sum.
    interpret: run the kernels in Pallas interpret mode (CPU tests).
    config: block sizes; default `MoeKernelConfig.for_shape`.

  Returns:
    [T, D] in x's dtype.
  """
  t, d = x.shape
  num_slots, _, f = w1.shape
  config = config or MoeKernelConfig.for_shape(t, top_k, num_slots, d, f, x.dtype.itemsize)
  r = route(
    router_logits,
    slot_map,
    num_slots=num_slots,
    top_k=top_k,
    renormalise=renormalise,
    block_t=config.up.block_t,
    config=config.route,
    interpret=interpret,
  )
  rows = x[r.row_token]  # [R, D]
  ys = swiglu(
    rows, w1, w3, w2, r.tile_group, up_config=config.up, down_config=config.down, interpret=interpret
  )  # [R, D] float32
  y = jnp.einsum("TK,TKD->TD", r.weights, ys[r.pair_row], precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)
