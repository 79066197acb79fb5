"""Grouped matmul over an expert pool that skips empty groups (Pallas, Triton backend).

Axis names (jaxmoe/axes.py): R rows sorted by group, I contraction, O output
columns, X groups (pool slots), W row tiles; for the SwiGLU expert D model dim
and F ffn dim. This package imports nothing of jaxmoe: each kernel sits beside
its pure jnp reference.

Layout: rows are sorted by group and each group is padded to whole tiles of
`block_t` rows, so every tile belongs to one group and `tile_group[i]` names it
(-1 past the last used tile). This is megablox's make_group_metadata made
simpler by the padding, and it stands in for scalar prefetch, which the Triton
backend lacks: each program reads its tile's group from `tile_group` and
offsets into the pool by hand. The grid has a static bound of tiles
(`num_row_tiles`); a program on an unused tile writes zeros and reads no
weights, and a group with no rows owns no tile, so its weights are never read.
Inputs are bf16 (or float32); products accumulate in float32.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _is_pow2(n: int) -> bool:
  return n > 0 and not n & (n - 1)


def pow2(n: int, floor: int = 1) -> int:
  """The smallest power of two >= n and >= floor (this leaf package's copy of jaxmoe.buckets.pow2)."""
  return max(floor, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class GmmConfig:
  """Block sizes and launch parameters of one grouped matmul."""

  block_t: int = 16  # rows per tile; tensor-core dots need >= 16
  block_n: int = 64  # output columns per program
  block_k: int = 64  # contraction step
  k_splits: int = 1  # split-K partitions, summed after the kernel (gmm only, not the SwiGLU)
  num_warps: int = 4
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_t", "block_n", "block_k"):
      value = getattr(self, name)
      if value < 16 or not _is_pow2(value):
        raise ValueError(f"{name}={value} must be a power of two >= 16")
    if self.k_splits < 1:
      raise ValueError(f"k_splits={self.k_splits} must be >= 1")


def num_row_tiles(num_rows: int, num_groups: int, block_t: int) -> int:
  """Static bound on the tiles of `num_rows` rows in at most `num_groups` nonempty groups."""
  busy = min(num_groups, num_rows)  # groups that can own a tile
  return max(1, (num_rows + busy * (block_t - 1)) // block_t)


def tile_metadata(group_sizes: jax.Array, *, block_t: int, num_tiles: int):
  """Group sizes [X] -> (group_offsets [X + 1], tile_group [W]) of the tiled layout."""
  padded = (group_sizes + block_t - 1) // block_t * block_t
  group_offsets = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(padded).astype(jnp.int32)])
  start = jnp.arange(num_tiles, dtype=jnp.int32) * block_t
  # The group of a tile is the number of groups ending at or before its first row;
  # empty groups end where they start, so no tile lands on them.
  group = jnp.sum(group_offsets[None, 1:] <= start[:, None], axis=1).astype(jnp.int32)
  return group_offsets, jnp.where(start < group_offsets[-1], group, -1)


def _in_bounds(start, size: int, dim: int):
  """[size] mask of indices start + arange(size) < dim; None when blocks tile dim exactly."""
  return None if dim % size == 0 else start + jnp.arange(size) < dim


def _outer_and(row_ok, col_ok):
  if row_ok is None and col_ok is None:
    return None
  if row_ok is None:
    return col_ok[None, :]
  if col_ok is None:
    return row_ok[:, None]
  return row_ok[:, None] & col_ok[None, :]


def _load(ref, mask):
  return plgpu.load(ref, mask=mask, other=0.0 if mask is not None else None)


def _gmm_kernel(
  tile_group_ref,  # [W] int32 group of each row tile, -1 unused
  lhs_ref,  # [bt, I] this tile's rows
  rhs_ref,  # [X, I, O] the whole pool; only rhs[tile_group[i]] is read
  out_ref,  # [bt, bn] split c's partial product
  *,
  block_k: int,
  steps_per_split: int,
  precision,
):
  i, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  bt, bn = out_ref.shape
  k_dim, n_dim = rhs_ref.shape[1:]
  g = tile_group_ref[i]
  col_ok = _in_bounds(j * bn, bn, n_dim)
  out_mask = _outer_and(None, col_ok)

  @pl.when(g >= 0)
  def _():
    def body(kb, acc):
      k0 = pl.multiple_of(kb * block_k, block_k)
      k_ok = _in_bounds(k0, block_k, k_dim)
      a = _load(lhs_ref.at[:, pl.ds(k0, block_k)], _outer_and(None, k_ok))
      b = _load(rhs_ref.at[g, pl.ds(k0, block_k), pl.ds(j * bn, bn)], _outer_and(k_ok, col_ok))
      return acc + jnp.dot(a, b, preferred_element_type=jnp.float32, precision=precision)

    k_blocks = pl.cdiv(k_dim, block_k)
    if steps_per_split >= k_blocks:  # one split: static bounds, the pipeliner's best case
      first, last = 0, k_blocks
    else:
      first = c * steps_per_split
      last = jnp.minimum(first + steps_per_split, k_blocks)
    acc = jax.lax.fori_loop(first, last, body, jnp.zeros((bt, bn), jnp.float32))
    plgpu.store(out_ref, acc.astype(out_ref.dtype), mask=out_mask)

  @pl.when(g < 0)
  def _():
    plgpu.store(out_ref, jnp.zeros((bt, bn), out_ref.dtype), mask=out_mask)


def _swiglu_up_kernel(
  tile_group_ref,  # [W] int32 group of each row tile, -1 unused
  x_ref,  # [bt, D] this tile's rows
  w1_ref,  # [X, D, F] gate projections of the pool
  w3_ref,  # [X, D, F] up projections of the pool
  h_ref,  # [bt, bf] silu(x w1) * (x w3) in x's dtype
  *,
  block_k: int,
  precision,
):
  i, j = pl.program_id(0), pl.program_id(1)
  bt, bf = h_ref.shape
  d_dim, f_dim = w1_ref.shape[1:]
  g = tile_group_ref[i]
  col_ok = _in_bounds(j * bf, bf, f_dim)
  out_mask = _outer_and(None, col_ok)

  @pl.when(g >= 0)
  def _():
    def body(kb, carry):
      gate, up = carry
      k0 = pl.multiple_of(kb * block_k, block_k)
      k_ok = _in_bounds(k0, block_k, d_dim)
      x = _load(x_ref.at[:, pl.ds(k0, block_k)], _outer_and(None, k_ok))
      w_mask = _outer_and(k_ok, col_ok)
      w1 = _load(w1_ref.at[g, pl.ds(k0, block_k), pl.ds(j * bf, bf)], w_mask)
      w3 = _load(w3_ref.at[g, pl.ds(k0, block_k), pl.ds(j * bf, bf)], w_mask)
      gate += jnp.dot(x, w1, preferred_element_type=jnp.float32, precision=precision)
      up += jnp.dot(x, w3, preferred_element_type=jnp.float32, precision=precision)
      return gate, up

    zeros = jnp.zeros((bt, bf), jnp.float32)
    gate, up = jax.lax.fori_loop(0, pl.cdiv(d_dim, block_k), body, (zeros, zeros))
    h = gate * jax.nn.sigmoid(gate) * up  # SwiGLU: silu(gate) * up
    plgpu.store(h_ref, h.astype(h_ref.dtype), mask=out_mask)

  @pl.when(g < 0)
  def _():
    plgpu.store(h_ref, jnp.zeros((bt, bf), h_ref.dtype), mask=out_mask)


def _precision(dtype):
  # Triton would otherwise run float32 dots in TF32.
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _check_tiled(lhs, rhs, tile_group, config: GmmConfig):
  if lhs.ndim != 2 or rhs.ndim != 3 or lhs.shape[1] != rhs.shape[1]:
    raise ValueError(f"{lhs.shape=} and {rhs.shape=} must be [R, I] and [X, I, O]")
  if lhs.dtype != rhs.dtype or lhs.dtype not in (jnp.bfloat16, jnp.float16, jnp.float32):
    raise ValueError(f"{lhs.dtype=} and {rhs.dtype=} must match and be bf16, f16 or f32")
  if tile_group.ndim != 1 or tile_group.dtype != jnp.int32:
    raise ValueError(f"{tile_group.shape=} {tile_group.dtype=} must be [W] int32")
  if lhs.shape[0] != tile_group.shape[0] * config.block_t:
    raise ValueError(f"{lhs.shape=} must have W * block_t rows, {tile_group.shape=} {config.block_t=}")


def _gmm_call(lhs, rhs, tile_group, config: GmmConfig, out_dtype, interpret):
  """Checks inputs, builds the BlockSpecs and runs the grouped matmul kernel."""
  _check_tiled(lhs, rhs, tile_group, config)
  (m, k), (s, _, n), nt = lhs.shape, rhs.shape, tile_group.shape[0]
  bt, bn, bk = config.block_t, config.block_n, config.block_k
  k_blocks = pl.cdiv(k, bk)
  splits = min(config.k_splits, k_blocks)
  steps = pl.cdiv(k_blocks, splits)
  part_dtype = jnp.float32 if splits > 1 else out_dtype
  kernel = functools.partial(_gmm_kernel, block_k=bk, steps_per_split=steps, precision=_precision(lhs.dtype))
  out = pl.pallas_call(
    kernel,
    grid=(nt, pl.cdiv(n, bn), splits),
    in_specs=[
      pl.BlockSpec((nt,), lambda i, j, c: (0,)),
      pl.BlockSpec((bt, k), lambda i, j, c: (i, 0)),
      pl.BlockSpec((s, k, n), lambda i, j, c: (0, 0, 0)),
    ],
    out_specs=pl.BlockSpec((None, bt, bn), lambda i, j, c: (c, i, j)),
    out_shape=jax.ShapeDtypeStruct((splits, m, n), part_dtype),
    compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
    interpret=interpret,
    name="gmm",
  )(tile_group, lhs, rhs)
  return out[0] if splits == 1 else jnp.sum(out, axis=0).astype(out_dtype)


def _swiglu_up_call(x, w1, w3, tile_group, config: GmmConfig, interpret):
  """Checks inputs, builds the BlockSpecs and runs the fused gate/up kernel."""
  _check_tiled(x, w1, tile_group, config)
  if w3.shape != w1.shape or w3.dtype != w1.dtype:
    raise ValueError(f"{w1.shape=} {w1.dtype=} must equal {w3.shape=} {w3.dtype=}")
  (m, d), (s, _, f), nt = x.shape, w1.shape, tile_group.shape[0]
  bt, bf = config.block_t, config.block_n
  pool_spec = pl.BlockSpec((s, d, f), lambda i, j: (0, 0, 0))
  kernel = functools.partial(_swiglu_up_kernel, block_k=config.block_k, precision=_precision(x.dtype))
  return pl.pallas_call(
    kernel,
    grid=(nt, pl.cdiv(f, bf)),
    in_specs=[
      pl.BlockSpec((nt,), lambda i, j: (0,)),
      pl.BlockSpec((bt, d), lambda i, j: (i, 0)),
      pool_spec,
      pool_spec,
    ],
    out_specs=pl.BlockSpec((bt, bf), lambda i, j: (i, j)),
    out_shape=jax.ShapeDtypeStruct((m, f), x.dtype),
    compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
    interpret=interpret,
    name="swiglu_up",
  )(tile_group, x, w1, w3)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "interpret"))
def gmm_tiled(
  lhs: jax.Array,
  rhs: jax.Array,
  tile_group: jax.Array,
  *,
  config: GmmConfig = GmmConfig(),
  out_dtype=jnp.float32,
  interpret: bool = False,
) -> jax.Array:
  """Grouped matmul on the tiled layout: tile i of lhs times rhs[tile_group[i]].

  Args:
    lhs: [R, I] rows sorted by group, each group padded to whole tiles, R = W * block_t.
    rhs: [X, I, O] one matrix per group (the expert pool).
    tile_group: [W] int32 group of each row tile; -1 skips the tile.
    config: block sizes and launch parameters.
    out_dtype: dtype of the result; accumulation is float32 regardless.
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    [R, O]; rows of skipped tiles are zero.
  """
  return _gmm_call(lhs, rhs, tile_group, config, jnp.dtype(out_dtype), interpret)


def _tiled_rows(group_sizes, group_offsets, num_rows):
  """[R] row of each ragged row in the tiled layout; group_offsets[-1] past the groups."""
  ends = jnp.cumsum(group_sizes)
  row = jnp.arange(num_rows, dtype=jnp.int32)
  group = jnp.sum(ends[None, :] <= row[:, None], axis=1)
  starts = jnp.concatenate([jnp.zeros(1, ends.dtype), ends])
  inside = group < group_sizes.shape[0]
  group = jnp.minimum(group, group_sizes.shape[0] - 1)
  return jnp.where(inside, group_offsets[group] + row - starts[group], jnp.iinfo(jnp.int32).max)


@functools.partial(jax.jit, static_argnames=("config", "out_dtype", "interpret"))
def gmm(
  lhs: jax.Array,
  rhs: jax.Array,
  group_sizes: jax.Array,
  *,
  config: GmmConfig = GmmConfig(),
  out_dtype=jnp.float32,
  interpret: bool = False,
) -> jax.Array:
  """Grouped matmul with `jax.lax.ragged_dot` semantics; empty groups read nothing.

  Args:
    lhs: [R, I] rows sorted by group: group s owns group_sizes[s] consecutive rows.
    rhs: [X, I, O] one matrix per group.
    group_sizes: [X] int32 rows per group, summing to at most R.
    config: block sizes and launch parameters.
    out_dtype: dtype of the result; accumulation is float32 regardless.
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    [R, O]; rows past sum(group_sizes) are zero.
  """
  if group_sizes.shape != rhs.shape[:1]:
    raise ValueError(f"{group_sizes.shape=} must be [X] with {rhs.shape=}")
  m, k = lhs.shape
  nt = num_row_tiles(m, rhs.shape[0], config.block_t)
  group_offsets, tile_group = tile_metadata(group_sizes.astype(jnp.int32), block_t=config.block_t, num_tiles=nt)
  rows = _tiled_rows(group_sizes.astype(jnp.int32), group_offsets, m)
  tiled = jnp.zeros((nt * config.block_t, k), lhs.dtype).at[rows].set(lhs, mode="drop")
  out = _gmm_call(tiled, rhs, tile_group, config, jnp.dtype(out_dtype), interpret)
  return out.at[rows].get(mode="fill", fill_value=0)


@functools.partial(jax.jit, static_argnames=("up_config", "down_config", "interpret"))
def swiglu(
  x: jax.Array,
  w1: jax.Array,
  w3: jax.Array,
  w2: jax.Array,
  tile_group: jax.Array,
  *,
  up_config: GmmConfig = GmmConfig(),
  down_config: GmmConfig | None = None,
  interpret: bool = False,
) -> jax.Array:
  """The SwiGLU expert on the tiled layout: (silu(x w1) * (x w3)) w2 per group.

  Args:
    x: [R, D] token rows sorted by slot, each group padded to whole tiles.
    w1: [X, D, F] gate projections of the pool.
    w3: [X, D, F] up projections of the pool.
    w2: [X, F, D] down projections of the pool.
    tile_group: [W] int32 slot of each row tile; -1 skips the tile.
    up_config: blocks of the fused gate/up kernel (its k_splits is ignored).
    down_config: blocks of the down projection; defaults to up_config. Both
      must share block_t.
    interpret: run in Pallas interpret mode (CPU).

  Returns:
    [R, D] float32; the hidden activation is rounded to x's dtype in between,
    as in `swiglu_expert_reference`. Rows of skipped tiles are zero.
  """
  down_config = down_config or up_config
  if down_config.block_t != up_config.block_t:
    raise ValueError(f"{up_config.block_t=} must equal {down_config.block_t=}")
  if w2.shape != (w1.shape[0], w1.shape[2], w1.shape[1]) or w2.dtype != w1.dtype:
    raise ValueError(f"{w2.shape=} {w2.dtype=} must be [X, F, D] like {w1.shape=} {w1.dtype=}")
  h = _swiglu_up_call(x, w1, w3, tile_group, up_config, interpret)
  return _gmm_call(h, w2, tile_group, down_config, jnp.dtype(jnp.float32), interpret)


def gmm_reference(lhs, rhs, group_sizes, out_dtype=jnp.float32):
  """Pure jnp `gmm`: every group's matmul on every row, masked to its own rows."""
  ends = jnp.cumsum(group_sizes)
  row = jnp.arange(lhs.shape[0])
  out = jnp.zeros((lhs.shape[0], rhs.shape[2]), jnp.float32)
  for s in range(rhs.shape[0]):
    mine = (row >= ends[s] - group_sizes[s]) & (row < ends[s])
    prod = jnp.einsum("RI,IO->RO", lhs, rhs[s], preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    out = jnp.where(mine[:, None], prod, out)
  return out.astype(out_dtype)


def swiglu_expert_reference(x, w1, w3, w2):
  """One SwiGLU expert, (silu(x w1) * (x w3)) w2, float32 accumulation, hidden in x's dtype."""
  dot = lambda a, w: jnp.matmul(a, w, preferred_element_type=jnp.float32)  # noqa: E731
  h = (jax.nn.silu(dot(x, w1)) * dot(x, w3)).astype(x.dtype)
  return dot(h, w2)


def swiglu_reference(x, w1, w3, w2, tile_group, *, block_t: int):
  """Pure jnp `swiglu`: `swiglu_expert_reference` per slot, each on its own tiles."""
  row_group = jnp.repeat(tile_group, block_t)
  out = jnp.zeros(x.shape, jnp.float32)
  for s in range(w1.shape[0]):
    y = swiglu_expert_reference(x, w1[s], w3[s], w2[s])
    out = jnp.where((row_group == s)[:, None], y, out)
  return out
