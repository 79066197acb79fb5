"""Attention math shared by the families: masks, grouped-query softmax attention, T5-style attention.

Softmax runs in float32 over scores accumulated in float32; masked positions
get the most negative float32, so their weight is exactly 0 (as in HF).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmoe.axes import Bool, Float, checked
from jaxmoe.nn import sharding

F32 = jnp.float32


def causal_mask(positions, num_keys: int, window: int | None = None):
  """[B, T, S] bool: key position s is visible from the query at positions [B, T] (causal, windowed)."""
  keys = jnp.arange(num_keys)[None, None, :]
  q = positions[:, :, None]
  mask = keys <= q
  if window is not None:
    mask &= q - keys < window
  return mask


@checked
def gqa_attention(
  q: Float[jax.Array, "B T M G H"],
  k: Float[jax.Array, "B S M H"],
  v: Float[jax.Array, "B S M H"],
  mask: Bool[jax.Array, "B T S"],
  scale: float,
) -> Float[jax.Array, "B T M G H"]:
  """Grouped-query attention.

  Args:
    q: [B, T, M, G, H] queries, G per key/value head.
    k, v: [B, S, M, H].
    mask: [B, T, S] bool.
    scale: multiplies the scores (H**-0.5 for Mixtral).

  Returns:
    [B, T, M, G, H] in q's dtype.
  """
  scores = jnp.einsum("BTMGH,BSMH->BMGTS", q, k, preferred_element_type=F32) * scale
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(F32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("BMGTS,BSMH->BTMGH", probs, v)


@checked
def biased_attention(
  q: Float[jax.Array, "B T N H"],
  k: Float[jax.Array, "B S N H"],
  v: Float[jax.Array, "B S N H"],
  bias: Float[jax.Array, "_ N T S"] | None,
  mask: Bool[jax.Array, "B T S"],
) -> Float[jax.Array, "B T N H"]:
  """T5 attention: no 1/sqrt(H) scaling, an additive position bias.

  Args:
    q: [B, T, N, H]; k, v: [B, S, N, H].
    bias: [B or 1, N, T, S] or None.
    mask: [B, T, S] bool.

  Returns:
    [B, T, N, H] in q's dtype.
  """
  scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=F32)
  if bias is not None:
    scores = scores + bias.astype(F32)
  scores = jnp.where(mask[:, None], scores, jnp.finfo(F32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("BNTS,BSNH->BTNH", probs, v)


def output_projection(ops, out, w):
  """Every head's output [B, T, N, H] through the output projection w [N, H, D] (`ops.linear`).

  On a mesh that splits heads (jaxmoe/nn/sharding.py) the heads are gathered
  first and w is split over its output features, so no sum is divided between
  devices; the result is gathered too. Equal to one device's to float rounding:
  a matmul at another output width may add the same products in another order.
  """
  out = sharding.constrain(out, "batch")
  return sharding.constrain(ops.linear("BTNH,NHD->BTD", out, w), "batch")
