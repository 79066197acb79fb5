"""A paged KV cache: fixed-size pages shared by every row, reached through each row's block table.

One pool per cache kind holds the pages of every layer: k and v are
[M, L * P, Q, H] (kv heads, L layers of P pages, Q positions per page, head
dim), layer l's page p at index l * P + p. Keeping the layer inside the page
index lets every layer read and write the whole pool through its block table,
so neither a scan over layers nor the Pallas kernel copies a layer's pages out.
Row b's position s lives at page tables[b, s // Q], offset s % Q. Page 0 is a
scratch page no sequence owns: unused table entries and idle rows point at it.

Attention over pages costs what the table slice given to it holds: callers pass
tables[:, :n] with n pages enough for the longest row (a few static buckets),
so a step's work follows the actual lengths, not the configured maximum.

Pages over a mesh's `data` axis. A cache of `shards` > 1 holds that many
blocks of pages along the pool's second dim, one per data shard, each laid out
as above ([M, L * P, Q, H], its own scratch page 0 included): global page g is
page g % P of shard g // P, and a row's pages all lie in one shard (the
engine's allocator, jaxmoe/serving/pages.py). `write` and `per_row` run under
a `shard_map` over `data`: each shard sees its own block of pages and every
row, maps the tables to its own pages (pages elsewhere to its scratch page),
writes and reads only the rows it holds, and `per_row` adds the shards'
results, zero for the rows a shard does not hold, so they are exact. A device
thus holds 1 / shards of the cache and reads only its rows' pages.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental.pallas.ops.gpu import paged_attention as pallas_paged
from jax.sharding import PartitionSpec as P

from jaxmoe.axes import ArrayLike, Float, Int, checked
from jaxmoe.nn import sharding
from jaxmoe.nn.attention import causal_mask, gqa_attention
from jaxmoe.nn.sampling import SamplingParams

SCRATCH_PAGE = 0
DATA_AXIS = "data"
_BLOCKS = P(None, DATA_AXIS)  # a pool [M, S * L * P, Q, H] split into its data shards' blocks of pages


@struct.dataclass
class PagedKV:
  """Keys and values of every layer, in pages."""

  k: jax.Array  # [M, S * L * P, Q, H]
  v: jax.Array  # [M, S * L * P, Q, H]
  pages_per_layer: int = struct.field(pytree_node=False)  # P, in each shard
  shards: int = struct.field(pytree_node=False, default=1)  # S blocks of pages, over the mesh's `data` axis

  @property
  def page_size(self) -> int:
    return self.k.shape[2]


@struct.dataclass
class Rows:
  """The decode state of a batch's rows on the device: where their keys are, how long they are, how they sample.

  It changes only when rows change (the engine uploads it then); each decode
  step advances the lengths and sampling steps of the active rows itself.
  """

  tables: jax.Array  # [B, n] int32 pages of each row (0: scratch), n a static bucket
  lengths: jax.Array  # [B] int32 positions filled (the next token goes at this position)
  active: jax.Array  # [B] bool rows holding a sequence
  sampling: SamplingParams
  cross_tables: jax.Array | None = None  # [B, c] encoder-decoder: pages of the encoder keys/values
  enc_lengths: jax.Array | None = None  # [B] int32 encoder-decoder: valid encoder positions

  def advance(self) -> Rows:
    return self.replace(
      lengths=self.lengths + self.active.astype(jnp.int32), sampling=self.sampling.advance(self.active)
    )


def init(num_layers: int, pages_per_layer: int, page_size: int, heads: int, head_dim: int, dtype) -> PagedKV:
  shape = (heads, num_layers * pages_per_layer, page_size, head_dim)
  return PagedKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), pages_per_layer)


def placed(kv: PagedKV, mesh, shards: int, by_head: bool = False) -> PagedKV:
  """An empty cache shaped like `kv` (one shard's pages), `shards` times over, on `mesh`: the pages split
  over its data axis and, `by_head`, the heads over the axes that split k and v (jaxmoe/nn/sharding.py)."""

  def zeros(x):
    shape = (x.shape[0], shards * x.shape[1], *x.shape[2:])
    target = sharding.fitting(mesh, shape, "heads" if by_head else None, "pages" if shards > 1 else None)
    return jax.jit(lambda: jnp.zeros(shape, x.dtype), out_shardings=target)()

  return PagedKV(zeros(kv.k), zeros(kv.v), kv.pages_per_layer, shards)


def page_bytes(num_layers: int, page_size: int, heads: int, head_dim: int, itemsize: int) -> int:
  """Bytes of one page across every layer, keys and values (what a row's page costs)."""
  return 2 * num_layers * heads * page_size * head_dim * itemsize


def _locate(kv: PagedKV, layer, tables, positions):
  """Pool page and offset of positions [B, T] of each row, in layer `layer`."""
  q = kv.page_size
  pages = jnp.take_along_axis(tables, positions // q, axis=1, mode="clip")  # [B, T]
  return layer * kv.pages_per_layer + pages, positions % q


def _write(kv: PagedKV, layer, tables, positions, k, v) -> PagedKV:
  page, offset = _locate(kv, layer, tables, positions)
  to_pool = lambda x: jnp.transpose(x, (2, 0, 1, 3)).astype(kv.k.dtype)  # [M, B, T, H]
  return kv.replace(k=kv.k.at[:, page, offset].set(to_pool(k)), v=kv.v.at[:, page, offset].set(to_pool(v)))


def _shard_tables(tables, pages_per_layer: int):
  """Inside the shard_map over `data`: (tables in this shard's pages, others -> scratch; [B] rows held here).

  A row is held where its first page is; idle rows (all scratch) by shard 0.
  """
  lo = jax.lax.axis_index(DATA_AXIS) * pages_per_layer
  here = (tables >= lo) & (tables < lo + pages_per_layer)
  return jnp.where(here, tables - lo, SCRATCH_PAGE), here[:, 0]


def _over_shards(body, kv: PagedKV, out_specs, *args):
  """body(k, v, *args) per data shard: k, v their shard's block of pages, every other argument whole."""
  run = jax.shard_map(
    body,
    in_specs=(_BLOCKS, _BLOCKS, *(P() for _ in args)),
    out_specs=out_specs,
    axis_names={DATA_AXIS},  # manual over `data` only: heads split over other axes stay the partitioner's
    check_vma=False,
  )
  return run(kv.k, kv.v, *args)


@checked
def write(
  kv: PagedKV,
  layer,
  tables: Int[ArrayLike, "B W"],
  positions: Int[ArrayLike, "B T"],
  k: Float[jax.Array, "B T M H"],
  v: Float[jax.Array, "B T M H"],
) -> PagedKV:
  """Writes new keys/values [B, T, M, H] at each row's positions [B, T] of layer `layer`."""
  if kv.shards == 1:
    return _write(kv, layer, tables, positions, k, v)

  def body(pk, pv, layer, tables, positions, k, v):
    local, _ = _shard_tables(tables, kv.pages_per_layer)
    out = _write(PagedKV(pk, pv, kv.pages_per_layer), layer, local, positions, k, v)
    return out.k, out.v

  new_k, new_v = _over_shards(body, kv, (_BLOCKS, _BLOCKS), layer, jnp.asarray(tables), positions, k, v)
  return kv.replace(k=new_k, v=new_v)


def per_row(fn: Callable, kv: PagedKV, layer, tables, *args) -> jax.Array:
  """fn(kv, layer, tables, *args) -> per-row results [B, ...] of reading the rows' pages.

  On one shard, fn itself. Over `data` shards each shard runs fn on its own
  pages (`kv` its block, `tables` mapped to it), keeps the rows it holds, zeroes
  the others, and the shards' results are added: each row's result is its own
  shard's, exactly.
  """
  if kv.shards == 1:
    return fn(kv, layer, tables, *args)

  def body(pk, pv, layer, tables, *args):
    local, held = _shard_tables(tables, kv.pages_per_layer)
    out = fn(PagedKV(pk, pv, kv.pages_per_layer), layer, local, *args)
    out = jnp.where(held.reshape(-1, *(1,) * (out.ndim - 1)), out, jnp.zeros((), out.dtype))
    return jax.lax.psum(out, DATA_AXIS)

  return _over_shards(body, kv, P(), layer, jnp.asarray(tables), *args)


def gather(pool: jax.Array, layer, pages_per_layer: int, tables) -> jax.Array:
  """Layer `layer`'s pages of every row, tables [B, n] -> [B, n * Q, M, H] (only those pages are read)."""
  rows = pool[:, layer * pages_per_layer + tables]  # [M, B, n, Q, H]
  m, b, n, q, h = rows.shape
  return jnp.transpose(rows, (1, 2, 3, 0, 4)).reshape(b, n * q, m, h)


@checked
def attention_reference(
  q: Float[jax.Array, "B T M G H"],
  kv: PagedKV,
  layer,
  tables: Int[ArrayLike, "B n"],
  positions: Int[ArrayLike, "B T"],
  scale: float,
  window: int | None = None,
) -> Float[jax.Array, "B T M G H"]:
  """Grouped-query attention of queries at `positions` over the rows' pages (causal, windowed)."""
  k = gather(kv.k, layer, kv.pages_per_layer, tables)
  v = gather(kv.v, layer, kv.pages_per_layer, tables)
  return gqa_attention(q, k, v, causal_mask(positions, k.shape[1], window), scale)


def attention_pallas(q, kv: PagedKV, layer, tables, lengths, scale: float, interpret: bool = False):
  """One query per row [B, 1, M, G, H] through jax's Pallas (Triton) paged-attention kernel.

  `lengths` [B] counts the keys each row attends to (its position + 1). The
  kernel has no window and no scale: queries are pre-scaled.
  """
  b, t, m, g, h = q.shape
  n = tables.shape[1]
  k_splits = min(16, n)
  out = pallas_paged.paged_attention(
    (q.reshape(b, m * g, h) * scale).astype(q.dtype),
    kv.k,
    kv.v,
    (layer * kv.pages_per_layer + tables).astype(jnp.int32),
    lengths.astype(jnp.int32),
    k_splits=k_splits,
    pages_per_compute_block=min(8, n // k_splits),
    interpret=interpret,
  )
  return out.reshape(b, t, m, g, h)


def attention_pallas_per_head_shard(q, kv: PagedKV, layer, tables, lengths, scale: float, interpret: bool = False):
  """`attention_pallas`, on a mesh whose heads axes (jaxmoe/nn/sharding.py) divide the key/value heads M:
  one kernel per head shard, under a `shard_map` over those axes (the partitioner cannot split a custom
  call), each on its M / n heads of q and of the pages; its output stays split by head. Heads attend
  independently, so the rows' results are those of one kernel over every head. Without such a mesh, the
  kernel itself."""
  mesh = sharding.context_mesh()
  axes = None if mesh is None else sharding.fitting_spec(mesh, kv.k.shape, ("heads",))[0]
  if axes is None:
    return attention_pallas(q, kv, layer, tables, lengths, scale, interpret)
  heads, on_q = P(axes), P(None, None, axes)

  def body(k, v, q, layer, tables, lengths):
    local = PagedKV(k, v, kv.pages_per_layer)
    return attention_pallas(q, local, layer, tables, lengths, scale, interpret)

  names = {axes} if isinstance(axes, str) else set(axes)
  run = jax.shard_map(
    body, in_specs=(heads, heads, on_q, P(), P(), P()), out_specs=on_q, axis_names=names, check_vma=False
  )
  return run(kv.k, kv.v, q, jnp.asarray(layer), jnp.asarray(tables), jnp.asarray(lengths))
