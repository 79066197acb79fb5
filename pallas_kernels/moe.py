"""The Pallas MoE strategy: fused routing, the tiled SwiGLU grouped matmul, a gather combine.

Registers `Impl.PALLAS` (compiled with the Triton backend, GPU) and
`Impl.PALLAS_INTERPRET` (the same kernels in interpret mode, any backend) with
`jaxmoe.moe`. Only the experts a batch routes to are read: the routing step
lays tokens out in tiles per pool slot, and the grouped matmul skips slots
that own no tile.

Axis legend: T tokens, D model dim, F ffn dim, E logical experts, S pool slots,
K top-k, M sorted rows.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxmoe.moe import Impl, MoeSpec, Router, register
from pallas_kernels.gmm import GmmConfig, num_row_tiles, swiglu
from pallas_kernels.routing import RouteConfig, route

_SMS = 132  # streaming multiprocessors of an H100/H200; an A100 has 108
_SHARED_MEMORY = 128 * 1024  # bytes of pipelined tiles per program; A100 allows 164 KiB


@dataclasses.dataclass(frozen=True)
class MoeKernelConfig:
  """Block sizes of the three kernels of one MoE layer; up and down share block_t."""

  route: RouteConfig
  up: GmmConfig  # fused w1/w3 + SwiGLU
  down: GmmConfig  # w2

  @classmethod
  def for_shape(cls, num_tokens: int, top_k: int, num_slots: int, d: int, f: int,
                itemsize: int = 2) -> MoeKernelConfig:
    """A heuristic pick, not yet tuned on hardware: small tiles and split-K for decode."""
    pairs = num_tokens * top_k
    per_slot = max(1, pairs // num_slots)
    bt = min(64, max(16, 1 << (per_slot - 1).bit_length()))
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


def moe_pallas(x, router_logits, slot_map, pool, spec: MoeSpec, *, interpret: bool = False,
               config: MoeKernelConfig | None = None):
  """Routed SwiGLU experts through the Pallas kernels; [T, D] in x's dtype."""
  t, d = x.shape
  num_slots, _, f = pool["w1"].shape
  k = spec.top_k if spec.router is Router.TOPK_RENORM else 1
  config = config or MoeKernelConfig.for_shape(t, k, num_slots, d, f, x.dtype.itemsize)
  r = route(router_logits, slot_map, num_slots=num_slots, top_k=k, router=spec.router,
            block_t=config.up.block_t, config=config.route, interpret=interpret)
  rows = x[r.row_token]  # [M, D]
  ys = swiglu(rows, pool["w1"], pool["w3"], pool["w2"], r.tile_group, up_config=config.up,
              down_config=config.down, interpret=interpret)  # [M, D] float32
  y = jnp.einsum("TK,TKD->TD", r.weights, ys[r.pair_row], precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)


@register(Impl.PALLAS)
def _moe_pallas_compiled(x, router_logits, slot_map, pool, spec: MoeSpec):
  return moe_pallas(x, router_logits, slot_map, pool, spec, interpret=False)


@register(Impl.PALLAS_INTERPRET)
def _moe_pallas_interpret(x, router_logits, slot_map, pool, spec: MoeSpec):
  return moe_pallas(x, router_logits, slot_map, pool, spec, interpret=True)
