"""Rotary position embeddings, Hugging Face's 'default' variant (rotate_half convention)."""

from __future__ import annotations

import jax.numpy as jnp

F32 = jnp.float32


def rope_tables(positions, head_dim: int, theta: float):
  """positions [B, T] -> (cos, sin) [B, T, H] in float32, computed once per call for every layer."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))
  freqs = positions.astype(F32)[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [B, T, *, H]; rotates the two halves of H."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin
