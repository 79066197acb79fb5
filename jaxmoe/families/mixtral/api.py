"""`MixtralModel`: the public object `jaxmoe.load` returns for a Mixtral checkpoint (decoder-only)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxmoe.families.mixtral import layout, model
from jaxmoe.families.mixtral.engine import DecoderOnly
from jaxmoe.generation import ModelBase, pad_id


class MixtralModel(ModelBase):
  """One Mixtral model (one tenant): `logits(tokens)`, `generate(prompts, n)`; numpy in and out."""

  layout = layout
  hooks = DecoderOnly()

  def logits(self, tokens) -> np.ndarray:
    """tokens [B, T] int -> float32 logits [B, T, V]."""
    tokens = self._check_tokens(np.atleast_2d(np.asarray(tokens)))
    with self._precision():
      out = model.forward(self.params, jnp.asarray(tokens, jnp.int32), self.config, self.impl)
    return np.asarray(out, np.float32)

  def new_tokens(self, row: np.ndarray, prompt_len: int) -> np.ndarray:
    """The tokens `generate` added to a row of `prompt_len` prompt tokens."""
    return row[prompt_len:]

  def _check_generate(self, lengths, max_new_tokens: int) -> None:
    total = int(lengths.max()) + max_new_tokens
    if total > self.config.max_position_embeddings:
      raise ValueError(
        f"prompt + max_new_tokens = {total} exceeds max_position_embeddings={self.config.max_position_embeddings}"
      )

  def _assemble(self, tokens, lengths, new) -> np.ndarray:
    b, t = tokens.shape
    out = np.full((b, t + new.shape[1]), pad_id(self.config), np.int32)
    for i in range(b):
      n = int(lengths[i])
      out[i, :n] = tokens[i, :n]
      out[i, n : n + new.shape[1]] = new[i]
    return out
