"""Next-token selection from logits, with per-row settings (batches mix requests).

Each row draws with the key fold_in(key(seed), step), so a request samples the
same tokens whether it runs alone, in a batch, or in the serving engine.

Axis names (jaxmoe/axes.py): B batch rows, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def nucleus_mask(probs, top_p):
  """[B, V] bool: the smallest set of most likely tokens whose mass reaches top_p [B]."""
  sorted_probs = -jnp.sort(-probs, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  inside = mass_before < top_p[:, None]
  threshold = jnp.min(jnp.where(inside, sorted_probs, jnp.inf), axis=-1, keepdims=True)
  return probs >= threshold


@jax.jit
def sample(logits, seeds, steps, temperature, top_p):
  """Picks one token per row.

  Args:
    logits: [B, V] float32.
    seeds: [B] int32, each row's request seed.
    steps: [B] int32, how many tokens the row has generated so far.
    temperature: [B] float32; 0 means greedy (argmax).
    top_p: [B] float32 in (0, 1], nucleus sampling mass.

  Returns:
    [B] int32 tokens.
  """
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
  masked = jnp.where(nucleus_mask(jax.nn.softmax(scaled, axis=-1), top_p), scaled, -jnp.inf)
  keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, steps)
  drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
  return jnp.where(temperature > 0, drawn, greedy)
