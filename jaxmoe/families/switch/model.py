"""Switch Transformer (T5-style encoder-decoder, top-1 MoE) as Flax (linen) modules, and its jitted functions.

Numerics follow transformers 5 `SwitchTransformersForConditionalGeneration`:
T5 RMS norm (no mean, no bias), no 1/sqrt(H) attention scaling, bucketed
relative-position bias (bidirectional in the encoder, causal in the decoder,
none in cross-attention), router in float32 with softmax top-1 whose
probability scales the expert output, no jitter (inference), and with tied
embeddings the decoder output scaled by D**-0.5 before `embed.T`. Untied,
transformers 5 gives each stack its own input embedding (HF `shared` is unused).
`cfg.routing` picks dropless experts or HF's per-sequence expert capacity.

The modules' variables are exactly the backbone (layout.py); pool, slot map,
cache and weight access (`ops`) are arguments. Each stack scans over groups of
`layout.period` blocks (the period of its sparse pattern), so compile time
does not grow with depth; position biases and masks are built once per call.

Decoding: `encode` runs once per request; `prefill` runs the first decoder
tokens and writes each decoder block's cross-attention keys/values of the
encoder output into the cache; `decode_step` appends one token per row. Rows
are independent, so right-padded batches equal each row alone.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.axes import ArrayLike, Int, checked
from jaxmoe.families.switch import layout
from jaxmoe.families.switch.config import Routing, SwitchConfig
from jaxmoe.nn.attention import biased_attention
from jaxmoe.nn.moe import Impl, MoeSpec, Router, moe
from jaxmoe.nn.norms import rms_norm
from jaxmoe.nn.tenancy import SingleTenant

F32 = jnp.float32


@flax.struct.dataclass
class SwitchCache:
  """Decoder self-attention keys/values, and each decoder block's view of the encoder output."""

  k: jax.Array  # [L, B, S, N, H], L decoder blocks
  v: jax.Array  # [L, B, S, N, H]
  lengths: jax.Array  # [B] int32, decoder positions filled
  cross_k: jax.Array  # [L, B, U, N, H]
  cross_v: jax.Array  # [L, B, U, N, H]
  enc_lengths: jax.Array  # [B] int32, valid encoder positions

  @property
  def max_len(self) -> int:
    return self.k.shape[2]

  @property
  def enc_len(self) -> int:
    return self.cross_k.shape[2]


def init_cache(cfg: SwitchConfig, batch: int, max_len: int, enc_len: int) -> SwitchCache:
  dtype = jnp.dtype(cfg.dtype)
  self_shape = (cfg.num_decoder_layers, batch, max_len, cfg.num_heads, cfg.head_dim)
  cross_shape = (cfg.num_decoder_layers, batch, enc_len, cfg.num_heads, cfg.head_dim)
  lengths = lambda: jnp.zeros((batch,), jnp.int32)  # noqa: E731  distinct buffers: the cache is donated
  return SwitchCache(
    jnp.zeros(self_shape, dtype),
    jnp.zeros(self_shape, dtype),
    lengths(),
    jnp.zeros(cross_shape, dtype),
    jnp.zeros(cross_shape, dtype),
    lengths(),
  )


@functools.cache
def bucket_table(num_buckets: int, max_distance: int) -> np.ndarray:
  """One side's bucket for each distance 0..max_distance (T5 relative-position buckets).

  Half the buckets are exact distances, the rest logarithmic up to
  max_distance; larger distances share the last bucket. Computed on the host
  in float32 the way transformers does (a correctly rounded log), so bucket
  boundaries land exactly where torch puts them on every backend. Entries run
  to max(max_distance, exact buckets); farther distances use the last entry.
  """
  max_exact = num_buckets // 2
  dist = np.arange(max(max_distance, max_exact) + 1)
  if max_distance > max_exact:
    ratio = np.maximum(dist, max_exact).astype(np.float32) / np.float32(max_exact)
    log = np.log(ratio.astype(np.float64)).astype(np.float32)
    scaled = log / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  else:  # no logarithmic range (transformers divides by log(1) = 0 there): the last bucket
    large = np.full(dist.shape, num_buckets - 1)
  return np.where(dist < max_exact, dist, large).astype(np.int32)


def relative_buckets(rel, cfg: SwitchConfig, bidirectional: bool):
  """Relative positions (key - query) int [...] -> bucket ids [...] in [0, Z)."""
  n = cfg.relative_attention_num_buckets
  if bidirectional:
    n //= 2
    offset, dist = jnp.where(rel > 0, n, 0), jnp.abs(rel)
  else:
    offset, dist = 0, jnp.maximum(-rel, 0)
  table = bucket_table(n, cfg.relative_attention_max_distance)
  return offset + jnp.asarray(table)[jnp.minimum(dist, len(table) - 1)]


def position_bias(table, rel, cfg: SwitchConfig, bidirectional: bool, ops):
  """rel [b, T, S] (b = 1 or B) -> bias [b or B, N, T, S] from a [Z, N] table (per row's tenant)."""
  b, t, s = rel.shape
  buckets = relative_buckets(rel, cfg, bidirectional).reshape(b, t * s)
  values = ops.embed(table, buckets)  # [b or B, T*S, N]
  return jnp.einsum("BTSN->BNTS", values.reshape(values.shape[0], t, s, -1))


def _init(name: str, dtype):
  base = nn.initializers.ones if "norm" in name else nn.initializers.normal(0.02)
  return lambda key, shape: base(key, shape, dtype)


def _shape(tenants: int, shape: tuple[int, ...]) -> tuple[int, ...]:
  return (tenants, *shape) if tenants else shape


@flax.struct.dataclass
class Context:
  """What every block of one stack reads in one call."""

  bias: jax.Array  # [b, N, T, S] self-attention position bias
  mask: jax.Array  # [B, T, S] self-attention mask
  pool: dict  # {wi, wo} [X, ...]
  ops: Any  # SingleTenant | MixedTenants
  positions: jax.Array | None = None  # decoder: [B, T] where the new keys go
  cross_mask: jax.Array | None = None  # decoder: [B, T, U]
  enc_out: jax.Array | None = None  # decoder prefill: [B, U, D] encoder output, for cross keys/values


class Block(nn.Module):
  """One encoder or decoder block: self-attention, (decoder) cross-attention, dense or sparse MLP."""

  cfg: SwitchConfig
  impl: Impl
  stack: str
  sparse: bool
  tenants: int = 0
  write_cross: bool = False  # decoder: compute the cross keys/values of ctx.enc_out into the cache

  @nn.compact
  def __call__(self, x, ctx: Context, slot_row, layer=None, caches=None):
    cfg, ops, eps = self.cfg, ctx.ops, self.cfg.layer_norm_eps
    dtype = jnp.dtype(cfg.dtype)
    shapes = layout.block_shapes(cfg, self.stack, self.sparse)
    p = {n: self.param(n, _init(n, dtype), _shape(self.tenants, s)) for n, s in shapes.items()}
    heads = lambda h, names: [ops.linear("BTD,DNH->BTNH", h, p[n]) for n in names]  # noqa: E731
    q, k, v = heads(rms_norm(x, ops.vector(p["attn_norm"]), eps), ("q", "k", "v"))
    if caches is None:  # encoder: bidirectional over the prompt
      x = x + ops.linear("BTNH,NHD->BTD", biased_attention(q, k, v, ctx.bias, ctx.mask), p["o"])
    else:
      k_all, v_all, ck_all, cv_all = caches
      rows = jnp.arange(x.shape[0])[:, None]
      # Scatter into the stacked cache so a donated cache is updated in place.
      k_all = k_all.at[layer, rows, ctx.positions].set(k.astype(k_all.dtype), mode="drop")
      v_all = v_all.at[layer, rows, ctx.positions].set(v.astype(v_all.dtype), mode="drop")
      x = x + ops.linear("BTNH,NHD->BTD", biased_attention(q, k_all[layer], v_all[layer], ctx.bias, ctx.mask), p["o"])
      if self.write_cross:
        u = ctx.enc_out.shape[1]
        ck, cv = heads(ctx.enc_out, ("ck", "cv"))
        ck_all = ck_all.at[layer, :, :u].set(ck.astype(ck_all.dtype))
        cv_all = cv_all.at[layer, :, :u].set(cv.astype(cv_all.dtype))
      (cq,) = heads(rms_norm(x, ops.vector(p["cross_norm"]), eps), ("cq",))
      cross = biased_attention(cq, ck_all[layer], cv_all[layer], None, ctx.cross_mask)  # no position bias
      x = x + ops.linear("BTNH,NHD->BTD", cross, p["co"])
      caches = (k_all, v_all, ck_all, cv_all)
    x = x + self.feed_forward(p, rms_norm(x, ops.vector(p["mlp_norm"]), eps), ctx, slot_row)
    return x, caches

  def feed_forward(self, p, h, ctx: Context, slot_row):
    """The block's MLP on its normed input h [B, T, D]: dense relu(h wi) wo, or the routed experts."""
    cfg, ops = self.cfg, ctx.ops
    b, t, d = h.shape
    if not self.sparse:
      up = jax.nn.relu(ops.linear("BTD,DF->BTF", h, p["wi"]))
      return ops.linear("BTF,FD->BTD", up.astype(h.dtype), p["wo"])
    logits = ops.linear("BTD,DE->BTE", h.astype(F32), p["router"].astype(F32)).reshape(b * t, -1)
    self.sow("intermediates", "router_logits", logits)  # [B*T, E]; kept only when applied with it mutable (training)
    slot_map = ops.rows(slot_row)
    if slot_map.ndim == 2:  # per-row tenant maps: one copy per token
      slot_map = jnp.repeat(slot_map, t, axis=0)
    capacity = cfg.expert_capacity if cfg.routing is Routing.HF_CAPACITY else None
    spec = MoeSpec(
      top_k=1,
      router=Router.TOP1,
      impl=self.impl,
      capacity=capacity,
      group_size=t,
      max_slots=cfg.num_experts * max(1, min(b, self.tenants)),
    )
    return moe(h.reshape(b * t, d), logits, slot_map, ctx.pool, spec).reshape(b, t, d)


class Group(nn.Module):
  """`layout.period` consecutive blocks of one stack; scanned over the stack's groups."""

  cfg: SwitchConfig
  impl: Impl
  stack: str
  tenants: int = 0
  write_cross: bool = False

  @nn.compact
  def __call__(self, carry, xs, ctx: Context):
    """carry x [B, T, D] (decoder: and the caches); xs (slot rows [sparse per group, E or A, E], group)."""
    x, caches = carry
    slot_rows, group = xs
    pattern = layout.pattern(self.cfg, self.stack)
    m = 0
    for j, sparse in enumerate(pattern):
      block = Block(self.cfg, self.impl, self.stack, sparse, self.tenants, self.write_cross, name=f"block_{j}")
      x, caches = block(x, ctx, slot_rows[m] if sparse else None, group * len(pattern) + j, caches)
      m += sparse
    return (x, caches), None


def stack_slot_rows(cfg: SwitchConfig, stack: str, slot_map, tenants: int):
  """The stack's MoE rows of slot_map ([L, E], or [A, L, E] stacked) as [G, sparse per group, (A,) E]."""
  rows = slot_map if not tenants else jnp.swapaxes(slot_map, 0, 1)  # [L, (A,) E]
  first = sum(cfg.encoder_sparse) if stack == "decoder" else 0
  count = sum(layout.stack_sparse(cfg, stack))
  g = layout.num_groups(cfg, stack)
  return rows[first : first + count].reshape(g, count // g, *rows.shape[1:])


class Stack(nn.Module):
  """The encoder or the decoder: its own embedding (untied), position bias table, groups, final norm."""

  cfg: SwitchConfig
  impl: Impl
  stack: str
  tenants: int = 0
  write_cross: bool = False

  @nn.compact
  def __call__(self, tokens, shared_embed, ctx_fn, slot_map, ops, caches=None):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    own = layout.global_shapes(cfg)[self.stack]
    g = {n: self.param(n, _init(n, dtype), _shape(self.tenants, s)) for n, s in own.items()}
    x = ops.embed(g.get("embed", shared_embed), tokens)
    ctx = ctx_fn(g["rel_bias"])
    groups = nn.scan(
      Group,
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True},
      in_axes=(0, nn.broadcast),
      length=layout.num_groups(cfg, self.stack),
    )
    xs = (stack_slot_rows(cfg, self.stack, slot_map, self.tenants), jnp.arange(layout.num_groups(cfg, self.stack)))
    (x, caches), _ = groups(cfg, self.impl, self.stack, self.tenants, self.write_cross, name="layers")(
      (x, caches), xs, ctx
    )
    return rms_norm(x, ops.vector(g["norm"]), cfg.layer_norm_eps), caches


class Switch(nn.Module):
  """The whole encoder-decoder; `encode` and `decode` are the serving path's two halves."""

  cfg: SwitchConfig
  impl: Impl = Impl.AUTO
  tenants: int = 0
  write_cross: bool = False  # decode: fill the cross-attention cache from enc_out first

  def setup(self):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    roots = {k: v for k, v in layout.global_shapes(cfg).items() if k not in layout.STACKS}
    self.roots = {n: self.param(n, _init(n, dtype), _shape(self.tenants, s)) for n, s in roots.items()}
    self.encoder = Stack(cfg, self.impl, "encoder", self.tenants)
    self.decoder = Stack(cfg, self.impl, "decoder", self.tenants, self.write_cross)

  def encode(self, tokens, lengths, pool, slot_map, ops):
    """tokens [B, U] right-padded to `lengths` [B] -> final-normed encoder output [B, U, D]."""
    b, u = tokens.shape
    pos = jnp.arange(u)
    mask = jnp.broadcast_to(pos[None, None, :] < lengths[:, None, None], (b, u, u))

    def ctx(table):
      bias = position_bias(table, (pos[None, :] - pos[:, None])[None], self.cfg, True, ops)
      return Context(bias, mask, pool, ops)

    x, _ = self.encoder(tokens, self.roots.get("embed"), ctx, slot_map, ops)
    return x

  def decode(self, tokens, positions, cache: SwitchCache, pool, slot_map, ops, enc_out=None, logits_at=None):
    """Decoder tokens [B, T] at `positions` [B, T] over the cache -> (logits [B, T or 1, V] float32, cache)."""
    b, t = tokens.shape
    keys = jnp.arange(cache.max_len)
    rel = keys[None, None, :] - positions[:, :, None]  # [B, T, S]
    cross_mask = jnp.broadcast_to(
      jnp.arange(cache.enc_len)[None, None, :] < cache.enc_lengths[:, None, None], (b, t, cache.enc_len)
    )

    def ctx(table):
      bias = position_bias(table, rel, self.cfg, False, ops)
      return Context(bias, rel <= 0, pool, ops, positions, cross_mask, enc_out)

    caches = (cache.k, cache.v, cache.cross_k, cache.cross_v)
    x, (k, v, ck, cv) = self.decoder(tokens, self.roots.get("embed"), ctx, slot_map, ops, caches)
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    return self.lm_head(x, ops), cache.replace(k=k, v=v, cross_k=ck, cross_v=cv)

  def lm_head(self, x, ops):
    """Decoder output [B, T, D] -> float32 logits [B, T, V]."""
    if self.cfg.tie_word_embeddings:  # Mesh TensorFlow's rescale before the tied projection
      table = jnp.swapaxes(self.roots["embed"], -1, -2)
      return ops.linear("BTD,DV->BTV", x * self.cfg.hidden_size**-0.5, table).astype(F32)
    return ops.linear("BTD,DV->BTV", x, self.roots["lm_head"]).astype(F32)

  def __call__(self, enc_tokens, enc_lengths, dec_tokens, pool, slot_map, ops):
    """The full pass (what `init` traces): encoder, then the decoder over a fresh cache."""
    b, t = dec_tokens.shape
    enc = self.encode(enc_tokens, enc_lengths, pool, slot_map, ops)
    cache = init_cache(self.cfg, b, t, enc_tokens.shape[1]).replace(enc_lengths=enc_lengths.astype(jnp.int32))
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return self.decode(dec_tokens, positions, cache, pool, slot_map, ops, enc_out=enc)[0]


def _model(cfg, impl, ops, write_cross=False) -> Switch:
  return Switch(cfg, impl, ops.num_tenants, write_cross)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
@checked
def encode(
  params,
  tokens: Int[ArrayLike, "B U"],
  lengths: Int[ArrayLike, B],
  cfg: SwitchConfig,
  impl: Impl = Impl.AUTO,
  ops=SingleTenant(),
):
  """The encoder, once per request.

  Args:
    params: the served layout (layout.py).
    tokens: [B, U] int32, right-padded.
    lengths: [B] int32 valid encoder tokens per row (>= 1).
    cfg: model config (static).
    impl: MoE strategy (static).
    ops: SingleTenant(), or MixedTenants(ids) with stacked backbones.

  Returns:
    [B, U, D] encoder output in the model dtype (padding positions are junk).
  """
  return _model(cfg, impl, ops).apply(
    {"params": params["backbone"]}, tokens, lengths, params["experts"], params["slot_map"], ops, method=Switch.encode
  )


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
@checked
def prefill(
  params,
  enc_out,
  enc_lengths: Int[ArrayLike, B],
  tokens: Int[ArrayLike, "B T"],
  lengths: Int[ArrayLike, B],
  cache: SwitchCache,
  cfg: SwitchConfig,
  impl: Impl = Impl.AUTO,
  ops=SingleTenant(),
):
  """Stores the encoder output's cross keys/values and runs decoder tokens [B, T] of `lengths` [B].

  enc_out [B, U, D] with `enc_lengths` [B] from `encode`; the cache is empty
  and donated. Returns (logits of each row's last decoder token [B, V], cache).
  """
  b, t = tokens.shape
  cache = cache.replace(enc_lengths=enc_lengths.astype(jnp.int32))
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, cache = _model(cfg, impl, ops, write_cross=True).apply(
    {"params": params["backbone"]},
    tokens,
    positions,
    cache,
    params["experts"],
    params["slot_map"],
    ops,
    enc_out,
    lengths - 1,
    method=Switch.decode,
  )
  return logits[:, 0], cache.replace(lengths=lengths.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
@checked
def decode_step(
  params, tokens: Int[ArrayLike, B], cache: SwitchCache, cfg: SwitchConfig, impl: Impl = Impl.AUTO, ops=SingleTenant()
):
  """Appends one decoder token per row [B] at each row's length; returns (logits [B, V], cache)."""
  logits, cache = _model(cfg, impl, ops).apply(
    {"params": params["backbone"]},
    tokens[:, None],
    cache.lengths[:, None],
    cache,
    params["experts"],
    params["slot_map"],
    ops,
    method=Switch.decode,
  )
  return logits[:, 0], cache.replace(lengths=cache.lengths + 1)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
@checked
def forward(
  params,
  enc_tokens: Int[ArrayLike, "B U"],
  enc_lengths: Int[ArrayLike, B],
  dec_tokens: Int[ArrayLike, "B T"],
  cfg: SwitchConfig,
  impl: Impl = Impl.AUTO,
  ops=SingleTenant(),
):
  """Full pass, as HF `model(input_ids, attention_mask, decoder_input_ids).logits`.

  Args:
    enc_tokens: [B, U] int32 right-padded encoder input, `enc_lengths` [B] valid.
    dec_tokens: [B, T] int32 decoder input (HF's decoder_input_ids: starting
      with decoder_start_token_id, not shifted here).

  Returns:
    logits [B, T, V] float32.
  """
  return _model(cfg, impl, ops, write_cross=True).apply(
    {"params": params["backbone"]}, enc_tokens, enc_lengths, dec_tokens, params["experts"], params["slot_map"], ops
  )
