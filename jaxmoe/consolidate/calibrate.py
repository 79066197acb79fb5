"""Hidden states at each layer's MoE input while a tenant reads the calibration text.

The output metric compares experts on the inputs they really see. To keep
memory near one layer of all tenants, each tenant's forward pass is run layer
by layer alongside the others (`layer_step`), instead of one whole model at a
time. `layer_step` is the body of `mixtral.run_layers` for one layer and a
fresh one-layer cache; tests check it against `mixtral.forward`.

Axis legend: B rows, T tokens, D model dim, E experts.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import MixtralConfig
from jaxmoe.consolidate.errors import ConsolidateError
from jaxmoe.models import mixtral
from jaxmoe.moe import Impl


def calibration_tokens(text: str, tokenizer, cfg: MixtralConfig, max_tokens: int, seq_len: int) -> np.ndarray:
  """The first `max_tokens` ids of `text`, cut into rows of `seq_len`: int32 [B, T]."""
  if tokenizer is None:
    raise ConsolidateError("the output metric needs a tokenizer: the checkpoint has no tokenizer.json")
  ids = np.asarray(tokenizer.encode(text), np.int64)[:max_tokens]
  if ids.size == 0:
    raise ConsolidateError("the calibration text encodes to no tokens")
  if ids.min() < 0 or ids.max() >= cfg.vocab_size:
    raise ConsolidateError(f"calibration token ids fall outside the vocabulary [0, {cfg.vocab_size})")
  seq_len = max(1, min(seq_len, cfg.max_position_embeddings))
  if ids.size <= seq_len:
    return ids[None].astype(np.int32)
  rows = ids.size // seq_len
  return ids[: rows * seq_len].reshape(rows, seq_len).astype(np.int32)


def embed(glob: dict, tokens: np.ndarray) -> jax.Array:
  """Token embeddings [B, T, D] from a backbone's globals."""
  return jnp.asarray(glob["embed"])[jnp.asarray(tokens)]


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def layer_step(layer: dict, pool: dict, slot_map_row, x, cfg: MixtralConfig, impl: Impl = Impl.AUTO):
  """One decoder layer: x [B, T, D] -> (next x [B, T, D], this layer's MoE input [B, T, D])."""
  b, t, _ = x.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cache = mixtral.init_cache(cfg.replace(num_layers=1), b, t)
  ops, eps = mixtral.SingleTenant(), cfg.rms_norm_eps
  h, _ = mixtral.attention(layer, mixtral.rms_norm(x, layer["attn_norm"], eps), positions, cache, 0, cfg, ops)
  x = x + h
  h = mixtral.rms_norm(x, layer["mlp_norm"], eps)
  return x + mixtral.moe_block(layer, pool, slot_map_row, h, cfg, impl, ops), h


def precision(cfg: MixtralConfig):
  """Full float32 matmuls for float32 models, as `Model.logits` uses."""
  if cfg.dtype == "float32":
    return jax.default_matmul_precision("float32")
  return contextlib.nullcontext()
