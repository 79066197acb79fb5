"""The engine's encoder-decoder path (Switch Transformer): a request's prompt is the encoder input.

`Engine` drives a model through a small family object (`engine.DecoderOnly`
for Mixtral, `EncoderDecoder` here): cache creation, admission into batch
rows, the decode step and the length limits. Admission is one jitted program:
the encoder runs once on the new prompts, each decoder block's cross-attention
keys/values and the decoder start token's self-attention entry are written
into the rows of the donated batch cache; decode steps are those of
`jaxmoe.models.switch`. The
response holds the generated decoder tokens (after decoder_start_token_id),
as `SwitchModel.generate(...)[:, 1:]`.

Axis legend: L decoder blocks, B rows, S decoder positions, U encoder
positions, N heads, H head dim, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmoe.models import switch
from jaxmoe.moe import Impl
from jaxmoe.serving.requests import RequestError
from jaxmoe.switch_config import SwitchConfig


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def admit(params, tokens, lengths, cache: switch.SwitchCache, rows, cfg: SwitchConfig, impl: Impl, ops):
  """Starts prompts [b, U] of `lengths` [b] in batch rows `rows` [b] (out of range: dropped).

  One program: the encoder, each decoder block's cross keys/values, and the
  decoder start token, written into the rows of the donated batch cache.
  Returns (logits of each row's first generated token [b, V], cache).
  """
  b, u = tokens.shape
  enc = switch.run_encoder(params, tokens, lengths, cfg, impl, ops)
  small = switch.fill_cross(params, enc, lengths, switch.init_cache(cfg, b, 1, u), ops)
  first = switch.embed(params, "decoder", jnp.full((b, 1), cfg.decoder_start_token_id, jnp.int32), ops)
  x, small = switch.run_decoder(params, first, jnp.zeros((b, 1), jnp.int32), small, cfg, impl, ops)
  cache = cache.replace(
      k=cache.k.at[:, rows, :1].set(small.k, mode="drop"),
      v=cache.v.at[:, rows, :1].set(small.v, mode="drop"),
      lengths=cache.lengths.at[rows].set(1, mode="drop"),
      cross_k=cache.cross_k.at[:, rows, :u].set(small.cross_k, mode="drop"),
      cross_v=cache.cross_v.at[:, rows, :u].set(small.cross_v, mode="drop"),
      enc_lengths=cache.enc_lengths.at[rows].set(lengths.astype(jnp.int32), mode="drop"),
  )
  return switch.lm_head(params, x, cfg, ops)[:, 0], cache


class EncoderDecoder:
  """Engine hooks for Switch: max_seq_len bounds the prompt and 1 + max_tokens decoder positions."""

  jitted = (admit, switch.decode_step)

  def init_cache(self, cfg: SwitchConfig, batch: int, max_len: int) -> switch.SwitchCache:
    return switch.init_cache(cfg, batch, max_len, max_len)

  def check_lengths(self, prompt_len: int, max_tokens: int, limit: int) -> None:
    if prompt_len > limit:
      raise RequestError(f"prompt has {prompt_len} tokens; the maximum is {limit} (max_seq_len={limit})")
    if 1 + max_tokens > limit:
      raise RequestError(f"'max_tokens'={max_tokens} is above the limit {limit - 1} (max_seq_len={limit})")

  def admit(self, params, tokens, lengths, cache, rows, cfg: SwitchConfig, impl: Impl, ops):
    return admit(params, tokens, lengths, cache, rows, cfg, impl, ops)

  def decode_step(self, params, tokens, cache, cfg: SwitchConfig, impl: Impl, ops):
    return switch.decode_step(params, tokens, cache, cfg, impl, ops)
