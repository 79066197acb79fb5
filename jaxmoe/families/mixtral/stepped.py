"""Mixtral one layer at a time, for an expert cache smaller than the pool (jaxmoe/serving/experts.py).

The scanned model needs every routed expert on the device before the step
starts; these programs stop between a layer's router and its experts instead:
`attend_layer` runs a layer's attention and router and returns the pool slots
its tokens routed to (a small [T, K] array, the step's one sync per layer);
the caller makes those slots resident; `experts_layer` runs the layer's experts
from the cache, the slot map translated pool slot -> cache slot. The layer
index is an argument, so each program compiles once for every layer. The math
is the model's own (`DecoderLayer.attend`, `DecoderLayer.experts`), so outputs
equal the scanned model's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.families.mixtral.model import DecoderLayer, Mixtral, context
from jaxmoe.nn import paged
from jaxmoe.nn.moe import Impl, Router, expert_slots, route
from jaxmoe.nn.tenancy import slot_row


def layer_params(params, layer):
  """One layer's backbone leaves out of the stacked ones (layer may be traced)."""
  return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, layer, keepdims=False), params["backbone"]["layers"])


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "decode"), donate_argnames=("kv",))
def attend_layer(
  params, layer, x, positions, kv: paged.PagedKV | None, tables, cfg: MixtralConfig, impl: Impl, ops, decode: bool
):
  """Layer `layer`'s attention and router on x [B, T, D] at positions [B, T].

  Returns (x after attention, kv, MoE input h, router logits [B, T, E], routed pool slots [B * T, K]).
  """
  ctx = context(positions, tables, None, ops, cfg, decode)
  net = DecoderLayer(cfg, impl, decode=decode, tenants=ops.num_tenants)
  x, kv, h, logits = net.apply({"params": layer_params(params, layer)}, x, kv, layer, ctx, method=DecoderLayer.attend)
  b, t, _ = x.shape
  smap = slot_row(params["slot_map"], layer, ops)
  if smap.ndim == 2:
    smap = jnp.repeat(smap, t, axis=0)
  _, experts = route(logits.reshape(b * t, -1), cfg.top_k, Router.TOPK_RENORM)
  return x, kv, h, logits, expert_slots(experts, smap)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def experts_layer(params, layer, x, h, logits, cache: dict, cache_of, cfg: MixtralConfig, impl: Impl, ops):
  """Layer `layer`'s experts from the device cache: cache_of [X] maps pool slot -> cache slot."""
  net = DecoderLayer(cfg, impl, tenants=ops.num_tenants)
  smap = cache_of[slot_row(params["slot_map"], layer, ops)]
  return net.apply({"params": layer_params(params, layer)}, x, h, logits, smap, cache, ops, method=DecoderLayer.experts)


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed(params, tokens, cfg: MixtralConfig, ops):
  net = Mixtral(cfg, tenants=ops.num_tenants)
  return net.apply({"params": params["backbone"]}, tokens, ops, method=Mixtral.embed)


@functools.partial(jax.jit, static_argnames=("cfg",))
def head(params, x, logits_at, cfg: MixtralConfig, ops):
  net = Mixtral(cfg, tenants=ops.num_tenants)
  return net.apply({"params": params["backbone"]}, x, ops, logits_at, method=Mixtral.head)


def run(
  params, tokens, positions, kv, tables, cache, cfg: MixtralConfig, impl: Impl, ops, decode: bool, logits_at=None
):
  """Every layer in turn, making each layer's routed experts resident (`cache.ensure`) before they run.

  Returns (float32 logits [B, T or 1, V], kv).
  """
  x = embed(params, tokens, cfg, ops)
  for layer in range(cfg.num_layers):
    x, kv, h, logits, slots = attend_layer(params, layer, x, positions, kv, tables, cfg, impl, ops, decode)
    cache.ensure(slots, layer)
    x = experts_layer(params, layer, x, h, logits, cache.buffers, cache.device_map, cfg, impl, ops)
    cache.prefetch((layer + 1) % cfg.num_layers)  # the next step's first layer after the last
  return head(params, x, logits_at, cfg, ops), kv
