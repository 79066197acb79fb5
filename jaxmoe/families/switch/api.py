"""`SwitchModel`: the public object `jaxmoe.load` returns for a Switch checkpoint.

An encoder-decoder: the prompt is the encoder input and the output is decoder
text. `logits(encoder_tokens, decoder_tokens)` is HF's
`model(input_ids, attention_mask, decoder_input_ids).logits`;
`generate(encoder_tokens, n)` is HF's greedy `generate` (the decoder starts
from decoder_start_token_id and a row stops at EOS). Numpy in and out.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxmoe.families.switch import layout, model
from jaxmoe.families.switch.config import Routing
from jaxmoe.families.switch.engine import EncoderDecoder
from jaxmoe.generation import ModelBase


class SwitchModel(ModelBase):
  """One Switch Transformer (one tenant): config, device parameters, optional tokenizer."""

  layout = layout
  hooks = EncoderDecoder()

  @classmethod
  def config_for(cls, cfg, routing=None):
    """Single-model use defaults to HF's expert capacity, so a converted model gives HF's numbers."""
    return cfg.replace(routing=Routing(routing or Routing.HF_CAPACITY))

  def logits(self, encoder_tokens, decoder_tokens, encoder_lengths=None) -> np.ndarray:
    """Decoder logits given the whole decoder input.

    Args:
      encoder_tokens: [B, U] int, right-padded when `encoder_lengths` is
        given; or a list of 1-D prompts of different lengths.
      decoder_tokens: [B, T] int decoder input, as HF's decoder_input_ids:
        normally decoder_start_token_id followed by the target tokens.
      encoder_lengths: [B] valid encoder tokens per row (default: all U).

    Returns:
      float32 [B, T, V]: row b, position t scores the decoder token after t.
    """
    enc, lengths = self._batch(encoder_tokens, encoder_lengths)
    dec = self._check_tokens(np.atleast_2d(np.asarray(decoder_tokens)))
    if dec.shape[0] != enc.shape[0]:
      raise ValueError(f"{enc.shape[0]} encoder rows but {dec.shape[0]} decoder rows")
    with self._precision():
      out = model.forward(
        self.params, jnp.asarray(enc), jnp.asarray(lengths), jnp.asarray(dec, jnp.int32), self.config, self.impl
      )
    return np.asarray(out, np.float32)

  def new_tokens(self, row: np.ndarray, prompt_len: int) -> np.ndarray:
    """The tokens `generate` added (after decoder_start_token_id); the prompt was the encoder's."""
    return row[1:]

  def _assemble(self, tokens, lengths, new) -> np.ndarray:
    start = np.full((tokens.shape[0], 1), self.config.decoder_start_token_id, np.int32)
    return np.concatenate([start, new], axis=1)
