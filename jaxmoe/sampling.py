"""Next-token selection from logits, with per-row settings (batches mix requests).

Axis legend: B batch, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def sample(logits, key, temperature, top_p):
  """Picks one token per row.

  Args:
    logits: [B, V] float32.
    key: a PRNG key.
    temperature: [B] float32; 0 means greedy (argmax).
    top_p: [B] float32 in (0, 1]; nucleus sampling keeps the smallest set of
      tokens whose probability reaches top_p.

  Returns:
    [B] int32 tokens.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
  probs = jax.nn.softmax(scaled, axis=-1)
  sorted_probs = -jnp.sort(-probs, axis=-1)
  # Threshold: the probability of the last token inside the nucleus.
  cum = jnp.cumsum(sorted_probs, axis=-1)
  inside = (cum - sorted_probs) < top_p[:, None]
  threshold = jnp.min(jnp.where(inside, sorted_probs, jnp.inf), axis=-1, keepdims=True)
  masked = jnp.where(probs >= threshold, scaled, -jnp.inf)
  drawn = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)
