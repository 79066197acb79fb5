"""The serving engine's hooks for an encoder-decoder family: a request's prompt is the encoder input.

`admit` is one jitted program: the encoder runs once on the new prompts, each
decoder block's cross-attention keys/values go into the rows' cross pages, and
the decoder start token runs and samples the first generated token. `decode`
appends one decoder token per row and samples the next. The response holds the
generated decoder tokens (after decoder_start_token_id), as
`SwitchModel.generate(...)[:, 1:]`.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxmoe.errors import RequestError
from jaxmoe.families.switch import model, stepped
from jaxmoe.families.switch.config import SwitchConfig
from jaxmoe.nn import paged, sampling
from jaxmoe.nn.moe import Impl


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("kv",))
def admit(params, tokens, kv: paged.PagedKV, rows: paged.Rows, cfg: SwitchConfig, impl: Impl, ops):
  """Starts prompts [b, U] of rows.enc_lengths [b]; returns (first tokens [b], kv, rows advanced past them)."""
  enc = model.encode(params, tokens, rows.enc_lengths, cfg, impl, ops)
  logits, kv = model.start(params, enc, rows.enc_lengths, kv, rows.tables, rows.cross_tables, cfg, impl, ops)
  return sampling.select(logits, rows.sampling), kv, rows.advance()


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("kv",))
def decode(params, tokens, kv: paged.PagedKV, rows: paged.Rows, cfg: SwitchConfig, impl: Impl, ops):
  """One decoder token per row [B] at its length; returns (next tokens [B], kv, rows advanced)."""
  logits, kv = model.decode_step(
    params, tokens, kv, rows.tables, rows.cross_tables, rows.lengths, rows.enc_lengths, cfg, impl, ops
  )
  return sampling.select(logits, rows.sampling), kv, rows.advance()


@jax.jit
def _sample(logits, rows: paged.Rows):
  return sampling.select(logits[:, 0], rows.sampling), rows.advance()


class EncoderDecoder:
  """Engine hooks for Switch: max_seq_len bounds the prompt and 1 + max_tokens decoder positions."""

  jitted = (
    admit,
    decode,
    _sample,
    stepped.begin_encoder,
    stepped.begin_decoder,
    stepped.attend_block,
    stepped.experts_block,
    stepped.end,
  )
  cross = True  # encoder pages beside the decoder's

  def init_kv(self, cfg: SwitchConfig, pages_per_layer: int, page_size: int) -> paged.PagedKV:
    return model.init_kv(cfg, pages_per_layer, page_size)

  def page_bytes(self, cfg: SwitchConfig, page_size: int) -> int:
    return model.kv_page_bytes(cfg, page_size)

  def positions(self, prompt_len: int, max_tokens: int) -> tuple[int, int]:
    """(decoder positions, encoder positions) a request can fill."""
    return 1 + max_tokens, prompt_len

  def admission_rows(self, tables, cross_tables, prompt_lengths, sp) -> paged.Rows:
    b = len(prompt_lengths)
    return paged.Rows(
      tables, np.zeros(b, np.int32), np.ones(b, bool), sp, cross_tables, prompt_lengths.astype(np.int32)
    )

  def admitted_length(self, prompt_len: int) -> int:
    return 1  # the decoder start token

  def check_lengths(self, prompt_len: int, max_tokens: int, limit: int) -> None:
    if prompt_len > limit:
      raise RequestError(f"prompt has {prompt_len} tokens; the maximum is {limit} (max_seq_len={limit})")
    if 1 + max_tokens > limit:
      raise RequestError(f"'max_tokens'={max_tokens} is above the limit {limit - 1} (max_seq_len={limit})")

  def admit(self, params, tokens, kv, rows, cfg: SwitchConfig, impl: Impl, ops, cache=None):
    if cache is not None:
      logits, kv = stepped.start(
        params, tokens, rows.enc_lengths, kv, rows.tables, rows.cross_tables, cache, cfg, impl, ops
      )
      nxt, rows = _sample(logits, rows)
      return nxt, kv, rows
    return admit(params, tokens, kv, rows, cfg, impl, ops)

  def decode(self, params, tokens, kv, rows, cfg: SwitchConfig, impl: Impl, ops, cache=None):
    if cache is not None:
      logits, kv = stepped.decode_step(
        params, tokens, kv, rows.tables, rows.cross_tables, rows.lengths, rows.enc_lengths, cache, cfg, impl, ops
      )
      nxt, rows = _sample(logits, rows)
      return nxt, kv, rows
    return decode(params, tokens, kv, rows, cfg, impl, ops)
