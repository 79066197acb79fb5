"""`MixtralModel`: the public object `jaxmoe.load` returns for a Mixtral checkpoint (decoder-only)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxmoe import buckets
from jaxmoe.families.mixtral import layout, model
from jaxmoe.generation import CACHE_BLOCK, ModelBase, pad_id


class MixtralModel(ModelBase):
  """One Mixtral model (one tenant): `logits(tokens)`, `generate(prompts, n)`; numpy in and out."""

  layout = layout

  def logits(self, tokens) -> np.ndarray:
    """tokens [B, T] int -> float32 logits [B, T, V]."""
    tokens = self._check_tokens(np.atleast_2d(np.asarray(tokens)))
    with self._precision():
      out = model.forward(self.params, jnp.asarray(tokens, jnp.int32), self.config, self.impl)
    return np.asarray(out, np.float32)

  def new_tokens(self, row: np.ndarray, prompt_len: int) -> np.ndarray:
    """The tokens `generate` added to a row of `prompt_len` prompt tokens."""
    return row[prompt_len:]

  def _start(self, padded, lengths, max_new_tokens: int):
    cfg = self.config
    total = int(lengths.max()) + max_new_tokens
    if total > cfg.max_position_embeddings:
      raise ValueError(
        f"prompt + max_new_tokens = {total} exceeds max_position_embeddings={cfg.max_position_embeddings}"
      )
    cache = model.init_cache(cfg, padded.shape[0], buckets.round_up(max(total, padded.shape[1]), CACHE_BLOCK))
    logits, cache = model.prefill(self.params, jnp.asarray(padded), jnp.asarray(lengths), cache, cfg, self.impl)

    def step(nxt, cache):
      return model.decode_step(self.params, jnp.asarray(nxt), cache, cfg, self.impl)

    return logits, cache, step

  def _assemble(self, tokens, lengths, new) -> np.ndarray:
    b, t = tokens.shape
    out = np.full((b, t + new.shape[1]), pad_id(self.config), np.int32)
    for i in range(b):
      n = int(lengths[i])
      out[i, :n] = tokens[i, :n]
      out[i, n : n + new.shape[1]] = new[i]
    return out
