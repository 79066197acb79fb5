"""Switch Transformer (T5-style encoder-decoder, top-1 MoE) as pure functions over its layout.

Parameter layout (jaxmoe/switch_params.py builds, checks and splits it):

  backbone                       one per tenant, the non-expert weights
    embed          [V, D]        tied embeddings only: input of both stacks and the LM head
    lm_head        [D, V]        untied only
    encoder
      embed        [V, D]        untied only: the encoder's own input embedding
      rel_bias     [R, N]        relative-position bias (HF block 0's), used by every block
      layers[i]                  one dict per encoder block
        attn_norm  [D]
        q, k, v    [D, N, H]
        o          [N, H, D]
        mlp_norm   [D]
        wi [D, F], wo [F, D]     dense blocks: relu(x wi) wo
        router     [D, E]        sparse blocks (their experts live in the pool)
      norm         [D]
    decoder
      embed        [V, D]        untied only
      rel_bias     [R, N]
      layers[i]                  as the encoder's, plus cross-attention:
        cross_norm [D]
        cq, ck, cv [D, N, H]
        co         [N, H, D]
      norm         [D]
  experts[m]                     MoE layer m: the encoder's sparse blocks, then the decoder's
    wi             [S, D, F]
    wo             [S, F, D]
  slot_map         [L, E] int32  logical expert e of MoE layer m lives in slot slot_map[m, e]

Numerics follow transformers 5 `SwitchTransformersForConditionalGeneration`:
T5 RMS norm (no mean, no bias), no 1/sqrt(H) attention scaling, bucketed
relative-position bias (bidirectional in the encoder, causal in the decoder,
none in cross-attention), router in float32 with softmax top-1 whose
probability scales the expert output, no jitter (inference), and with tied
embeddings the decoder output scaled by D**-0.5 before `embed.T`. Untied,
transformers 5 gives each stack its own input embedding (HF `shared` is unused).
`cfg.routing` picks dropless experts or HF's per-sequence expert capacity.

Decoding: `encode` runs once per request; `prefill` writes each decoder
block's cross-attention keys/values of the encoder output into the cache and
runs the first decoder tokens; `decode_step` appends one token per row. Rows
are independent, so right-padded batches equal each row alone.

Axis legend: B batch, T decoder (query) tokens, S decoder cache positions, U
encoder positions, D model dim, F ffn dim, E experts, N heads, H head dim, R
relative-position buckets, L MoE layers, V vocab.
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.models.mixtral import SingleTenant, rms_norm
from jaxmoe.moe import Impl, MoeSpec, Router, moe
from jaxmoe.switch_config import Routing, SwitchConfig

F32 = jnp.float32


@flax.struct.dataclass
class SwitchCache:
  """Decoder self-attention keys/values, and each decoder block's view of the encoder output."""

  k: jax.Array  # [Ld, B, S, N, H], Ld decoder blocks
  v: jax.Array  # [Ld, B, S, N, H]
  lengths: jax.Array  # [B] int32, decoder positions filled
  cross_k: jax.Array  # [Ld, B, U, N, H]
  cross_v: jax.Array  # [Ld, B, U, N, H]
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
  return SwitchCache(jnp.zeros(self_shape, dtype), jnp.zeros(self_shape, dtype), lengths(),
                     jnp.zeros(cross_shape, dtype), jnp.zeros(cross_shape, dtype), lengths())


@functools.lru_cache(maxsize=None)
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
  """Relative positions (key - query) int [...] -> bucket ids [...] in [0, R)."""
  n = cfg.relative_attention_num_buckets
  if bidirectional:
    n //= 2
    offset, dist = jnp.where(rel > 0, n, 0), jnp.abs(rel)
  else:
    offset, dist = 0, jnp.maximum(-rel, 0)
  table = bucket_table(n, cfg.relative_attention_max_distance)
  return offset + jnp.asarray(table)[jnp.minimum(dist, len(table) - 1)]


def position_bias(table, rel, cfg: SwitchConfig, bidirectional: bool, ops):
  """rel [b, T, S] (b = 1 or B) -> bias [b or B, N, T, S] from a [R, N] table (per row's tenant)."""
  b, t, s = rel.shape
  buckets = relative_buckets(rel, cfg, bidirectional).reshape(b, t * s)
  values = ops.embed(table, buckets)  # [b or B, T*S, N]
  return jnp.einsum("BTSN->BNTS", values.reshape(values.shape[0], t, s, -1))


def attend(q, k, v, bias, mask):
  """q [B, T, N, H], k/v [B, S, N, H], bias [B|1, N, T, S] or None, mask [B, T, S] -> [B, T, N, H]."""
  scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=F32)  # T5: no 1/sqrt(H)
  if bias is not None:
    scores = scores + bias.astype(F32)
  scores = jnp.where(mask[:, None], scores, jnp.finfo(F32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("BNTS,BSNH->BTNH", probs, v)


def heads(p, x, names, ops):
  return [ops.linear("BTD,DNH->BTNH", x, p[n]) for n in names]


def moe_indices(cfg: SwitchConfig, stack: str) -> list[int | None]:
  """Per block of `stack`: its MoE layer index m (slot-map row), or None for a dense block."""
  index = {block: m for m, block in enumerate(cfg.moe_blocks)}
  n = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
  return [index.get((stack, i)) for i in range(n)]


def sparse_mlp(p, pool, slot_map, x, cfg: SwitchConfig, impl: Impl, ops):
  """x [B, T, D] through the float32 top-1 router and the pool; slot_map [E] or [B, E]."""
  b, t, d = x.shape
  logits = ops.linear("BTD,DE->BTE", x.astype(F32), p["router"].astype(F32)).reshape(b * t, -1)
  if slot_map.ndim == 2:  # per-row tenant maps: one copy per token
    slot_map = jnp.repeat(slot_map, t, axis=0)
  capacity = cfg.expert_capacity if cfg.routing is Routing.HF_CAPACITY else None
  spec = MoeSpec(top_k=1, router=Router.TOP1, impl=impl, capacity=capacity, group_size=t)
  return moe(x.reshape(b * t, d), logits, slot_map, pool, spec).reshape(b, t, d)


def feed_forward(p, m: int | None, params, x, cfg: SwitchConfig, impl: Impl, ops):
  """The block's MLP on its normed input: dense relu(x wi) wo, or MoE layer m."""
  h = rms_norm(x, ops.vector(p["mlp_norm"]), cfg.layer_norm_eps)
  if m is not None:
    return sparse_mlp(p, params["experts"][m], ops.layer_slot_map(params["slot_map"], m), h, cfg, impl, ops)
  up = jax.nn.relu(ops.linear("BTD,DF->BTF", h, p["wi"]))
  return ops.linear("BTF,FD->BTD", up.astype(h.dtype), p["wo"])


def embed(params, stack: str, tokens, ops):
  """Input embeddings of `stack` for tokens [B, T] -> [B, T, D]."""
  bb = params["backbone"]
  return ops.embed(bb[stack]["embed"] if "embed" in bb[stack] else bb["embed"], tokens)


def run_encoder(params, tokens, lengths, cfg: SwitchConfig, impl: Impl, ops):
  """tokens [B, U] right-padded to `lengths` [B] -> final-normed encoder output [B, U, D]."""
  enc = params["backbone"]["encoder"]
  b, u = tokens.shape
  x = embed(params, "encoder", tokens, ops)
  pos = jnp.arange(u)
  bias = position_bias(enc["rel_bias"], (pos[None, :] - pos[:, None])[None], cfg, True, ops)
  mask = jnp.broadcast_to(pos[None, None, :] < lengths[:, None, None], (b, u, u))
  eps = cfg.layer_norm_eps
  for p, m in zip(enc["layers"], moe_indices(cfg, "encoder")):
    q, k, v = heads(p, rms_norm(x, ops.vector(p["attn_norm"]), eps), ("q", "k", "v"), ops)
    x = x + ops.linear("BTNH,NHD->BTD", attend(q, k, v, bias, mask), p["o"])
    x = x + feed_forward(p, m, params, x, cfg, impl, ops)
  return rms_norm(x, ops.vector(enc["norm"]), eps)


def fill_cross(params, enc_out, enc_lengths, cache: SwitchCache, ops) -> SwitchCache:
  """Each decoder block's cross-attention keys/values of the encoder output [B, U, D], once."""
  u = enc_out.shape[1]
  ks, vs = zip(*(heads(p, enc_out, ("ck", "cv"), ops) for p in params["backbone"]["decoder"]["layers"]))
  dtype = cache.cross_k.dtype
  return cache.replace(
      cross_k=cache.cross_k.at[:, :, :u].set(jnp.stack(ks).astype(dtype)),
      cross_v=cache.cross_v.at[:, :, :u].set(jnp.stack(vs).astype(dtype)),
      enc_lengths=enc_lengths.astype(jnp.int32),
  )


def run_decoder(params, x, positions, cache: SwitchCache, cfg: SwitchConfig, impl: Impl, ops):
  """Decoder blocks on x [B, T, D] at `positions` [B, T]; returns (final-normed [B, T, D], cache)."""
  dec = params["backbone"]["decoder"]
  b, t, _ = x.shape
  keys = jnp.arange(cache.max_len)
  rel = keys[None, None, :] - positions[:, :, None]  # [B, T, S]
  bias = position_bias(dec["rel_bias"], rel, cfg, False, ops)
  self_mask = rel <= 0
  cross_mask = jnp.broadcast_to(jnp.arange(cache.enc_len)[None, None, :] < cache.enc_lengths[:, None, None],
                                (b, t, cache.enc_len))
  rows, eps = jnp.arange(b)[:, None], cfg.layer_norm_eps
  for i, (p, m) in enumerate(zip(dec["layers"], moe_indices(cfg, "decoder"))):
    q, k, v = heads(p, rms_norm(x, ops.vector(p["attn_norm"]), eps), ("q", "k", "v"), ops)
    # Scatter into the stacked cache so a donated cache is updated in place.
    cache = cache.replace(k=cache.k.at[i, rows, positions].set(k.astype(cache.k.dtype), mode="drop"),
                          v=cache.v.at[i, rows, positions].set(v.astype(cache.v.dtype), mode="drop"))
    x = x + ops.linear("BTNH,NHD->BTD", attend(q, cache.k[i], cache.v[i], bias, self_mask), p["o"])
    (cq,) = heads(p, rms_norm(x, ops.vector(p["cross_norm"]), eps), ("cq",), ops)
    cross = attend(cq, cache.cross_k[i], cache.cross_v[i], None, cross_mask)  # no position bias
    x = x + ops.linear("BTNH,NHD->BTD", cross, p["co"])
    x = x + feed_forward(p, m, params, x, cfg, impl, ops)
  return rms_norm(x, ops.vector(dec["norm"]), eps), cache


def lm_head(params, x, cfg: SwitchConfig, ops):
  """Decoder output [B, T, D] -> float32 logits [B, T, V]."""
  bb = params["backbone"]
  if cfg.tie_word_embeddings:  # Mesh TensorFlow's rescale before the tied projection
    return ops.linear("BTD,DV->BTV", x * cfg.hidden_size**-0.5, jnp.swapaxes(bb["embed"], -1, -2)).astype(F32)
  return ops.linear("BTD,DV->BTV", x, bb["lm_head"]).astype(F32)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def encode(params, tokens, lengths, cfg: SwitchConfig, impl: Impl = Impl.AUTO, ops=SingleTenant()):
  """The encoder, once per request.

  Args:
    params: the layout above.
    tokens: [B, U] int32, right-padded.
    lengths: [B] int32 valid encoder tokens per row (>= 1).
    cfg: model config (static).
    impl: MoE strategy (static).
    ops: SingleTenant(), or MixedTenants(ids) with stacked backbones.

  Returns:
    [B, U, D] encoder output in the model dtype (padding positions are junk).
  """
  return run_encoder(params, tokens, lengths, cfg, impl, ops)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def prefill(params, enc_out, enc_lengths, tokens, lengths, cache: SwitchCache, cfg: SwitchConfig,
            impl: Impl = Impl.AUTO, ops=SingleTenant()):
  """Stores the encoder output's cross keys/values and runs decoder tokens [B, T] of `lengths` [B].

  enc_out [B, U, D] with `enc_lengths` [B] from `encode`; the cache is empty
  and donated. Returns (logits of each row's last decoder token [B, V], cache).
  """
  b, t = tokens.shape
  cache = fill_cross(params, enc_out, enc_lengths, cache, ops)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x, cache = run_decoder(params, embed(params, "decoder", tokens, ops), positions, cache, cfg, impl, ops)
  last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
  return lm_head(params, last, cfg, ops)[:, 0], cache.replace(lengths=lengths.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "impl"), donate_argnames=("cache",))
def decode_step(params, tokens, cache: SwitchCache, cfg: SwitchConfig, impl: Impl = Impl.AUTO,
                ops=SingleTenant()):
  """Appends one decoder token per row [B] at each row's length; returns (logits [B, V], cache)."""
  x = embed(params, "decoder", tokens[:, None], ops)
  x, cache = run_decoder(params, x, cache.lengths[:, None], cache, cfg, impl, ops)
  return lm_head(params, x, cfg, ops)[:, 0], cache.replace(lengths=cache.lengths + 1)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def forward(params, enc_tokens, enc_lengths, dec_tokens, cfg: SwitchConfig, impl: Impl = Impl.AUTO,
            ops=SingleTenant()):
  """Full pass, as HF `model(input_ids, attention_mask, decoder_input_ids).logits`.

  Args:
    enc_tokens: [B, U] int32 right-padded encoder input, `enc_lengths` [B] valid.
    dec_tokens: [B, T] int32 decoder input (HF's decoder_input_ids: starting
      with decoder_start_token_id, not shifted here).

  Returns:
    logits [B, T, V] float32.
  """
  b, t = dec_tokens.shape
  enc_out = run_encoder(params, enc_tokens, enc_lengths, cfg, impl, ops)
  cache = fill_cross(params, enc_out, enc_lengths, init_cache(cfg, b, t, enc_tokens.shape[1]), ops)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  x, _ = run_decoder(params, embed(params, "decoder", dec_tokens, ops), positions, cache, cfg, impl, ops)
  return lm_head(params, x, cfg, ops)
