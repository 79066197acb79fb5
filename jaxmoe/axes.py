"""The axis alphabet of jaxmoe, used in every einsum string, shape comment and annotation.

  A  tenants (backbones stacked [A, ...] for batches that mix tenants)
  B  batch rows
  C  device expert-cache slots
  D  model (hidden) dim
  E  logical experts of an MoE layer
  F  feed-forward hidden dim (experts and dense MLPs)
  G  query heads per key/value head (N = M * G)
  H  head dim
  I  input features of a generic projection
  K  top-k: experts chosen per token
  L  layers (in slot maps: MoE layers)
  M  key/value heads
  N  query heads
  O  output features of a generic projection
  P  KV-cache pages
  Q  positions within one page
  R  routed (token, k) pairs, sorted by slot
  S  key positions (cache length)
  T  query tokens of one call (inside the MoE boundary: all tokens of the batch, flattened)
  U  encoder positions (encoder-decoder families)
  V  vocab
  W  row tiles of a grouped matmul (R / block rows)
  X  expert-pool slots
  Z  relative-position buckets (T5-style attention bias)

`checked` runs jaxtyping's shape check (with beartype) on a function's
annotations; inside `jax.jit` it runs once per trace, so it costs nothing per
call on the serving path.
"""

from __future__ import annotations

import jax
import numpy as np
from beartype import beartype
from jaxtyping import Bool, Float, Int, jaxtyped

ArrayLike = jax.Array | np.ndarray

__all__ = ["ArrayLike", "Bool", "Float", "Int", "checked"]


def checked(fn):
  """Checks array shapes and dtypes against `fn`'s jaxtyping annotations at each (trace-time) call."""
  return jaxtyped(typechecker=beartype)(fn)
