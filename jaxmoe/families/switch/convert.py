"""Hugging Face Switch Transformers safetensors -> checkpoint parts, one block at a time.

The same contract as Mixtral's: every tensor name, shape and dtype is checked
against config.json from the safetensors headers before anything is read
(`hf_keys` says what must be there); each part (globals, then one encoder or
decoder block with its expert pool) is read tensor by tensor when the
conversion driver asks for it, written, and dropped, so host memory stays
near one block.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from jaxmoe.errors import ConversionError
from jaxmoe.families.switch import hf_keys as keys
from jaxmoe.families.switch.config import SwitchConfig
from jaxmoe.families.switch.layout import expert_shapes
from jaxmoe.io import hf


def check_tensors(index: hf.Index, cfg: SwitchConfig) -> dict[str, dict[str, keys.Source]]:
  """Checks names, shapes and dtypes against the config; returns {part: {HF key: Source}}."""
  parts = keys.part_sources(cfg, index)
  sources = [s for part in parts.values() for s in part.values()]
  read = {s.name for s in sources}
  missing = sorted({key for part in parts.values() for key, s in part.items() if s.name not in index})
  if missing:
    raise ConversionError(f"missing tensor(s) {hf.names(missing)} (switch_transformers)")
  optional = set(keys.optional_keys(cfg))
  extra = sorted(k for k in index if k not in read and k not in optional)
  if extra:
    raise ConversionError(f"unexpected tensor(s) {hf.names(extra)} (switch_transformers)")
  for s in sources:
    hf.check_info(s.name, index[s.name], s.rule.hf_shape(cfg))
  for name in sorted(optional & set(index) - read):
    hf.check_info(name, index[name], (cfg.vocab_size, cfg.hidden_size))
  return parts


def check_tied_copies(index: hf.Index, cfg: SwitchConfig) -> None:
  """Tied embeddings: a saved encoder/decoder/LM-head copy must equal shared.weight."""
  if not cfg.tie_word_embeddings:
    return
  copies = [k for k in keys.TIED_COPIES if k in index]
  if not copies:
    return
  shared = hf.read_tensor(index, "shared.weight")
  for name in copies:
    if not np.array_equal(hf.read_tensor(index, name), shared):
      raise ConversionError(
        f"tensor {name!r} differs from 'shared.weight' but {hf.CONFIG_NAME} says tie_word_embeddings=true "
        "(transformers would untie them); set tie_word_embeddings=false to convert it as its own weight"
      )


def _set(tree: dict, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def gather_part(sources: dict[str, keys.Source], index, cfg: SwitchConfig, dtype) -> dict:
  """One part's tree, read one tensor at a time; expert keys fill an [E, ...] pool."""
  tree: dict = {}
  pool = None
  if any(s.expert is not None for s in sources.values()):
    pool = {k: np.empty(shape, dtype) for k, shape in expert_shapes(cfg, cfg.num_experts).items()}
    tree["experts"] = pool
  for source in sources.values():
    x = hf.read_tensor(index, source.name)
    y = source.rule.transform(x, cfg)
    if source.expert is not None:
      pool[source.rule.target.removeprefix("experts/")][source.expert] = y
    else:
      _set(tree, source.rule.target, np.ascontiguousarray(y, dtype=dtype))
    del x, y
  return tree


def hf_parts(cfg: SwitchConfig, index: hf.Index) -> list[tuple[str, Callable[[], dict]]]:
  """Checks the tensors, then (part name, read the part) for globals and every block."""
  parts = check_tensors(index, cfg)
  check_tied_copies(index, cfg)
  dtype = jnp.dtype(cfg.dtype)
  return [(name, lambda s=sources: gather_part(s, index, cfg, dtype)) for name, sources in parts.items()]
