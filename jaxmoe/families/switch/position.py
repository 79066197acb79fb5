"""T5 relative-position bias for Switch: bucketed distances looked up in a per-stack [Z, N] table.

Bidirectional in the encoder (half the buckets per side), causal in the
decoder; cross-attention has none.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxmoe.families.switch.config import SwitchConfig


def bucket_table(num_buckets: int, max_distance: int) -> np.ndarray:
  """One side's bucket for each distance 0..max_distance (T5 relative-position buckets).

  Half the buckets are exact distances, the rest logarithmic up to
  max_distance; larger distances share the last bucket. Computed on the host
  in float32 the way transformers does (a correctly rounded log), so bucket
  boundaries land exactly where torch puts them on every backend. Entries run
  to max(max_distance, exact buckets); farther distances use the last entry.
  """
  max_exact = num_buckets // 2
  dist = np.arange(max(max_distance, max_exact) + 1)
  if max_distance > max_exact:
    ratio = np.maximum(dist, max_exact).astype(np.float32) / np.float32(max_exact)
    log = np.log(ratio.astype(np.float64)).astype(np.float32)
    scaled = log / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  else:  # no logarithmic range (transformers divides by log(1) = 0 there): the last bucket
    large = np.full(dist.shape, num_buckets - 1)
  return np.where(dist < max_exact, dist, large).astype(np.int32)


def relative_buckets(rel, cfg: SwitchConfig, bidirectional: bool):
  """Relative positions (key - query) int [...] -> bucket ids [...] in [0, Z)."""
  n = cfg.relative_attention_num_buckets
  if bidirectional:
    n //= 2
    offset, dist = jnp.where(rel > 0, n, 0), jnp.abs(rel)
  else:
    offset, dist = 0, jnp.maximum(-rel, 0)
  table = bucket_table(n, cfg.relative_attention_max_distance)
  return offset + jnp.asarray(table)[jnp.minimum(dist, len(table) - 1)]


def position_bias(table, rel, cfg: SwitchConfig, bidirectional: bool, ops):
  """rel [b, T, S] (b = 1 or B) -> bias [b or B, N, T, S] from a [Z, N] table (per row's tenant)."""
  b, t, s = rel.shape
  buckets = relative_buckets(rel, cfg, bidirectional).reshape(b, t * s)
  values = ops.embed(table, buckets)  # [b or B, T*S, N]
  return jnp.einsum("BTSN->BNTS", values.reshape(values.shape[0], t, s, -1))
