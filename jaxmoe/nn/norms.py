"""RMS norm in float32 (Mixtral's RMSNorm and T5's layer norm: no mean, no bias)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, weight, eps: float):
  """x [..., D] / rms(x) * weight [D] (or [B, 1, D] per row); statistics in float32, result in x's dtype."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight * normed.astype(x.dtype)
