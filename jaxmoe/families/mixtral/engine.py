"""The serving engine's hooks for a decoder-only family: the prompt and its new tokens share a row's pages.

`admit` prefills a group of prompts into their pages and samples each one's
first token; `decode` runs one token per row and samples the next, in one
jitted program each, so a step hands the host token ids [B] only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.errors import RequestError
from jaxmoe.families.mixtral import model, stepped
from jaxmoe.nn import paged, sampling
from jaxmoe.nn.moe import Impl


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("kv",))
def admit(params, tokens, kv: paged.PagedKV, rows: paged.Rows, cfg, impl: Impl, ops):
  """Prefills prompts [b, T] of rows.lengths [b] into rows.tables [b, W] and samples each first token.

  Returns (first tokens [b], kv, rows advanced past them).
  """
  logits, kv = model.prefill(params, tokens, rows.lengths, kv, rows.tables, cfg, impl, ops)
  return sampling.select(logits, rows.sampling), kv, rows.replace(sampling=rows.sampling.advance(rows.active))


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("kv",))
def decode(params, tokens, kv: paged.PagedKV, rows: paged.Rows, cfg, impl: Impl, ops):
  """One token per row [B] at its length; returns (next tokens [B], kv, rows advanced)."""
  logits, kv = model.decode_step(params, tokens, kv, rows.tables, rows.lengths, cfg, impl, ops)
  return sampling.select(logits, rows.sampling), kv, rows.advance()


@jax.jit
def _sample_first(logits, rows: paged.Rows):
  return sampling.select(logits[:, 0], rows.sampling), rows.replace(sampling=rows.sampling.advance(rows.active))


@jax.jit
def _sample_next(logits, rows: paged.Rows):
  return sampling.select(logits[:, 0], rows.sampling), rows.advance()


def admit_stepped(params, tokens, kv, rows: paged.Rows, cache, cfg, impl: Impl, ops):
  """`admit`, one layer at a time, each layer's routed experts made resident in `cache` first."""
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, kv = stepped.run(
    params, tokens, positions, kv, rows.tables, cache, cfg, impl, ops, decode=False, logits_at=rows.lengths - 1
  )
  nxt, rows = _sample_first(logits, rows)
  return nxt, kv, rows


def decode_stepped(params, tokens, kv, rows: paged.Rows, cache, cfg, impl: Impl, ops):
  """`decode`, one layer at a time, each layer's routed experts made resident in `cache` first."""
  logits, kv = stepped.run(
    params, tokens[:, None], rows.lengths[:, None], kv, rows.tables, cache, cfg, impl, ops, decode=True
  )
  nxt, rows = _sample_next(logits, rows)
  return nxt, kv, rows


class DecoderOnly:
  """Engine hooks for Mixtral."""

  jitted = (admit, decode, stepped.first, stepped.between, stepped.last, _sample_first, _sample_next)
  cross = False  # no encoder pages

  def init_kv(self, cfg, pages_per_layer: int, page_size: int) -> paged.PagedKV:
    return model.init_kv(cfg, pages_per_layer, page_size)

  def page_bytes(self, cfg, page_size: int) -> int:
    return model.kv_page_bytes(cfg, page_size)

  def positions(self, prompt_len: int, max_tokens: int) -> tuple[int, int]:
    """(self-attention positions, encoder positions) a request can fill."""
    return prompt_len + max_tokens, 0

  def admission_rows(self, tables, cross_tables, prompt_lengths, sp) -> paged.Rows:
    """The rows `admit` takes for prompts of `prompt_lengths` [b] (host arrays)."""
    return paged.Rows(tables, prompt_lengths.astype(np.int32), np.ones(len(prompt_lengths), bool), sp)

  def admitted_length(self, prompt_len: int) -> int:
    """A row's length after admission: where its first generated token goes."""
    return prompt_len

  def check_lengths(self, prompt_len: int, max_tokens: int, limit: int) -> None:
    if prompt_len >= limit:
      raise RequestError(f"prompt has {prompt_len} tokens; the maximum is {limit - 1} (max_seq_len={limit})")
    if prompt_len + max_tokens > limit:
      raise RequestError(
        f"'max_tokens'={max_tokens} is above the limit {limit - prompt_len} for this "
        f"{prompt_len}-token prompt (max_seq_len={limit})"
      )

  def admit(self, params, tokens, kv, rows, cfg, impl: Impl, ops, cache=None):
    if cache is not None:
      return admit_stepped(params, tokens, kv, rows, cache, cfg, impl, ops)
    return admit(params, tokens, kv, rows, cfg, impl, ops)

  def decode(self, params, tokens, kv, rows, cfg, impl: Impl, ops, cache=None):
    if cache is not None:
      return decode_stepped(params, tokens, kv, rows, cache, cfg, impl, ops)
    return decode(params, tokens, kv, rows, cfg, impl, ops)
