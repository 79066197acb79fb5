"""Switch one block at a time, for an expert cache smaller than the pool (jaxmoe/serving/experts.py).

As Mixtral's stepped.py: `attend_block` runs a block's attention (and
cross-attention) and, in a sparse block, its router, returning the pool slots
its tokens routed to; the caller makes them resident; `experts_block` runs the
routed experts from the cache. A dense block finishes inside `attend_block`.
The group index is an argument, so each program compiles once per block
position in a group (`layout.period`). The math is the model's own
(`Block.attend`, `Block.dense`, `Block.experts`), so outputs equal the scanned
model's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmoe.families.switch import layout
from jaxmoe.families.switch.config import SwitchConfig
from jaxmoe.families.switch.model import Block, Switch, decoder_context, encoder_context
from jaxmoe.nn import paged
from jaxmoe.nn.moe_ops import Impl, Router, expert_slots, route
from jaxmoe.nn.tenancy import slot_row


def block_params(params, stack: str, j: int, group):
  """Block j of group `group` (may be traced) out of the stack's stacked leaves."""
  leaves = params["backbone"][stack]["layers"][f"block_{j}"]
  return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, group, keepdims=False), leaves)


def moe_row(cfg: SwitchConfig, stack: str, j: int, group):
  """The slot-map row of block j of group `group` (a sparse block): encoder MoE layers first."""
  pattern = layout.pattern(cfg, stack)
  first = sum(cfg.encoder_sparse) if stack == "decoder" else 0
  return first + group * sum(pattern) + sum(pattern[:j])


def _switch(cfg, ops, write_cross=False) -> Switch:
  return Switch(cfg, Impl.AUTO, ops.num_tenants, write_cross)


@functools.partial(jax.jit, static_argnames=("cfg",))
def begin_encoder(params, tokens, lengths, cfg: SwitchConfig, ops):
  """Embedded encoder tokens [B, U] and the encoder blocks' context."""
  ctx_fn = encoder_context(cfg, tokens, lengths, None, ops)
  return _switch(cfg, ops).apply({"params": params["backbone"]}, "encoder", tokens, ctx_fn, ops, method=Switch.begin)


@functools.partial(jax.jit, static_argnames=("cfg",))
def begin_decoder(params, tokens, positions, enc_lengths, kv, tables, cross_tables, enc_out, cfg: SwitchConfig, ops):
  """Embedded decoder tokens [B, T] and the decoder blocks' context (arguments as `Switch.decode`)."""
  ctx_fn = decoder_context(cfg, tokens, positions, enc_lengths, None, ops, kv, tables, cross_tables, enc_out)
  return _switch(cfg, ops).apply({"params": params["backbone"]}, "decoder", tokens, ctx_fn, ops, method=Switch.begin)


@functools.partial(
  jax.jit, static_argnames=("cfg", "impl", "stack", "j", "sparse", "write_cross"), donate_argnames=("kv",)
)
def attend_block(
  params,
  group,
  x,
  ctx,
  kv: paged.PagedKV | None,
  cfg: SwitchConfig,
  impl: Impl,
  ops,
  stack: str,
  j: int,
  sparse: bool,
  write_cross: bool,
):
  """Block j of group `group`: a dense block whole, a sparse one up to its router.

  Returns (x, kv, MoE input h, router logits [B*T, E], routed pool slots [B*T, 1]); the last three are
  None for a dense block.
  """
  net = Block(cfg, impl, stack, sparse, ops.num_tenants, write_cross)
  variables = {"params": block_params(params, stack, j, group)}
  layer = group * len(layout.pattern(cfg, stack)) + j
  x, kv, h, logits = net.apply(variables, x, ctx, layer, kv, method=Block.attend)
  if not sparse:
    return x + net.apply(variables, h, ops, method=Block.dense), kv, None, None, None
  smap = slot_row(params["slot_map"], moe_row(cfg, stack, j, group), ops)
  if smap.ndim == 2:
    smap = jnp.repeat(smap, x.shape[1], axis=0)
  _, experts = route(logits, 1, Router.TOP1)
  return x, kv, h, logits, expert_slots(experts, smap)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "stack", "j"))
def experts_block(
  params, group, x, h, logits, cache: dict, cache_of, cfg: SwitchConfig, impl: Impl, ops, stack: str, j: int
):
  """Sparse block j of group `group`'s experts from the device cache: cache_of [X] maps pool slot -> cache slot."""
  net = Block(cfg, impl, stack, True, ops.num_tenants)
  smap = cache_of[slot_row(params["slot_map"], moe_row(cfg, stack, j, group), ops)]
  variables = {"params": block_params(params, stack, j, group)}
  return net.apply(variables, x, h, logits, smap, cache, ops, method=Block.experts)


@functools.partial(jax.jit, static_argnames=("cfg", "stack"))
def end(params, x, cfg: SwitchConfig, ops, stack: str):
  """A stack's final norm; the decoder's is followed by the LM head (float32 logits [B, T, V])."""
  net = _switch(cfg, ops)
  x = net.apply({"params": params["backbone"]}, stack, x, ops, method=Switch.end)
  if stack == "encoder":
    return x
  return net.apply({"params": params["backbone"]}, x, ops, method=Switch.head)


def run_stack(params, stack: str, x, ctx, kv, cache, cfg: SwitchConfig, impl: Impl, ops, write_cross=False):
  """Every block of one stack in turn, each sparse block's routed experts made resident (`cache.ensure`)."""
  pattern = layout.pattern(cfg, stack)
  for group in range(layout.num_groups(cfg, stack)):
    for j, sparse in enumerate(pattern):
      static = dict(stack=stack, j=j, sparse=sparse, write_cross=write_cross)
      x, kv, h, logits, slots = attend_block(params, group, x, ctx, kv, cfg, impl, ops, **static)
      if sparse:
        row = moe_row(cfg, stack, j, group)
        cache.ensure(slots, row)
        x = experts_block(
          params, group, x, h, logits, cache.buffers, cache.device_map, cfg, impl, ops, stack=stack, j=j
        )
        cache.prefetch(row + 1 if row + 1 < cfg.num_moe_layers else sum(cfg.encoder_sparse))  # then decoder's first
  return end(params, x, cfg, ops, stack=stack), kv


def start(params, enc_tokens, enc_lengths, kv, tables, cross_tables, cache, cfg: SwitchConfig, impl: Impl, ops):
  """The encoder on prompts [B, U], then the decoder start token writing the cross pages: (logits [B, 1, V], kv)."""
  x, ctx = begin_encoder(params, enc_tokens, enc_lengths, cfg, ops)
  enc_out, _ = run_stack(params, "encoder", x, ctx, None, cache, cfg, impl, ops)
  b = enc_tokens.shape[0]
  first = jnp.full((b, 1), cfg.decoder_start_token_id, jnp.int32)
  positions = jnp.zeros((b, 1), jnp.int32)
  x, ctx = begin_decoder(params, first, positions, enc_lengths, kv, tables, cross_tables, enc_out, cfg, ops)
  return run_stack(params, "decoder", x, ctx, kv, cache, cfg, impl, ops, write_cross=True)


def decode_step(params, tokens, kv, tables, cross_tables, lengths, enc_lengths, cache, cfg: SwitchConfig, impl, ops):
  """One decoder token per row [B] at position lengths [B]: (logits [B, 1, V], kv)."""
  tokens, positions = tokens[:, None], lengths[:, None]
  x, ctx = begin_decoder(params, tokens, positions, enc_lengths, kv, tables, cross_tables, None, cfg, ops)
  return run_stack(params, "decoder", x, ctx, kv, cache, cfg, impl, ops)
