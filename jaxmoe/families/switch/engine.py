"""The serving engine's hooks for an encoder-decoder family: a request's prompt is the encoder input.

Admission is one jitted program: the encoder runs once on the new prompts, and
each decoder block's cross-attention keys/values and the decoder start token's
self-attention entry are written into the rows of the donated batch cache;
decode steps are the model's. The response holds the generated decoder tokens
(after decoder_start_token_id), as `SwitchModel.generate(...)[:, 1:]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmoe.errors import RequestError
from jaxmoe.families.switch import model
from jaxmoe.families.switch.config import SwitchConfig
from jaxmoe.nn.moe import Impl


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def admit(params, tokens, lengths, cache: model.SwitchCache, rows, cfg: SwitchConfig, impl: Impl, ops):
  """Starts prompts [b, U] of `lengths` [b] in batch rows `rows` [b] (out of range: dropped).

  Returns (logits of each row's first generated token [b, V], cache).
  """
  b, u = tokens.shape
  net = model.Switch(cfg, impl, ops.num_tenants, write_cross=True)
  variables, pool, smap = {"params": params["backbone"]}, params["experts"], params["slot_map"]
  enc = net.apply(variables, tokens, lengths, pool, smap, ops, method=model.Switch.encode)
  small = model.init_cache(cfg, b, 1, u).replace(enc_lengths=lengths.astype(jnp.int32))
  first = jnp.full((b, 1), cfg.decoder_start_token_id, jnp.int32)
  logits, small = net.apply(
    variables, first, jnp.zeros((b, 1), jnp.int32), small, pool, smap, ops, enc, method=model.Switch.decode
  )
  cache = cache.replace(
    k=cache.k.at[:, rows, :1].set(small.k, mode="drop"),
    v=cache.v.at[:, rows, :1].set(small.v, mode="drop"),
    lengths=cache.lengths.at[rows].set(1, mode="drop"),
    cross_k=cache.cross_k.at[:, rows, :u].set(small.cross_k, mode="drop"),
    cross_v=cache.cross_v.at[:, rows, :u].set(small.cross_v, mode="drop"),
    enc_lengths=cache.enc_lengths.at[rows].set(lengths.astype(jnp.int32), mode="drop"),
  )
  return logits[:, 0], cache


class EncoderDecoder:
  """Engine hooks for Switch: max_seq_len bounds the prompt and 1 + max_tokens decoder positions."""

  jitted = (admit, model.decode_step)

  def init_cache(self, cfg: SwitchConfig, batch: int, max_len: int) -> model.SwitchCache:
    return model.init_cache(cfg, batch, max_len, max_len)

  def check_lengths(self, prompt_len: int, max_tokens: int, limit: int) -> None:
    if prompt_len > limit:
      raise RequestError(f"prompt has {prompt_len} tokens; the maximum is {limit} (max_seq_len={limit})")
    if 1 + max_tokens > limit:
      raise RequestError(f"'max_tokens'={max_tokens} is above the limit {limit - 1} (max_seq_len={limit})")

  def admit(self, params, tokens, lengths, cache, rows, cfg: SwitchConfig, impl: Impl, ops):
    return admit(params, tokens, lengths, cache, rows, cfg, impl, ops)

  def decode_step(self, params, tokens, cache, cfg: SwitchConfig, impl: Impl, ops):
    return model.decode_step(params, tokens, cache, cfg, impl, ops)
