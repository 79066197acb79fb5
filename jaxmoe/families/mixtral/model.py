"""Mixtral as Flax (linen) modules over the served layout, and the jitted functions that apply them.

RMSNorm, RoPE, grouped-query attention with an optional sliding window, the
top-k router and SwiGLU experts behind `jaxmoe.nn.moe.moe`, untied LM head.
Numerics follow Hugging Face `MixtralForCausalLM`: norms, router softmax and
attention softmax in float32.

The modules' variables are exactly the tenant's backbone (layout.py); the
expert pool, the slot map, the KV cache and the weight access (`ops`,
jaxmoe/nn/tenancy.py) come in as arguments, so one backbone, a stack of them
for a mixed batch, and the shared pool stay separate trees. `DecoderLayer` is
scanned over the stacked layers (`nn.scan`): compile time does not grow with
depth, and RoPE tables and masks are built once per call.

One layer function serves the full forward, prefill and decode. The forward
and prefill attend over the call's own keys (causal, windowed); prefill also
writes them into the paged cache (jaxmoe/nn/paged.py); decode writes the new
token's keys into its row's pages and attends over those pages only. Rows of a
batch are independent, so right-padded prompts of different lengths give the
same results as each prompt alone.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxmoe.axes import ArrayLike, Int, checked
from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.families.mixtral.layout import global_shapes, layer_shapes
from jaxmoe.nn import paged, sharding
from jaxmoe.nn.attention import causal_mask, gqa_attention, output_projection
from jaxmoe.nn.moe import Impl, MoeSpec, Router, moe
from jaxmoe.nn.norms import rms_norm
from jaxmoe.nn.rotary import apply_rope, rope_tables
from jaxmoe.nn.tenancy import SingleTenant

F32 = jnp.float32


def init_kv(cfg: MixtralConfig, pages_per_layer: int, page_size: int) -> paged.PagedKV:
  """An empty paged KV cache for every layer (page 0 is the scratch page)."""
  return paged.init(cfg.num_layers, pages_per_layer, page_size, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype))


def kv_page_bytes(cfg: MixtralConfig, page_size: int) -> int:
  return paged.page_bytes(cfg.num_layers, page_size, cfg.num_kv_heads, cfg.head_dim, jnp.dtype(cfg.dtype).itemsize)


def _init(name: str, dtype):
  base = nn.initializers.ones if "norm" in name else nn.initializers.normal(0.02)
  return lambda key, shape: base(key, shape, dtype)


def _shape(tenants: int, shape: tuple[int, ...]) -> tuple[int, ...]:
  return (tenants, *shape) if tenants else shape


@flax.struct.dataclass
class Context:
  """What every layer of one call reads: positions, RoPE tables, masks, pages, the pool, the weight access."""

  positions: jax.Array  # [B, T]
  cos: jax.Array  # [B, T, H]
  sin: jax.Array  # [B, T, H]
  mask: jax.Array | None  # [B, T, T] over the call's own keys (None when attending over pages)
  tables: jax.Array | None  # [B, n] block tables of the paged cache (None: no cache)
  pool: dict | None  # {w1, w3, w2} [X, ...] (None: a stage without experts)
  ops: Any  # SingleTenant | MixedTenants


def context(positions, tables, pool, ops, cfg: MixtralConfig, decode: bool) -> Context:
  cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
  mask = None if decode else causal_mask(positions, positions.shape[1], cfg.sliding_window)
  return Context(positions, cos, sin, mask, tables, pool, ops)


def attend_pages(q, kv: paged.PagedKV, layer, ctx: Context, cfg: MixtralConfig):
  """Queries [B, T, M, G, H] over the rows' pages: jax's Pallas kernel on GPUs (one query, no window; on a
  mesh, one kernel per head shard)."""
  scale = cfg.head_dim**-0.5
  if jax.default_backend() == "gpu" and q.shape[1] == 1 and cfg.sliding_window is None:
    fn = lambda kv, layer, tables, q, pos: paged.attention_pallas_per_head_shard(  # noqa: E731
      q, kv, layer, tables, pos[:, 0] + 1, scale
    )
  else:
    fn = lambda kv, layer, tables, q, pos: paged.attention_reference(  # noqa: E731
      q, kv, layer, tables, pos, scale, cfg.sliding_window
    )
  return paged.per_row(fn, kv, layer, ctx.tables, q, ctx.positions)


class DecoderLayer(nn.Module):
  """One Mixtral layer: attention (over its own keys, or over the paged cache), then the routed experts.

  `attend` and `experts` are its two halves; `__call__` (what the layer scan runs) is both. Run
  apart, they let experts be brought onto the device between them (jaxmoe/serving/experts.py).
  """

  cfg: MixtralConfig
  impl: Impl = Impl.AUTO
  capture: bool = False  # also return the MoE input and router logits
  decode: bool = False  # attend over the pages (after writing the new keys) instead of the call's own keys
  tenants: int = 0  # backbone leaves stacked over this many tenants (0: one tenant)

  def setup(self):
    dtype = jnp.dtype(self.cfg.dtype)
    self.p = {n: self.param(n, _init(n, dtype), _shape(self.tenants, s)) for n, s in layer_shapes(self.cfg).items()}

  def __call__(self, carry, xs, ctx: Context):
    """carry (x [B, T, D], paged KV or None); xs (slot map row [E] or [A, E], layer index)."""
    x, kv = carry
    slot_row, layer = xs
    x, kv, h, router_logits = self.attend(x, kv, layer, ctx)
    x = self.experts(x, h, router_logits, ctx.ops.rows(slot_row), ctx.pool, ctx.ops)
    return (x, kv), ((h, router_logits) if self.capture else None)

  def attend(self, x, kv, layer, ctx: Context):
    """Attention and the router: x [B, T, D] -> (x after attention, kv, MoE input h, router logits [B, T, E])."""
    cfg, ops, p = self.cfg, ctx.ops, self.p
    b, t, _ = x.shape
    h = rms_norm(x, ops.vector(p["attn_norm"]), cfg.rms_norm_eps)
    q = apply_rope(ops.linear("BTD,DNH->BTNH", h, p["q"]), ctx.cos, ctx.sin)
    k = apply_rope(ops.linear("BTD,DMH->BTMH", h, p["k"]), ctx.cos, ctx.sin)
    v = ops.linear("BTD,DMH->BTMH", h, p["v"])
    if kv is not None:  # scatter into the pool, so a donated cache is updated in place
      kv = paged.write(kv, layer, ctx.tables, ctx.positions, k, v)
    q = q.reshape(b, t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim)
    if self.decode:
      out = attend_pages(q, kv, layer, ctx, cfg)
    else:
      out = gqa_attention(q, k, v, ctx.mask, cfg.head_dim**-0.5)
    x = x + output_projection(ops, out.reshape(b, t, cfg.num_heads, cfg.head_dim), p["o"])
    h = rms_norm(x, ops.vector(p["mlp_norm"]), cfg.rms_norm_eps)
    return x, kv, h, ops.linear("BTD,DE->BTE", h, p["router"])

  def experts(self, x, h, router_logits, slot_map, pool, ops):
    """The routed experts on h [B, T, D], added to x; slot_map [E] or per row [B, E] into `pool`."""
    b, t, d = x.shape
    if slot_map.ndim == 2:  # per-row tenant maps [B, E]: one copy per token
      slot_map = jnp.repeat(slot_map, t, axis=0)
    y = moe(
      h.reshape(b * t, d), router_logits.reshape(b * t, -1), slot_map, pool, moe_spec(self.cfg, self.impl, b, ops)
    )
    return x + y.reshape(b, t, d)


def moe_spec(cfg: MixtralConfig, impl: Impl, batch: int, ops) -> MoeSpec:
  reach = cfg.num_experts * max(1, min(batch, ops.num_tenants))  # each row reaches its tenant's E experts
  return MoeSpec(top_k=cfg.top_k, router=Router.TOPK_RENORM, impl=impl, max_slots=reach)


class Mixtral(nn.Module):
  """Embeddings, the scanned decoder layers, the final norm and the LM head."""

  cfg: MixtralConfig
  impl: Impl = Impl.AUTO
  capture: bool = False
  decode: bool = False
  tenants: int = 0

  def setup(self):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    self.g = {n: self.param(n, _init(n, dtype), _shape(self.tenants, s)) for n, s in global_shapes(cfg).items()}
    layers = nn.scan(
      DecoderLayer,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=(0, nn.broadcast),
      length=cfg.num_layers,
    )
    self.layers = layers(cfg, self.impl, self.capture, self.decode, self.tenants)

  def __call__(self, tokens, positions, kv, tables, pool, slot_map, ops, logits_at=None):
    """Runs tokens [B, T] at positions [B, T] through every layer, writing their keys into `kv`.

    `kv` (with block `tables` [B, n]) may be None: no cache (a full forward).
    `logits_at` [B] picks one position per row for the LM head (default: every
    position). Returns (logits float32 [B, T or 1, V], kv, captured (MoE inputs
    [L, B, T, D], router logits [L, B, T, E]) or None).
    """
    cfg = self.cfg
    x = self.embed(tokens, ops)
    ctx = context(positions, tables, pool, ops, cfg, self.decode)
    rows_by_layer = slot_map if slot_map.ndim == 2 else jnp.swapaxes(slot_map, 0, 1)  # [L, E] or [L, A, E]
    (x, kv), captured = self.layers((x, kv), (rows_by_layer, jnp.arange(cfg.num_layers)), ctx)
    return self.head(x, ops, logits_at), kv, captured

  def embed(self, tokens, ops):
    return ops.embed(self.g["embed"], tokens)

  def head(self, x, ops, logits_at=None):
    """The final norm and the LM head: x [B, T, D] -> float32 logits [B, T (or 1 at logits_at [B]), V]."""
    x = rms_norm(x, ops.vector(self.g["norm"]), self.cfg.rms_norm_eps)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)  # [B, 1, D]
    return sharding.constrain(ops.linear("BTD,DV->BTV", x, self.g["lm_head"]).astype(F32), "batch")


def _apply(params, tokens, positions, kv, tables, cfg, impl, ops, logits_at=None, capture=False, decode=False):
  model = Mixtral(cfg, impl, capture, decode, ops.num_tenants)
  return model.apply(
    {"params": params["backbone"]}, tokens, positions, kv, tables, params["experts"], params["slot_map"], ops, logits_at
  )


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "capture"))
@checked
def forward(
  params,
  tokens: Int[ArrayLike, "B T"],
  cfg: MixtralConfig,
  impl: Impl = Impl.AUTO,
  ops=SingleTenant(),
  capture: bool = False,
):
  """Full causal forward pass (no cache).

  Args:
    params: the served layout (layout.py).
    tokens: [B, T] int32.
    cfg: model config (static).
    impl: MoE strategy (static).
    ops: SingleTenant(), or MixedTenants(ids) with stacked backbones.
    capture: also return {"moe_inputs": [L, B, T, D], "router_logits": [L, B, T, E]}.

  Returns:
    logits [B, T, V] float32, or (logits, captured) when `capture`.
  """
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, _, captured = _apply(params, tokens, positions, None, None, cfg, impl, ops, capture=capture)
  if capture:
    return logits, {"moe_inputs": captured[0], "router_logits": captured[1]}
  return logits


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("kv",))
@checked
def prefill(
  params,
  tokens: Int[ArrayLike, "B T"],
  lengths: Int[ArrayLike, "B"],
  kv: paged.PagedKV,
  tables: Int[ArrayLike, "B W"],
  cfg: MixtralConfig,
  impl: Impl = Impl.AUTO,
  ops=SingleTenant(),
):
  """Right-padded prompts [B, T] of `lengths` [B] into their pages (`tables`), attending over themselves.

  Returns (logits of each row's last prompt token [B, V] float32, kv).
  """
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, kv, _ = _apply(params, tokens, positions, kv, tables, cfg, impl, ops, logits_at=lengths - 1)
  return logits[:, 0], kv


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("kv",))
@checked
def decode_step(
  params,
  tokens: Int[ArrayLike, "B"],
  kv: paged.PagedKV,
  tables: Int[ArrayLike, "B n"],
  lengths: Int[ArrayLike, "B"],
  cfg: MixtralConfig,
  impl: Impl = Impl.AUTO,
  ops=SingleTenant(),
):
  """One token per row [B] at position lengths [B], attending over the rows' pages tables [B, n].

  Returns (logits [B, V] float32, kv); the caller advances the lengths.
  """
  logits, kv, _ = _apply(params, tokens[:, None], lengths[:, None], kv, tables, cfg, impl, ops, decode=True)
  return logits[:, 0], kv


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def layer_step(layer: dict, pool: dict, slot_row, x, cfg: MixtralConfig, impl: Impl = Impl.AUTO):
  """One decoder layer on x [B, T, D] (full causal attention, no cache kept).

  `layer` holds one layer's leaves (no L axis), `slot_row` [E] its slot map.
  Returns (the layer's output [B, T, D], its MoE input [B, T, D]).
  """
  b, t, _ = x.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  ctx = context(positions, None, pool, SingleTenant(), cfg, decode=False)
  (x, _), (h, _) = DecoderLayer(cfg, impl, capture=True).apply({"params": layer}, (x, None), (slot_row, 0), ctx)
  return x, h
