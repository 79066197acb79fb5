"""Switch Transformer (T5-style encoder-decoder, top-1 MoE) as Flax (linen) modules, and its jitted functions.

Numerics follow transformers 5 `SwitchTransformersForConditionalGeneration`:
T5 RMS norm (no mean, no bias), no 1/sqrt(H) attention scaling, bucketed
relative-position bias (position.py: bidirectional in the encoder, causal in the decoder,
none in cross-attention), router in float32 with softmax top-1 whose
probability scales the expert output, no jitter (inference), and with tied
embeddings the decoder output scaled by D**-0.5 before `embed.T`. Untied,
transformers 5 gives each stack its own input embedding (HF `shared` is unused).
`cfg.routing` picks dropless experts or HF's per-sequence expert capacity.

The modules' variables are exactly the backbone (layout.py); pool, slot map,
cache and weight access (`ops`) are arguments. Each stack scans over groups of
`layout.period` blocks (the period of its sparse pattern), so compile time
does not grow with depth; position biases and masks are built once per call.

Decoding uses one paged KV pool (jaxmoe/nn/paged.py) for both caches: each
row has self-attention pages (its decoder tokens) and cross-attention pages
(each decoder block's keys/values of the encoder output). `encode` runs once
per request; `start` writes the cross pages and runs the decoder start token;
`decode_step` appends one token per row, attending over the row's pages only.
Rows are independent, so right-padded batches equal each row alone.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxmoe.axes import ArrayLike, Int, checked
from jaxmoe.families.switch import layout
from jaxmoe.families.switch.config import Routing, SwitchConfig
from jaxmoe.families.switch.position import position_bias
from jaxmoe.nn import paged, sharding
from jaxmoe.nn.attention import biased_attention, output_projection
from jaxmoe.nn.moe import Impl, MoeSpec, Router, moe
from jaxmoe.nn.norms import rms_norm
from jaxmoe.nn.tenancy import SingleTenant

F32 = jnp.float32


def init_kv(cfg: SwitchConfig, pages_per_layer: int, page_size: int) -> paged.PagedKV:
  """An empty paged pool for every decoder block's self and cross keys/values (page 0: scratch)."""
  return paged.init(
    cfg.num_decoder_layers, pages_per_layer, page_size, cfg.num_heads, cfg.head_dim, jnp.dtype(cfg.dtype)
  )


def kv_page_bytes(cfg: SwitchConfig, page_size: int) -> int:
  return paged.page_bytes(cfg.num_decoder_layers, page_size, cfg.num_heads, cfg.head_dim, jnp.dtype(cfg.dtype).itemsize)


def _attend_pages(kv: paged.PagedKV, layer, tables, q, bias, mask):
  """T5 attention of queries q [B, T, N, H] over the rows' pages of layer `layer`."""
  k = paged.gather(kv.k, layer, kv.pages_per_layer, tables)
  v = paged.gather(kv.v, layer, kv.pages_per_layer, tables)
  return biased_attention(q, k, v, bias, mask)


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
  cross_mask: jax.Array | None = None  # decoder: [B, T, U'] over the encoder keys
  enc_out: jax.Array | None = None  # decoder: [B, U, D] encoder output (fresh cross keys, or to write)
  tables: jax.Array | None = None  # decoder with a cache: [B, n] self-attention pages
  cross_tables: jax.Array | None = None  # decoder with a cache: [B, c] cross-attention pages


def encoder_context(cfg: SwitchConfig, tokens, lengths, pool, ops):
  """The encoder blocks' context, as a function of the stack's position-bias table, for tokens [B, U]
  right-padded to `lengths` [B]."""
  b, u = tokens.shape
  pos = jnp.arange(u)
  mask = jnp.broadcast_to(pos[None, None, :] < lengths[:, None, None], (b, u, u))

  def ctx(table):
    return Context(position_bias(table, (pos[None, :] - pos[:, None])[None], cfg, True, ops), mask, pool, ops)

  return ctx


def decoder_context(cfg: SwitchConfig, tokens, positions, enc_lengths, pool, ops, kv, tables, cross_tables, enc_out):
  """The decoder blocks' context, as a function of the stack's position-bias table (arguments as
  `Switch.decode`)."""
  b, t = tokens.shape
  num_keys = t if kv is None else tables.shape[1] * kv.page_size
  num_enc = enc_out.shape[1] if kv is None else cross_tables.shape[1] * kv.page_size
  rel = jnp.arange(num_keys)[None, None, :] - positions[:, :, None]  # [B, T, S]
  cross_mask = jnp.broadcast_to(jnp.arange(num_enc)[None, None, :] < enc_lengths[:, None, None], (b, t, num_enc))

  def ctx(table):
    bias = position_bias(table, rel, cfg, False, ops)
    return Context(bias, rel <= 0, pool, ops, positions, cross_mask, enc_out, tables, cross_tables)

  return ctx


class Block(nn.Module):
  """One encoder or decoder block: self-attention, (decoder) cross-attention, dense or sparse MLP.

  `attend` (attention and, in a sparse block, the router) and `experts` are its two halves; run
  apart, experts can be brought onto the device between them (jaxmoe/serving/experts.py).
  """

  cfg: SwitchConfig
  impl: Impl
  stack: str
  sparse: bool
  tenants: int = 0
  write_cross: bool = False  # decoder with a cache: first write ctx.enc_out's cross keys/values into its pages

  def setup(self):
    dtype = jnp.dtype(self.cfg.dtype)
    shapes = layout.block_shapes(self.cfg, self.stack, self.sparse)
    self.p = {n: self.param(n, _init(n, dtype), _shape(self.tenants, s)) for n, s in shapes.items()}

  def __call__(self, x, ctx: Context, slot_row, layer=None, kv: paged.PagedKV | None = None):
    x, kv, h, logits = self.attend(x, ctx, layer, kv)
    if not self.sparse:
      return x + self.dense(h, ctx.ops), kv
    return self.experts(x, h, logits, ctx.ops.rows(slot_row), ctx.pool, ctx.ops), kv

  def attend(self, x, ctx: Context, layer=None, kv: paged.PagedKV | None = None):
    """Self- (and cross-) attention: x [B, T, D] -> (x, kv, normed MLP input h, router logits [B*T, E] or None)."""
    ops, p, eps = ctx.ops, self.p, self.cfg.layer_norm_eps
    heads = lambda h, names: [ops.linear("BTD,DNH->BTNH", h, p[n]) for n in names]  # noqa: E731
    q, k, v = heads(rms_norm(x, ops.vector(p["attn_norm"]), eps), ("q", "k", "v"))
    if self.stack == "decoder" and kv is not None:  # scatter into the pool: a donated cache updates in place
      kv = paged.write(kv, layer, ctx.tables, ctx.positions, k, v)
      out = paged.per_row(_attend_pages, kv, layer, ctx.tables, q, ctx.bias, ctx.mask)
    else:
      out = biased_attention(q, k, v, ctx.bias, ctx.mask)
    x = x + output_projection(ops, out, p["o"])
    if self.stack == "decoder":
      x, kv = self.cross_attention(x, ctx, layer, kv, heads)
    h = rms_norm(x, ops.vector(p["mlp_norm"]), eps)
    if not self.sparse:
      return x, kv, h, None
    b, t, _ = h.shape
    logits = ops.linear("BTD,DE->BTE", h.astype(F32), p["router"].astype(F32)).reshape(b * t, -1)
    self.sow("intermediates", "router_logits", logits)  # [B*T, E]: the training loss balances routing
    return x, kv, h, logits

  def cross_attention(self, x, ctx: Context, layer, kv, heads):
    """Attention over the encoder output: its fresh keys, or the row's cross pages (written first if asked)."""
    (cq,) = heads(rms_norm(x, ctx.ops.vector(self.p["cross_norm"]), self.cfg.layer_norm_eps), ("cq",))
    if kv is None or self.write_cross:
      ck, cv = heads(ctx.enc_out, ("ck", "cv"))
    if kv is not None:
      if self.write_cross:
        b, u = ctx.enc_out.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(u, dtype=jnp.int32), (b, u))
        kv = paged.write(kv, layer, ctx.cross_tables, positions, ck, cv)
      cross = paged.per_row(_attend_pages, kv, layer, ctx.cross_tables, cq, None, ctx.cross_mask)
    else:
      cross = biased_attention(cq, ck, cv, None, ctx.cross_mask)  # no position bias
    return x + output_projection(ctx.ops, cross, self.p["co"]), kv

  def dense(self, h, ops):
    """A dense block's MLP on its normed input h [B, T, D]: relu(h wi) wo."""
    up = jax.nn.relu(ops.linear("BTD,DF->BTF", h, self.p["wi"]))
    return ops.linear("BTF,FD->BTD", up.astype(h.dtype), self.p["wo"])

  def experts(self, x, h, logits, slot_map, pool, ops):
    """A sparse block's routed experts on h [B, T, D], added to x; slot_map [E] or per row [B, E] into `pool`."""
    cfg = self.cfg
    b, t, d = h.shape
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
    return x + moe(h.reshape(b * t, d), logits, slot_map, pool, spec).reshape(b, t, d)


class Group(nn.Module):
  """`layout.period` consecutive blocks of one stack; scanned over the stack's groups."""

  cfg: SwitchConfig
  impl: Impl
  stack: str
  tenants: int = 0
  write_cross: bool = False

  @nn.compact
  def __call__(self, carry, xs, ctx: Context):
    """carry (x [B, T, D], paged KV or None); xs (slot rows [sparse per group, (A,) E], group index)."""
    x, kv = carry
    slot_rows, group = xs
    pattern = layout.pattern(self.cfg, self.stack)
    m = 0
    for j, sparse in enumerate(pattern):
      block = Block(self.cfg, self.impl, self.stack, sparse, self.tenants, self.write_cross, name=f"block_{j}")
      x, kv = block(x, ctx, slot_rows[m] if sparse else None, group * len(pattern) + j, kv)
      m += sparse
    return (x, kv), None


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

  def setup(self):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    own = layout.global_shapes(cfg)[self.stack]
    self.g = {n: self.param(n, _init(n, dtype), _shape(self.tenants, s)) for n, s in own.items()}
    groups = nn.scan(
      Group,
      variable_axes={"params": 0, "intermediates": 0},
      split_rngs={"params": True},
      in_axes=(0, nn.broadcast),
      length=layout.num_groups(cfg, self.stack),
    )
    self.layers = groups(cfg, self.impl, self.stack, self.tenants, self.write_cross)

  def __call__(self, tokens, shared_embed, ctx_fn, slot_map, ops, kv=None):
    x, ctx = self.begin(tokens, shared_embed, ctx_fn, ops)
    xs = (
      stack_slot_rows(self.cfg, self.stack, slot_map, self.tenants),
      jnp.arange(layout.num_groups(self.cfg, self.stack)),
    )
    (x, kv), _ = self.layers((x, kv), xs, ctx)
    return self.end(x, ops), kv

  def begin(self, tokens, shared_embed, ctx_fn, ops):
    """The embedded tokens and the blocks' context (ctx_fn builds it from the stack's position-bias table)."""
    return ops.embed(self.g.get("embed", shared_embed), tokens), ctx_fn(self.g["rel_bias"])

  def end(self, x, ops):
    return rms_norm(x, ops.vector(self.g["norm"]), self.cfg.layer_norm_eps)


class Switch(nn.Module):
  """The whole encoder-decoder; `encode` and `decode` are the serving path's two halves."""

  cfg: SwitchConfig
  impl: Impl = Impl.AUTO
  tenants: int = 0
  write_cross: bool = False  # decode with a cache: write enc_out's cross keys/values into the pages first

  def setup(self):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    roots = {k: v for k, v in layout.global_shapes(cfg).items() if k not in layout.STACKS}
    self.roots = {n: self.param(n, _init(n, dtype), _shape(self.tenants, s)) for n, s in roots.items()}
    self.encoder = Stack(cfg, self.impl, "encoder", self.tenants)
    self.decoder = Stack(cfg, self.impl, "decoder", self.tenants, self.write_cross)

  def encode(self, tokens, lengths, pool, slot_map, ops):
    """tokens [B, U] right-padded to `lengths` [B] -> final-normed encoder output [B, U, D]."""
    ctx = encoder_context(self.cfg, tokens, lengths, pool, ops)
    return self.encoder(tokens, self.roots.get("embed"), ctx, slot_map, ops)[0]

  def begin(self, stack: str, tokens, ctx_fn, ops):
    """A stack's embedded tokens and its blocks' context."""
    return getattr(self, stack).begin(tokens, self.roots.get("embed"), ctx_fn, ops)

  def end(self, stack: str, x, ops):
    """A stack's final norm."""
    return getattr(self, stack).end(x, ops)

  def decode(
    self,
    tokens,
    positions,
    enc_lengths,
    pool,
    slot_map,
    ops,
    kv=None,
    tables=None,
    cross_tables=None,
    enc_out=None,
    logits_at=None,
  ):
    """Decoder tokens [B, T] at `positions` [B, T] -> (logits [B, T or 1, V] float32, kv).

    With `kv`, self and cross keys are the rows' pages (`tables` [B, n],
    `cross_tables` [B, c]); without, the call's own keys and `enc_out`'s.
    """
    ctx = decoder_context(self.cfg, tokens, positions, enc_lengths, pool, ops, kv, tables, cross_tables, enc_out)
    x, kv = self.decoder(tokens, self.roots.get("embed"), ctx, slot_map, ops, kv)
    return self.head(x, ops, logits_at), kv

  def head(self, x, ops, logits_at=None):
    """Normed decoder output [B, T, D] -> float32 logits [B, T (or 1 at logits_at [B]), V]."""
    if logits_at is not None:
      x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)
    return self.lm_head(x, ops)

  def lm_head(self, x, ops):
    """Decoder output [B, T, D] -> float32 logits [B, T, V]."""
    if self.cfg.tie_word_embeddings:  # Mesh TensorFlow's rescale before the tied projection
      table = jnp.swapaxes(self.roots["embed"], -1, -2)
      logits = ops.linear("BTD,DV->BTV", x * self.cfg.hidden_size**-0.5, table)
    else:
      logits = ops.linear("BTD,DV->BTV", x, self.roots["lm_head"])
    return sharding.constrain(logits.astype(F32), "batch")  # gathered (split by vocabulary on a mesh)

  def __call__(self, enc_tokens, enc_lengths, dec_tokens, pool, slot_map, ops):
    """The full pass (what `init` traces): the encoder, then the decoder over its own keys."""
    b, t = dec_tokens.shape
    enc = self.encode(enc_tokens, enc_lengths, pool, slot_map, ops)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return self.decode(dec_tokens, positions, enc_lengths, pool, slot_map, ops, enc_out=enc)[0]


def _model(cfg, impl, ops, write_cross=False) -> Switch:
  return Switch(cfg, impl, ops.num_tenants, write_cross)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
@checked
def encode(
  params,
  tokens: Int[ArrayLike, "B U"],
  lengths: Int[ArrayLike, "B"],
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


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("kv",))
@checked
def start(
  params,
  enc_out,
  enc_lengths: Int[ArrayLike, "B"],
  kv: paged.PagedKV,
  tables: Int[ArrayLike, "B n"],
  cross_tables: Int[ArrayLike, "B c"],
  cfg: SwitchConfig,
  impl: Impl = Impl.AUTO,
  ops=SingleTenant(),
):
  """Writes each decoder block's cross keys/values of enc_out [B, U, D] into the rows' cross pages and runs
  the decoder start token at position 0. Returns (logits of the first generated token [B, V], kv)."""
  b = enc_out.shape[0]
  first = jnp.full((b, 1), cfg.decoder_start_token_id, jnp.int32)
  logits, kv = _model(cfg, impl, ops, write_cross=True).apply(
    {"params": params["backbone"]},
    first,
    jnp.zeros((b, 1), jnp.int32),
    enc_lengths,
    params["experts"],
    params["slot_map"],
    ops,
    kv,
    tables,
    cross_tables,
    enc_out,
    method=Switch.decode,
  )
  return logits[:, 0], kv


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("kv",))
@checked
def decode_step(
  params,
  tokens: Int[ArrayLike, "B"],
  kv: paged.PagedKV,
  tables: Int[ArrayLike, "B n"],
  cross_tables: Int[ArrayLike, "B c"],
  lengths: Int[ArrayLike, "B"],
  enc_lengths: Int[ArrayLike, "B"],
  cfg: SwitchConfig,
  impl: Impl = Impl.AUTO,
  ops=SingleTenant(),
):
  """One decoder token per row [B] at position lengths [B] over the rows' pages; returns (logits [B, V], kv)."""
  logits, kv = _model(cfg, impl, ops).apply(
    {"params": params["backbone"]},
    tokens[:, None],
    lengths[:, None],
    enc_lengths,
    params["experts"],
    params["slot_map"],
    ops,
    kv,
    tables,
    cross_tables,
    method=Switch.decode,
  )
  return logits[:, 0], kv


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
@checked
def forward(
  params,
  enc_tokens: Int[ArrayLike, "B U"],
  enc_lengths: Int[ArrayLike, "B"],
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
  return _model(cfg, impl, ops).apply(
    {"params": params["backbone"]}, enc_tokens, enc_lengths, dec_tokens, params["experts"], params["slot_map"], ops
  )
