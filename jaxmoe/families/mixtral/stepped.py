"""Mixtral one layer at a time, for an expert cache smaller than the pool (jaxmoe/serving/experts.py).

The scanned model needs every routed expert on the device before the step
starts; these programs stop between a layer's router and its experts instead:
a program runs a layer's attention and router and returns the pool slots its
tokens routed to (a small [T, K] array, the step's one sync per layer); the
caller makes those slots resident; the next program runs the layer's experts
from the cache (the slot map translated pool slot -> cache slot) and the next
layer up to its router. So a step is L + 1 dispatches: `first` (embedding,
layer 0's attention), `between` (layer l's experts, layer l + 1's attention),
`last` (the last experts, the LM head). The layer index is an argument, so
each program compiles once for every layer. The math
is the model's own (`DecoderLayer.attend`, `DecoderLayer.experts`), so outputs
equal the scanned model's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.families.mixtral.model import DecoderLayer, Mixtral, context
from jaxmoe.nn.moe_ops import Impl, Router, expert_slots, route
from jaxmoe.nn.tenancy import slot_row


def layer_params(params, layer):
  """One layer's backbone leaves out of the stacked ones (layer may be traced)."""
  return jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, layer, keepdims=False), params["backbone"]["layers"])


def attend(params, layer, x, positions, kv, tables, cfg: MixtralConfig, impl: Impl, ops, decode: bool):
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


def experts(params, layer, x, h, logits, cache: dict, cache_of, cfg: MixtralConfig, impl: Impl, ops):
  """Layer `layer`'s experts from the device cache: cache_of [X] maps pool slot -> cache slot."""
  net = DecoderLayer(cfg, impl, tenants=ops.num_tenants)
  smap = cache_of[slot_row(params["slot_map"], layer, ops)]
  return net.apply({"params": layer_params(params, layer)}, x, h, logits, smap, cache, ops, method=DecoderLayer.experts)


STATIC = ("cfg", "impl", "decode")


@functools.partial(jax.jit, static_argnames=STATIC, donate_argnames=("kv",))
def first(params, tokens, positions, kv, tables, cfg: MixtralConfig, impl: Impl, ops, decode: bool):
  """The embedding and layer 0 up to its router (as `attend`)."""
  x = Mixtral(cfg, tenants=ops.num_tenants).apply({"params": params["backbone"]}, tokens, ops, method=Mixtral.embed)
  return attend(params, 0, x, positions, kv, tables, cfg, impl, ops, decode)


@functools.partial(jax.jit, static_argnames=STATIC, donate_argnames=("kv",))
def between(params, layer, x, h, logits, cache, cache_of, positions, kv, tables, cfg, impl, ops, decode: bool):
  """Layer `layer`'s experts, then layer + 1 up to its router: one program, one sync, per layer."""
  x = experts(params, layer, x, h, logits, cache, cache_of, cfg, impl, ops)
  return attend(params, layer + 1, x, positions, kv, tables, cfg, impl, ops, decode)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def last(params, layer, x, h, logits, cache, cache_of, logits_at, cfg: MixtralConfig, impl: Impl, ops):
  """The last layer's experts and the LM head: float32 logits [B, T (or 1 at logits_at), V]."""
  x = experts(params, layer, x, h, logits, cache, cache_of, cfg, impl, ops)
  return Mixtral(cfg, tenants=ops.num_tenants).apply(
    {"params": params["backbone"]}, x, ops, logits_at, method=Mixtral.head
  )


def run(
  params, tokens, positions, kv, tables, cache, cfg: MixtralConfig, impl: Impl, ops, decode: bool, logits_at=None
):
  """Every layer in turn, making each layer's routed experts resident (`cache.ensure`) before they run.

  Returns (float32 logits [B, T or 1, V], kv).
  """
  x, kv, h, logits, slots = first(params, tokens, positions, kv, tables, cfg, impl, ops, decode)
  n = cfg.num_layers
  for layer in range(n - 1):
    cache.ensure(slots, layer)
    args = (params, layer, x, h, logits, cache.buffers, cache.device_map, positions, kv, tables, cfg, impl, ops)
    x, kv, h, logits, slots = between(*args, decode)
    cache.prefetch((layer + 2) % n)  # overlaps this program; the next step's layer 0 after the last
  cache.ensure(slots, n - 1)
  logits = last(params, n - 1, x, h, logits, cache.buffers, cache.device_map, logits_at, cfg, impl, ops)
  cache.prefetch(1 % n)
  return logits, kv
