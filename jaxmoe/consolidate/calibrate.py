"""Hidden states at each layer's MoE input while a tenant reads the calibration text.

The output metric compares experts on the inputs they really see. To keep
memory near one layer of all tenants, each tenant's forward pass is run layer
by layer alongside the others, instead of one whole model at a time: the
family's `calibration_step` applies its decoder-layer module to one layer's
parameters (tests check it against the family's full forward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.errors import ConsolidateError


def calibration_tokens(text: str, tokenizer, cfg, max_tokens: int, seq_len: int) -> np.ndarray:
  """The first `max_tokens` ids of `text`, cut into rows of `seq_len`: int32 [B, T]."""
  if tokenizer is None:
    raise ConsolidateError("the output metric needs a tokenizer: the checkpoint has no tokenizer.json")
  ids = np.asarray(tokenizer.encode(text), np.int64)[:max_tokens]
  if ids.size == 0:
    raise ConsolidateError("the calibration text encodes to no tokens")
  if ids.min() < 0 or ids.max() >= cfg.vocab_size:
    raise ConsolidateError(f"calibration token ids fall outside the vocabulary [0, {cfg.vocab_size})")
  seq_len = max(1, min(seq_len, cfg.max_position_embeddings))
  if ids.size <= seq_len:
    return ids[None].astype(np.int32)
  rows = ids.size // seq_len
  return ids[: rows * seq_len].reshape(rows, seq_len).astype(np.int32)


def embed(glob: dict, tokens: np.ndarray) -> jax.Array:
  """Token embeddings [B, T, D] from a backbone's globals."""
  return jnp.asarray(glob["embed"])[jnp.asarray(tokens)]
