"""The serving engine's hooks for a decoder-only family: the prompt and its new tokens share one cache."""

from __future__ import annotations

import functools

import jax

from jaxmoe.errors import RequestError
from jaxmoe.families.mixtral import model
from jaxmoe.nn.moe import Impl


@functools.partial(jax.jit, donate_argnames=("cache",))
def insert_rows(cache: model.KVCache, small: model.KVCache, rows):
  """Copies a prefilled small cache [L, b, T, ...] into batch rows `rows` [b] (out of range: dropped)."""
  t = small.k.shape[2]
  return cache.replace(
    k=cache.k.at[:, rows, :t].set(small.k, mode="drop"),
    v=cache.v.at[:, rows, :t].set(small.v, mode="drop"),
    lengths=cache.lengths.at[rows].set(small.lengths, mode="drop"),
  )


class DecoderOnly:
  """Engine hooks for Mixtral: the prompt and its new tokens share max_seq_len cache positions."""

  jitted = (model.prefill, model.decode_step, insert_rows)

  def init_cache(self, cfg, batch: int, max_len: int) -> model.KVCache:
    return model.init_cache(cfg, batch, max_len)

  def check_lengths(self, prompt_len: int, max_tokens: int, limit: int) -> None:
    if prompt_len >= limit:
      raise RequestError(f"prompt has {prompt_len} tokens; the maximum is {limit - 1} (max_seq_len={limit})")
    if prompt_len + max_tokens > limit:
      raise RequestError(
        f"'max_tokens'={max_tokens} is above the limit {limit - prompt_len} for this "
        f"{prompt_len}-token prompt (max_seq_len={limit})"
      )

  def admit(self, params, tokens, lengths, cache, rows, cfg, impl: Impl, ops):
    """Prefills prompts [b, T] of `lengths` [b] into batch rows `rows` [b] of the (donated) cache.

    Returns (next-token logits [b, V], cache).
    """
    small = model.init_cache(cfg, tokens.shape[0], tokens.shape[1])
    logits, small = model.prefill(params, tokens, lengths, small, cfg, impl, ops)
    return logits, insert_rows(cache, small, rows)

  def decode_step(self, params, tokens, cache, cfg, impl: Impl, ops):
    return model.decode_step(params, tokens, cache, cfg, impl, ops)
