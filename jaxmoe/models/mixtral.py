"""Mixtral as pure functions over the params.py layout (backbone + expert pool).

RMSNorm, RoPE, grouped-query attention with an optional sliding window, the
top-k router and SwiGLU experts behind `jaxmoe.moe.moe`, untied LM head.
Numerics follow Hugging Face `MixtralForCausalLM`: norms, router softmax and
attention softmax in float32.

One block function serves the full forward, prefill and decode: it writes the
new keys/values into the cache at each row's own positions, then attends over
the whole cache with a causal (and windowed) mask on positions. Rows of a batch
are independent, so right-padded prompts of different lengths give the same
results as each prompt alone.

Axis legend: B batch, T query tokens, S cache positions, D model dim, E
experts, N query heads, M kv heads, G = N / M, H head dim, L layers, V vocab.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import MixtralConfig
from jaxmoe.moe import Impl, MoeSpec, Router, moe

F32 = jnp.float32
GATHER_LIMIT_BYTES = 64 << 20  # mixed batches on CPUs: largest per-row weight copy for one projection


def grouped_linear(x, w, ids):
  """x [B, T, I] @ w[ids[b]] [K, I, O] -> [B, T, O]: rows sorted by tenant, one ragged_dot."""
  b, t, _ = x.shape
  tenant = jnp.repeat(ids, t)
  order = jnp.argsort(tenant, stable=True)
  sizes = jnp.bincount(tenant, length=w.shape[0]).astype(jnp.int32)
  y = jax.lax.ragged_dot(x.reshape(b * t, -1)[order], w, sizes)
  return jnp.zeros_like(y).at[order].set(y).reshape(b, t, -1)


def block_linear(x, w, ids):
  """Same result: each row's input in its tenant's block of K blocks, zeros elsewhere, times every
  tenant's weight stacked [K * I, O]: K times the flops, in one plain product with nothing to pick."""
  b, t, i = x.shape
  k = w.shape[0]
  own = (ids[:, None] == jnp.arange(k)).astype(x.dtype)  # [B, K]
  blocks = (own[:, None, :, None] * x[:, :, None, :]).reshape(b, t, k * i)
  return jnp.einsum("BTJ,JO->BTO", blocks, w.reshape(k * i, -1))


def gathered_linear(x, w, ids):
  """Same result: each row's own weight gathered [B, I, O], then one batched product."""
  return jnp.einsum("BTI,BIO->BTO", x, w[ids])


@flax.struct.dataclass
class SingleTenant:
  """Weight access for one backbone: leaves as in params.py."""

  def linear(self, eq: str, x, w):
    return jnp.einsum(eq, x, w)

  def vector(self, w):
    return w

  def embed(self, table, tokens):
    return table[tokens]

  def layer_slot_map(self, slot_map, layer: int):
    return slot_map[layer]


@flax.struct.dataclass
class MixedTenants:
  """Weight access for a batch mixing tenants: backbone leaves stacked [K, ...].

  Row b uses tenant `ids[b]`. On accelerators, projections sort the rows by
  tenant and run one `ragged_dot` per weight, so each tenant's weights are read
  once per step and each row is computed once. XLA's CPU `ragged_dot` computes
  every group densely, slower than a plain product, so CPUs use the variant
  that measured fastest there (bench/serve_throughput.py): for one token per
  row (decode), `block_linear`, K times the flops in one plain product; for
  prompts, `gathered_linear`, whose weight copy is shared by the row's tokens
  (while that copy stays under GATHER_LIMIT_BYTES).
  """

  ids: jax.Array  # [B] int32

  def linear(self, eq: str, x, w):
    del eq  # contraction: x's trailing dims (after B, T) with w's leading dims (after K)
    b, t = x.shape[:2]
    out_shape = w.shape[x.ndim - 1 :]
    flat_w = w.reshape(w.shape[0], -1, int(np.prod(out_shape)))  # [K, I, O]
    gathered_bytes = b * flat_w[0].size * flat_w.dtype.itemsize
    if jax.default_backend() != "cpu":
      project = grouped_linear
    elif t > 1 and gathered_bytes <= GATHER_LIMIT_BYTES:
      project = gathered_linear
    else:
      project = block_linear
    return project(x.reshape(b, t, -1), flat_w, self.ids).reshape(b, t, *out_shape)

  def vector(self, w):  # [K, D] -> [B, 1, D], broadcasting over T
    return w[self.ids][:, None]

  def embed(self, table, tokens):  # [K, V, D], [B, T]
    return table[self.ids[:, None], tokens]

  def layer_slot_map(self, slot_map, layer: int):  # [K, L, E] -> per row [B, E]
    return slot_map[self.ids, layer]


@flax.struct.dataclass
class KVCache:
  """Keys/values for every layer and the number of valid positions per row."""

  k: jax.Array  # [L, B, S, M, H]
  v: jax.Array  # [L, B, S, M, H]
  lengths: jax.Array  # [B] int32

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


def init_cache(cfg: MixtralConfig, batch: int, max_len: int) -> KVCache:
  shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  dtype = jnp.dtype(cfg.dtype)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def rms_norm(x, weight, eps):
  x32 = x.astype(F32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight * normed.astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float):
  """positions [B, T] -> (cos, sin) [B, T, H] in float32 (HF 'default' RoPE)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=F32) / head_dim))
  freqs = positions.astype(F32)[..., None] * inv_freq  # [B, T, H/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [B, T, *, H]; rotates the two halves of H (HF rotate_half convention)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def attention_mask(positions, max_len: int, window: int | None):
  """[B, T, S] bool: key position s is visible from query position p."""
  keys = jnp.arange(max_len)[None, None, :]
  q = positions[:, :, None]
  mask = keys <= q
  if window is not None:
    mask &= q - keys < window
  return mask


def attention(p, x, positions, cache: KVCache, layer: int, cfg: MixtralConfig, ops):
  """One layer's attention; returns (out [B, T, D], cache with this layer's new keys written)."""
  b, t, _ = x.shape
  cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
  q = apply_rope(ops.linear("BTD,DNH->BTNH", x, p["q"]), cos, sin)
  k = apply_rope(ops.linear("BTD,DMH->BTMH", x, p["k"]), cos, sin)
  v = ops.linear("BTD,DMH->BTMH", x, p["v"])
  rows = jnp.arange(b)[:, None]
  # Scatter into the stacked cache so a donated cache is updated in place.
  cache = cache.replace(
      k=cache.k.at[layer, rows, positions].set(k.astype(cache.k.dtype), mode="drop"),
      v=cache.v.at[layer, rows, positions].set(v.astype(cache.v.dtype), mode="drop"),
  )
  k_cache, v_cache = cache.k[layer], cache.v[layer]

  q = q.reshape(b, t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim)
  scores = jnp.einsum("BTMGH,BSMH->BMGTS", q, k_cache, preferred_element_type=F32)
  scores = scores * cfg.head_dim**-0.5
  mask = attention_mask(positions, k_cache.shape[1], cfg.sliding_window)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(F32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
  out = jnp.einsum("BMGTS,BSMH->BTMGH", probs, v_cache)
  out = out.reshape(b, t, cfg.num_heads, cfg.head_dim)
  return ops.linear("BTNH,NHD->BTD", out, p["o"]), cache


def moe_block(p, pool, slot_map, x, cfg: MixtralConfig, impl: Impl, ops, router_out=None):
  """x [B, T, D] through the router and the expert pool; slot_map [E] or [B, E].

  Appends the router logits [B, T, E] to `router_out` when given (training's balancing loss).
  """
  b, t, d = x.shape
  flat = x.reshape(b * t, d)
  router_logits = ops.linear("BTD,DE->BTE", x, p["router"])
  if router_out is not None:
    router_out.append(router_logits)
  router_logits = router_logits.reshape(b * t, -1)
  if slot_map.ndim == 2:  # per-row tenant maps: one copy per token
    slot_map = jnp.repeat(slot_map, t, axis=0)
  spec = MoeSpec(top_k=cfg.top_k, router=Router.TOPK_RENORM, impl=impl)
  return moe(flat, router_logits, slot_map, pool, spec).reshape(b, t, d)


def run_layers(params, x, positions, cache: KVCache, cfg: MixtralConfig, impl: Impl, ops, moe_inputs=None,
               router_logits=None):
  """All decoder layers; returns (hidden [B, T, D], cache). Appends MoE inputs and router logits if asked."""
  bb, eps = params["backbone"], cfg.rms_norm_eps
  for i, (p, pool) in enumerate(zip(bb["layers"], params["experts"])):
    h, cache = attention(p, rms_norm(x, ops.vector(p["attn_norm"]), eps), positions, cache, i, cfg, ops)
    x = x + h
    h = rms_norm(x, ops.vector(p["mlp_norm"]), eps)
    if moe_inputs is not None:
      moe_inputs.append(h)
    x = x + moe_block(p, pool, ops.layer_slot_map(params["slot_map"], i), h, cfg, impl, ops, router_logits)
  x = rms_norm(x, ops.vector(bb["norm"]), eps)
  return x, cache


def lm_head(params, x, ops):
  return ops.linear("BTD,DV->BTV", x, params["backbone"]["lm_head"]).astype(F32)


def embed(params, tokens, ops):
  return ops.embed(params["backbone"]["embed"], tokens)


@functools.partial(jax.jit, static_argnames=("cfg", "impl", "with_moe_inputs", "with_router_logits"))
def forward(params, tokens, cfg: MixtralConfig, impl: Impl = Impl.AUTO, with_moe_inputs: bool = False,
            ops=SingleTenant(), with_router_logits: bool = False):
  """Full causal forward pass.

  Args:
    params: the params.py layout.
    tokens: [B, T] int32.
    cfg: model config (static).
    impl: MoE strategy (static).
    with_moe_inputs: also return each layer's MoE input [L x [B, T, D]].
    ops: SingleTenant(), or MixedTenants(ids) with stacked backbones.
    with_router_logits: also return each layer's router logits [L x [B, T, E]] (after the
      MoE inputs when both are asked).

  Returns:
    logits [B, T, V] float32, or a tuple of it and the extras asked for.
  """
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  moe_inputs = [] if with_moe_inputs else None
  routers = [] if with_router_logits else None
  x, _ = run_layers(params, embed(params, tokens, ops), positions, init_cache(cfg, b, t), cfg, impl, ops,
                    moe_inputs, routers)
  logits = lm_head(params, x, ops)
  extras = [e for e in (moe_inputs, routers) if e is not None]
  return (logits, *extras) if extras else logits


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def prefill(params, tokens, lengths, cache: KVCache, cfg: MixtralConfig, impl: Impl = Impl.AUTO,
            ops=SingleTenant()):
  """Runs right-padded prompts [B, T] of `lengths` [B] into an empty cache.

  Returns (logits of each row's last prompt token [B, V] float32, cache).
  """
  b, t = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x, cache = run_layers(params, embed(params, tokens, ops), positions, cache, cfg, impl, ops)
  last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
  return lm_head(params, last, ops)[:, 0], cache.replace(lengths=lengths.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def decode_step(params, tokens, cache: KVCache, cfg: MixtralConfig, impl: Impl = Impl.AUTO,
                ops=SingleTenant()):
  """Appends one token per row [B] at each row's length; returns (logits [B, V], cache)."""
  positions = cache.lengths[:, None]
  x, cache = run_layers(params, embed(params, tokens[:, None], ops), positions, cache, cfg, impl, ops)
  return lm_head(params, x, ops)[:, 0], cache.replace(lengths=cache.lengths + 1)
