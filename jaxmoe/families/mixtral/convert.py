"""Hugging Face Mixtral safetensors -> checkpoint parts, one layer at a time.

`hf_parts` first checks every tensor name, shape and dtype in the headers
against config.json (`hf_keys` says what must be there), so a bad checkpoint
fails before anything is read. Each part it returns reads its tensors one at a
time into one layer (backbone leaves + [E, ...] expert pool), which the
conversion driver (jaxmoe/io/convert.py) writes and drops: host memory stays
near one layer. A fused transformers-5 expert tensor is read whole
([E, 2F, D]), the per-expert names `save_pretrained` writes one expert at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jaxmoe.families.mixtral import hf_keys as keys
from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.families.mixtral.layout import expert_shapes, part_name
from jaxmoe.io import hf


def expected_sources(cfg: MixtralConfig, layout: str) -> dict[str, keys.Source]:
  out = keys.global_sources()
  for layer in range(cfg.num_layers):
    out.update(keys.layer_sources(layer, cfg, layout))
  return out


def check_tensors(index: hf.Index, cfg: MixtralConfig) -> str:
  """Checks names, shapes and dtypes against the config; returns the expert layout."""
  layout = keys.detect_layout(index)
  want = expected_sources(cfg, layout)
  hf.check_names(index, want, keys.is_ignored, f" ({layout} expert layout)")
  for name, source in want.items():
    hf.check_info(name, index[name], source.rule.hf_shape(cfg))
  return layout


def _gather(sources: dict[str, keys.Source], index, cfg: MixtralConfig, dtype, pool=None) -> dict:
  """Reads `sources` one tensor at a time into leaves of `dtype`.

  Expert leaves are written into the preallocated `pool` arrays ([E, ...]);
  the other leaves are returned as a dict of contiguous arrays.
  """
  leaves = {}
  for name, source in sources.items():
    x = hf.read_tensor(index, name)
    for target, y in zip(source.rule.targets, source.rule.transform(x, cfg), strict=True):
      if keys.is_expert_leaf(target):
        pool[target][slice(None) if source.expert is None else source.expert] = y
      else:
        leaves[target] = np.ascontiguousarray(y, dtype=dtype)
    del x, y
  return leaves


def hf_parts(cfg: MixtralConfig, index: hf.Index) -> list[tuple[str, Callable[[], dict]]]:
  """Checks the tensors, then (part name, read the part) for globals and every layer."""
  layout = check_tensors(index, cfg)
  dtype = jnp.dtype(cfg.dtype)
  # One pool buffer, refilled per layer: the driver writes each part before
  # reading the next, and reuse spares the allocator a layer-sized churn.
  pool = {k: np.empty(s, dtype) for k, s in expert_shapes(cfg, cfg.num_experts).items()}

  def layer(i: int) -> dict:
    leaves = _gather(keys.layer_sources(i, cfg, layout), index, cfg, dtype, pool)
    return {"backbone": leaves, "experts": pool}

  parts = [("globals", lambda: _gather(keys.global_sources(), index, cfg, dtype))]
  return parts + [(part_name(i), lambda i=i: layer(i)) for i in range(cfg.num_layers)]
