"""The paged KV cache: writes land where the block tables say, attention over pages equals dense attention,
and jax's Pallas paged-attention kernel (interpret mode) equals the jnp reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.nn import paged
from jaxmoe.nn.attention import causal_mask, gqa_attention
from tests.helpers import max_abs

L, M, G, H, Q = 2, 2, 2, 16, 4


def filled(rng, b: int, length: int, pages_per_row: int):
  """A pool with `length` random keys/values per row at shuffled pages, and the same keys dense."""
  kv = paged.init(L, 1 + b * pages_per_row, Q, M, H, jnp.float32)
  tables = rng.permutation(np.arange(1, 1 + b * pages_per_row, dtype=np.int32)).reshape(b, pages_per_row)
  k = rng.standard_normal((L, b, length, M, H)).astype(np.float32)
  v = rng.standard_normal((L, b, length, M, H)).astype(np.float32)
  pos = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length))
  for layer in range(L):
    kv = paged.write(kv, layer, jnp.asarray(tables), jnp.asarray(pos), jnp.asarray(k[layer]), jnp.asarray(v[layer]))
  return kv, tables, k, v


def test_writes_follow_the_block_tables():
  kv, tables, k, _ = filled(np.random.default_rng(0), 2, 7, 2)
  for layer in range(L):
    for b in range(2):
      for s in range(7):
        page = layer * kv.pages_per_layer + tables[b, s // Q]
        np.testing.assert_array_equal(np.asarray(kv.k[:, page, s % Q]), k[layer, b, s])
  assert not np.asarray(kv.k[:, 0]).any() and not np.asarray(kv.k[:, kv.pages_per_layer]).any()  # scratch pages


@pytest.mark.parametrize("window", [None, 3])
def test_attention_over_pages_equals_dense(window):
  rng = np.random.default_rng(1)
  kv, tables, k, v = filled(rng, 3, 10, 4)
  lengths = np.array([10, 6, 3], np.int32)  # row b attends to its first lengths[b] keys
  q = rng.standard_normal((3, 1, M, G, H)).astype(np.float32)
  positions = jnp.asarray(lengths - 1)[:, None]
  for layer in range(L):
    got = paged.attention_reference(jnp.asarray(q), kv, layer, jnp.asarray(tables[:, :3]), positions, H**-0.5, window)
    mask = causal_mask(positions, 10, window)
    want = gqa_attention(jnp.asarray(q), jnp.asarray(k[layer]), jnp.asarray(v[layer]), mask, H**-0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, err_msg=max_abs(got, want))


def test_pallas_kernel_equals_reference_in_interpret_mode():
  rng = np.random.default_rng(2)
  b, groups = 2, 16  # the kernel blocks query heads 16 at a time
  kv, tables, _, _ = filled(rng, b, 24, 8)
  lengths = np.array([24, 9], np.int32)
  q = rng.standard_normal((b, 1, M, groups, H)).astype(np.float32)
  for layer in range(L):
    got = paged.attention_pallas(
      jnp.asarray(q), kv, layer, jnp.asarray(tables), jnp.asarray(lengths), H**-0.5, interpret=True
    )
    want = paged.attention_reference(
      jnp.asarray(q), kv, layer, jnp.asarray(tables), jnp.asarray(lengths - 1)[:, None], H**-0.5
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, err_msg=max_abs(got, want))


def test_rows_advance_only_when_active():
  rows = paged.Rows(
    jnp.zeros((3, 2), jnp.int32),
    jnp.asarray([4, 0, 7], jnp.int32),
    jnp.asarray([True, False, True]),
    jax.tree.map(jnp.asarray, paged.SamplingParams.full(3)),
  )
  out = rows.advance()
  np.testing.assert_array_equal(np.asarray(out.lengths), [5, 0, 8])
  np.testing.assert_array_equal(np.asarray(out.sampling.steps), [1, 0, 1])
