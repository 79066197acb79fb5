"""Next-token selection from logits, with per-row settings (batches mix requests).

Each row draws with the key fold_in(key(seed), step), so a request samples the
same tokens whether it runs alone, in a batch, or in the serving engine. The
per-row settings (`SamplingParams`) live on the device next to the decode
state; `select` runs inside the jitted decode step, so a step returns token ids
only, and a batch of greedy rows skips the nucleus sort altogether.

Axis names (jaxmoe/axes.py): B batch rows, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class SamplingParams:
  """Per-row settings: what each row's next token is drawn with."""

  seeds: jax.Array  # [B] int32, each row's request seed
  steps: jax.Array  # [B] int32, tokens the row has generated so far
  temperature: jax.Array  # [B] float32; 0 means greedy
  top_p: jax.Array  # [B] float32 in (0, 1]

  @classmethod
  def full(cls, b: int, seed: int = 0, temperature: float = 0.0, top_p: float = 1.0) -> SamplingParams:
    """B rows with the same settings, at step 0 (host numpy)."""
    return cls(
      np.full(b, seed, np.int32),
      np.zeros(b, np.int32),
      np.full(b, temperature, np.float32),
      np.full(b, top_p, np.float32),
    )

  def advance(self, active) -> SamplingParams:
    """One more generated token for the `active` [B] rows."""
    return self.replace(steps=self.steps + active.astype(jnp.int32))


def nucleus_mask(probs, top_p):
  """[B, V] bool: the smallest set of most likely tokens whose mass reaches top_p [B]."""
  sorted_probs = -jnp.sort(-probs, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  inside = mass_before < top_p[:, None]
  threshold = jnp.min(jnp.where(inside, sorted_probs, jnp.inf), axis=-1, keepdims=True)
  return probs >= threshold


def _sampled(logits, sp: SamplingParams, greedy):
  scaled = logits / jnp.maximum(sp.temperature, 1e-6)[:, None]
  masked = jnp.where(nucleus_mask(jax.nn.softmax(scaled, axis=-1), sp.top_p), scaled, -jnp.inf)
  keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(sp.seeds, sp.steps)
  drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
  return jnp.where(sp.temperature > 0, drawn, greedy)


def select(logits, sp: SamplingParams):
  """Picks one token per row: logits [B, V] float32 -> [B] int32 (argmax where temperature is 0)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(jnp.any(sp.temperature > 0), lambda: _sampled(logits, sp, greedy), lambda: greedy)
