"""How a model reads its tenant's non-expert weights: one backbone, or a batch mixing tenants.

Model code never indexes backbone leaves itself; it goes through one of these
(`ops`), so the same modules serve one tenant or rows of different tenants:

  SingleTenant   leaves as the layout declares them
  MixedTenants   leaves stacked [A, ...] over the tenants; row b uses tenant ids[b]

Both are pytrees (flax.struct), passed into jitted functions as arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

GATHER_LIMIT_BYTES = 64 << 20  # mixed batches on CPUs: largest per-row weight copy for one projection


def grouped_linear(x, w, ids):
  """x [B, T, I] @ w[ids[b]] with w [A, I, O] -> [B, T, O]: rows sorted by tenant, one ragged_dot."""
  b, t, _ = x.shape
  tenant = jnp.repeat(ids, t)
  order = jnp.argsort(tenant, stable=True)
  sizes = jnp.bincount(tenant, length=w.shape[0]).astype(jnp.int32)
  y = jax.lax.ragged_dot(x.reshape(b * t, -1)[order], w, sizes)
  return jnp.zeros_like(y).at[order].set(y).reshape(b, t, -1)


def block_linear(x, w, ids):
  """Same result: each row's input in its tenant's block of A blocks, zeros elsewhere, times every
  tenant's weight stacked [A * I, O]: A times the flops, in one plain product with nothing to pick."""
  b, t, i = x.shape
  a = w.shape[0]
  own = (ids[:, None] == jnp.arange(a)).astype(x.dtype)  # [B, A]
  blocks = (own[:, None, :, None] * x[:, :, None, :]).reshape(b, t, a * i)
  return jnp.einsum("BTI,IO->BTO", blocks, w.reshape(a * i, -1))  # I here spans the A stacked inputs


def gathered_linear(x, w, ids):
  """Same result: each row's own weight gathered [B, I, O], then one batched product."""
  return jnp.einsum("BTI,BIO->BTO", x, w[ids])


@struct.dataclass
class SingleTenant:
  """Weight access for one backbone."""

  num_tenants: int = struct.field(pytree_node=False, default=0)

  def linear(self, eq: str, x, w):
    return jnp.einsum(eq, x, w)

  def vector(self, w):
    return w

  def embed(self, table, tokens):
    return table[tokens]

  def rows(self, slot_row):
    """One layer's slot map [E] (shared by every row)."""
    return slot_row

  def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a leaf of `shape` has here (modules check their variables against it)."""
    return shape


@struct.dataclass
class MixedTenants:
  """Weight access for a batch mixing tenants: backbone leaves stacked [A, ...].

  Row b uses tenant `ids[b]`. On accelerators, projections sort the rows by
  tenant and run one `ragged_dot` per weight, so each tenant's weights are read
  once per step and each row is computed once. XLA's CPU `ragged_dot` computes
  every group densely, slower than a plain product, so CPUs use what measured
  fastest there (bench/serve_throughput.py): for one token per row (decode),
  `block_linear`, A times the flops in one plain product; for prompts,
  `gathered_linear`, whose weight copy is shared by the row's tokens (while that
  copy stays under GATHER_LIMIT_BYTES).
  """

  ids: jax.Array  # [B] int32
  num_tenants: int = struct.field(pytree_node=False, default=1)

  def linear(self, eq: str, x, w):
    del eq  # contraction: x's trailing dims (after B, T) with w's leading dims (after A)
    b, t = x.shape[:2]
    out_shape = w.shape[x.ndim - 1 :]
    flat_w = w.reshape(w.shape[0], -1, int(np.prod(out_shape)))  # [A, I, O]
    gathered_bytes = b * flat_w[0].size * flat_w.dtype.itemsize
    if jax.default_backend() != "cpu":
      project = grouped_linear
    elif t > 1 and gathered_bytes <= GATHER_LIMIT_BYTES:
      project = gathered_linear
    else:
      project = block_linear
    return project(x.reshape(b, t, -1), flat_w, self.ids).reshape(b, t, *out_shape)

  def vector(self, w):  # [A, D] -> [B, 1, D], broadcasting over T
    return w[self.ids][:, None]

  def embed(self, table, tokens):  # [A, V, D], [B, T]
    return table[self.ids[:, None], tokens]

  def rows(self, slot_row):  # [A, E] -> per row [B, E]
    return slot_row[self.ids]

  def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (self.num_tenants, *shape)


Tenancy = SingleTenant | MixedTenants


def slot_row(slot_map, layer, ops: Tenancy):
  """MoE layer `layer`'s row of slot_map ([L, E], or [A, L, E] stacked; layer may be traced): [E], or per
  row [B, E]."""
  row = jax.lax.dynamic_index_in_dim(slot_map, layer, axis=0 if slot_map.ndim == 2 else 1, keepdims=False)
  return ops.rows(row)
