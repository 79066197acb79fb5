"""Hugging Face Switch Transformers safetensors -> jaxmoe checkpoint, one block at a time.

`convert.convert` dispatches here when config.json says
model_type="switch_transformers". The same contract as Mixtral: every tensor
name, shape and dtype is checked against config.json from the safetensors
headers before anything is written (`switch_keys` says what must be there);
then each checkpoint part (globals, then one encoder or decoder block with its
expert pool) is read tensor by tensor, handed to the atomic part-wise writer
and dropped, so host memory stays near one block.
"""

from __future__ import annotations

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from checkpoints_convert import switch_keys as keys
from checkpoints_convert.convert import (
  _FLOAT_SOURCES,
  CONFIG_NAME,
  ConversionError,
  TensorInfo,
  _names,
  _read,
)
from jaxmoe import checkpoint
from jaxmoe.switch_config import SwitchConfig
from jaxmoe.params import identity_slot_map
from jaxmoe.switch_params import expert_shapes


def _check_info(name: str, info: TensorInfo, shape: tuple[int, ...]) -> None:
  if info.shape != shape:
    raise ConversionError(
        f"tensor {name!r} has shape {info.shape}, expected {shape} from {CONFIG_NAME} ({info.file.name})")
  if info.dtype not in _FLOAT_SOURCES:
    raise ConversionError(f"tensor {name!r} has dtype {info.dtype}, expected one of {_FLOAT_SOURCES}")


def check_tensors(index: dict[str, TensorInfo], cfg: SwitchConfig) -> dict[str, dict[str, keys.Source]]:
  """Checks names, shapes and dtypes against the config; returns {part: {HF key: Source}}."""
  parts = keys.part_sources(cfg, index)
  sources = [s for part in parts.values() for s in part.values()]
  read = {s.name for s in sources}
  missing = sorted({key for part in parts.values() for key, s in part.items() if s.name not in index})
  if missing:
    raise ConversionError(f"missing tensor(s) {_names(missing)} (switch_transformers)")
  optional = set(keys.optional_keys(cfg))
  extra = sorted(k for k in index if k not in read and k not in optional)
  if extra:
    raise ConversionError(f"unexpected tensor(s) {_names(extra)} (switch_transformers)")
  for s in sources:
    _check_info(s.name, index[s.name], s.rule.hf_shape(cfg))
  for name in sorted(optional & set(index) - read):
    _check_info(name, index[name], (cfg.vocab_size, cfg.hidden_size))
  return parts


def check_tied_copies(index: dict[str, TensorInfo], cfg: SwitchConfig) -> None:
  """Tied embeddings: a saved encoder/decoder/LM-head copy must equal shared.weight."""
  if not cfg.tie_word_embeddings:
    return
  copies = [k for k in keys.TIED_COPIES if k in index]
  if not copies:
    return
  shared = _read(index, "shared.weight")
  for name in copies:
    if not np.array_equal(_read(index, name), shared):
      raise ConversionError(
          f"tensor {name!r} differs from 'shared.weight' but {CONFIG_NAME} says tie_word_embeddings=true "
          "(transformers would untie them); set tie_word_embeddings=false to convert it as its own weight")


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
    x = _read(index, source.name)
    y = source.rule.transform(x, cfg)
    if source.expert is not None:
      pool[source.rule.target.removeprefix("experts/")][source.expert] = y
    else:
      _set(tree, source.rule.target, np.ascontiguousarray(y, dtype=dtype))
    del x, y
  return tree


def convert_switch(hf_dir: pathlib.Path, out: pathlib.Path, cfg: SwitchConfig, index: dict[str, TensorInfo],
                   progress: bool | None = None) -> SwitchConfig:
  """Writes the checkpoint `out` (atomically) from an indexed HF Switch folder."""
  parts = check_tensors(index, cfg)
  check_tied_copies(index, cfg)
  target = jnp.dtype(cfg.dtype)
  with checkpoint.writer(out, cfg) as w:
    bar = tqdm(parts.items(), desc="converting blocks", unit="part", file=sys.stderr,
               disable=None if progress is None else not progress)
    for name, sources in bar:
      tree = gather_part(sources, index, cfg, target)
      w.write_part(name, tree)
      del tree  # before the next part is read, so only one is ever held
    checkpoint.copy_tokenizer(hf_dir, w.folder)
    w.finish(identity_slot_map(cfg))
  return cfg
