"""Reading a Hugging Face model folder without trusting it: config.json, safetensors headers, tensors.

config.json and generation_config.json are read as strict JSON objects. Only headers are read until every name and shape has been checked (by the
family's converter); tensors are then read one at a time, each through its own
`safe_open`, so a shard's memory map, whose touched pages count as resident,
never outlives one tensor. Pickle-based checkpoints (`pytorch_model.bin`,
`*.pt`, ...) are refused; nothing here unpickles anything.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
import safetensors

from jaxmoe.errors import ConversionError
from jaxmoe.io import files

CONFIG_NAME = "config.json"
GENERATION_NAME = "generation_config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLE_INDEX = "pytorch_model.bin.index.json"
FLOAT_SOURCES = ("F16", "BF16", "F32", "F64")
LIST_AT_MOST = 5  # names shown in one error message


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives and what its header says, read without its data."""

  file: pathlib.Path
  shape: tuple[int, ...]
  dtype: str  # safetensors dtype name, e.g. "BF16"


Index = dict[str, TensorInfo]


def _read_object(path: pathlib.Path) -> dict:
  hf = files.read_json(path, ConversionError)
  if not isinstance(hf, dict):
    raise ConversionError(f"{path}: expected a JSON object, got {type(hf).__name__}")
  return hf


def read_config(hf_dir: str | os.PathLike) -> dict:
  """`hf_dir/config.json` as a dict; ConversionError naming the problem otherwise."""
  path = pathlib.Path(hf_dir) / CONFIG_NAME
  if not path.is_file():
    raise ConversionError(f"{path} not found: a Hugging Face model folder needs {CONFIG_NAME}")
  return _read_object(path)


def read_generation_config(hf_dir: str | os.PathLike) -> dict | None:
  """`hf_dir/generation_config.json` as a dict, None when absent (its token ids win over config.json's)."""
  path = pathlib.Path(hf_dir) / GENERATION_NAME
  return _read_object(path) if path.is_file() else None


def refuse_pickles(hf_dir: pathlib.Path) -> None:
  pickles = sorted(p.name for p in hf_dir.iterdir() if p.name.endswith(PICKLE_SUFFIXES) or p.name == PICKLE_INDEX)
  if pickles:
    raise ConversionError(
      f"{hf_dir} has only pickle-based weights ({', '.join(pickles[:LIST_AT_MOST])}); safetensors is "
      "required and jaxmoe never unpickles a checkpoint. Re-save the model with transformers "
      "`save_pretrained(dir)` (safetensors is its default)."
    )


def find_weights(hf_dir: str | os.PathLike) -> list[pathlib.Path]:
  """The safetensors files of `hf_dir`: model.safetensors, else the shards its index names."""
  hf_dir = pathlib.Path(hf_dir)
  if (hf_dir / SAFE_WEIGHTS).is_file():
    return [hf_dir / SAFE_WEIGHTS]
  index = hf_dir / SAFE_INDEX
  if not index.is_file():
    refuse_pickles(hf_dir)
    raise ConversionError(f"{hf_dir} has neither {SAFE_WEIGHTS} nor {SAFE_INDEX}")
  weight_map = _read_object(index).get("weight_map")
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise ConversionError(f"{index}: 'weight_map' must be an object of tensor name -> shard file name")
  shards = []
  for name in sorted(set(weight_map.values())):
    if not name.endswith(".safetensors"):
      raise ConversionError(f"{index}: shard {name!r} is not a .safetensors file; safetensors is required")
    if pathlib.PurePath(name).name != name or not (hf_dir / name).is_file():
      raise ConversionError(f"{index}: shard {name!r} not found in {hf_dir}")
    shards.append(hf_dir / name)
  return shards


def index_tensors(files: list[pathlib.Path]) -> Index:
  """Tensor name -> TensorInfo for every tensor in `files`, from the headers only."""
  index: Index = {}
  for path in files:
    try:
      with safetensors.safe_open(str(path), "np") as f:
        for name in f.keys():
          part = f.get_slice(name)
          if name in index:
            raise ConversionError(f"tensor {name!r} is in both {index[name].file.name} and {path.name}")
          index[name] = TensorInfo(path, tuple(part.get_shape()), part.get_dtype())
    except safetensors.SafetensorError as e:
      raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
  return index


def read_tensor(index: Index, name: str) -> np.ndarray:
  """One tensor, refused (ConversionError naming it) unless every value is finite."""
  # One open per tensor: safe_open memory-maps the whole shard, and the pages a
  # read touches stay resident until the map is closed.
  try:
    with safetensors.safe_open(str(index[name].file), "np") as f:
      x = f.get_tensor(name)
  except (safetensors.SafetensorError, OSError) as e:
    raise ConversionError(f"tensor {name!r} in {index[name].file.name} cannot be read ({e})") from None
  check_finite(name, x)
  return x


def check_finite(name: str, x: np.ndarray) -> None:
  # In row chunks: the boolean temporary stays small next to a layer-sized tensor.
  flat = x.reshape(-1)
  step = 1 << 24
  for start in range(0, flat.size, step):
    if not np.isfinite(flat[start : start + step]).all():
      raise ConversionError(f"tensor {name!r} holds NaN or infinite values; refusing to convert non-finite weights")


def names(items: list[str]) -> str:
  """The first few names, quoted, and how many more."""
  more = len(items) - LIST_AT_MOST
  shown = ", ".join(repr(k) for k in items[:LIST_AT_MOST])
  return shown + (f" and {more} more" if more > 0 else "")


def check_info(name: str, info: TensorInfo, shape: tuple[int, ...]) -> None:
  """Raises ConversionError unless the header's shape is `shape` and its dtype a float."""
  if info.shape != shape:
    raise ConversionError(
      f"tensor {name!r} has shape {info.shape}, expected {shape} from {CONFIG_NAME} ({info.file.name})"
    )
  if info.dtype not in FLOAT_SOURCES:
    raise ConversionError(f"tensor {name!r} has dtype {info.dtype}, expected one of {FLOAT_SOURCES}")


def check_names(index: Index, want, ignored=lambda name: False, what: str = "") -> None:
  """Raises ConversionError naming missing tensors of `want`, then unexpected ones in `index`."""
  missing = [k for k in want if k not in index]
  if missing:
    raise ConversionError(f"missing tensor(s) {names(missing)}{what}")
  extra = sorted(k for k in index if k not in want and not ignored(k))
  if extra:
    raise ConversionError(f"unexpected tensor(s) {names(extra)}{what}")
