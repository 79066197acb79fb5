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

from jaxmoe.api import CACHE_BLOCK, Model, decode_loop, pad_id, prompt_bucket, round_up
from jaxmoe.models import switch


class SwitchModel(Model):
  """One Switch Transformer (one tenant): config, device parameters, optional tokenizer."""

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
      out = switch.forward(self.params, jnp.asarray(enc), jnp.asarray(lengths), jnp.asarray(dec, jnp.int32),
                           self.config, self.impl)
    return np.asarray(out, np.float32)

  def generate(self, tokens, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, lengths=None, stop_at_eos: bool = True) -> np.ndarray:
    """Decodes from encoder prompts with a KV cache; the encoder runs once.

    Args:
      tokens: [B, U] int encoder prompts, right-padded when `lengths` is given;
        or a list of 1-D prompts of different lengths.
      max_new_tokens: n, decoder tokens to produce per row.
      temperature: 0 is greedy; > 0 samples (with `top_p` nucleus and `seed`).
      lengths: [B] prompt lengths for a right-padded batch (default: all U).
      stop_at_eos: like HF `generate`: a row that produced EOS is padded from
        then on, and decoding stops early when every row has.

    Returns:
      int32 [B, 1 + n'] with n' <= n, as HF: decoder_start_token_id, the new
      tokens, then padding (the pad id, else EOS).
    """
    tokens, lengths = self._batch(tokens, lengths)
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    cfg = self.config
    b, u = tokens.shape
    padded = np.zeros((b, prompt_bucket(u)), np.int32)
    padded[:, :u] = tokens
    cache = switch.init_cache(cfg, b, round_up(1 + max_new_tokens, CACHE_BLOCK), padded.shape[1])
    start = np.full((b, 1), cfg.decoder_start_token_id, np.int32)
    with self._precision():
      enc_lengths = jnp.asarray(lengths)
      enc = switch.encode(self.params, jnp.asarray(padded), enc_lengths, cfg, self.impl)
      logits, cache = switch.prefill(self.params, enc, enc_lengths, jnp.asarray(start),
                                     jnp.ones((b,), jnp.int32), cache, cfg, self.impl)
      step = lambda nxt, cache: switch.decode_step(self.params, jnp.asarray(nxt), cache, cfg, self.impl)
      new = decode_loop(logits, cache, step, max_new_tokens, temperature, top_p, seed,
                        cfg.eos_token_id if stop_at_eos else None, pad_id(cfg))
    return np.concatenate([start, new], axis=1)
