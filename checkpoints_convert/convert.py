"""Hugging Face Mixtral safetensors -> jaxmoe checkpoint, one layer at a time.

config.json's model_type picks the family: "mixtral" here, and
"switch_transformers" in `switch_convert` (same checks, same atomic part-wise
output); anything else is refused by name.

The converter first reads only the safetensors headers and checks every
tensor name and shape against config.json (`mixtral_keys` says what must be
there), so a bad checkpoint fails before anything is written. It then reads
tensor by tensor, assembles one layer (backbone leaves + [E, ...] expert
pool), hands it to the part-wise `jaxmoe.checkpoint.writer` and drops it:
host memory stays near one layer, not the model (tests/test_convert_memory.py).
Each tensor is read through its own `safe_open`, so the shard's memory map,
whose touched pages count as resident, never outlives one tensor. A fused
transformers-5 expert tensor is read whole ([E, 2F, D]), the per-expert names
`save_pretrained` writes one expert at a time.

Pickle-based checkpoints (`pytorch_model.bin`, `*.pt`, ...) are refused; this
module never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import safetensors
from tqdm import tqdm

from checkpoints_convert import mixtral_keys as keys
from jaxmoe import checkpoint
from jaxmoe.config import ConfigError, MixtralConfig
from jaxmoe.params import expert_shapes, identity_slot_map
from jaxmoe.switch_config import SwitchConfig

# config.json model_type -> the jaxmoe config class that reads it.
ARCHITECTURES = {"mixtral": MixtralConfig, "switch_transformers": SwitchConfig}

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PICKLE_INDEX = "pytorch_model.bin.index.json"
DTYPES = ("float32", "bfloat16", "float16")
_FLOAT_SOURCES = ("F16", "BF16", "F32", "F64")
_LIST_AT_MOST = 5  # names shown in one error message


class ConversionError(ValueError):
  """A Hugging Face folder that cannot be converted, with the reason named."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor lives and what its header says, read without its data."""

  file: pathlib.Path
  shape: tuple[int, ...]
  dtype: str  # safetensors dtype name, e.g. "BF16"


def resolve_dtype(hf: dict, dtype: str | None) -> str:
  """The output dtype: `dtype`, else config.json's dtype/torch_dtype if supported, else float32."""
  if dtype is None:
    found = hf.get("dtype") or hf.get("torch_dtype")
    return found if found in DTYPES else "float32"
  if dtype not in DTYPES:
    raise ConversionError(f"dtype={dtype!r} unsupported; choose one of {list(DTYPES)}")
  return dtype


def read_config(hf_dir: str | os.PathLike, dtype: str | None = None) -> MixtralConfig | SwitchConfig:
  """Reads `hf_dir/config.json` into the config its model_type names; raises ConversionError or
  ConfigError naming the problem."""
  path = pathlib.Path(hf_dir) / CONFIG_NAME
  if not path.is_file():
    raise ConversionError(f"{path} not found: a Hugging Face model folder needs {CONFIG_NAME}")
  try:
    hf = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(hf, dict):
    raise ConversionError(f"{path}: expected a JSON object, got {type(hf).__name__}")
  model_type = hf.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ConfigError(f"config.json: model_type={model_type!r} unsupported; jaxmoe converts "
                      f"{' and '.join(repr(k) for k in ARCHITECTURES)}")
  return ARCHITECTURES[model_type].from_hf(hf, dtype=resolve_dtype(hf, dtype))


def _refuse_pickles(hf_dir: pathlib.Path) -> None:
  pickles = sorted(
      p.name for p in hf_dir.iterdir() if p.name.endswith(PICKLE_SUFFIXES) or p.name == PICKLE_INDEX
  )
  if pickles:
    raise ConversionError(
        f"{hf_dir} has only pickle-based weights ({', '.join(pickles[:_LIST_AT_MOST])}); safetensors is "
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
    _refuse_pickles(hf_dir)
    raise ConversionError(f"{hf_dir} has neither {SAFE_WEIGHTS} nor {SAFE_INDEX}")
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise ConversionError(f"{index}: not a safetensors index with a 'weight_map' ({e!r})") from e
  files = []
  for name in sorted(set(weight_map.values())):
    if not name.endswith(".safetensors"):
      raise ConversionError(f"{index}: shard {name!r} is not a .safetensors file; safetensors is required")
    if not (hf_dir / name).is_file():
      raise ConversionError(f"{index}: shard {name!r} not found in {hf_dir}")
    files.append(hf_dir / name)
  return files


def index_tensors(files: list[pathlib.Path]) -> dict[str, TensorInfo]:
  """Tensor name -> TensorInfo for every tensor in `files`, from the headers only."""
  index: dict[str, TensorInfo] = {}
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


def _names(items: list[str]) -> str:
  more = len(items) - _LIST_AT_MOST
  shown = ", ".join(repr(k) for k in items[:_LIST_AT_MOST])
  return shown + (f" and {more} more" if more > 0 else "")


def expected_sources(cfg: MixtralConfig, layout: str) -> dict[str, keys.Source]:
  out = keys.global_sources()
  for layer in range(cfg.num_layers):
    out.update(keys.layer_sources(layer, cfg, layout))
  return out


def check_tensors(index: dict[str, TensorInfo], cfg: MixtralConfig) -> str:
  """Checks names, shapes and dtypes against the config; returns the expert layout."""
  layout = keys.detect_layout(index)
  want = expected_sources(cfg, layout)
  missing = [k for k in want if k not in index]
  if missing:
    raise ConversionError(f"missing tensor(s) {_names(missing)} ({layout} expert layout)")
  extra = sorted(k for k in index if k not in want and not keys.is_ignored(k))
  if extra:
    raise ConversionError(f"unexpected tensor(s) {_names(extra)} ({layout} expert layout)")
  for name, source in want.items():
    info, shape = index[name], source.rule.hf_shape(cfg)
    if info.shape != shape:
      raise ConversionError(
          f"tensor {name!r} has shape {info.shape}, expected {shape} from {CONFIG_NAME} ({info.file.name})"
      )
    if info.dtype not in _FLOAT_SOURCES:
      raise ConversionError(f"tensor {name!r} has dtype {info.dtype}, expected one of {_FLOAT_SOURCES}")
  return layout


def _read(index: dict[str, TensorInfo], name: str) -> np.ndarray:
  # One open per tensor: safe_open memory-maps the whole shard, and the pages a
  # read touches stay resident until the map is closed.
  with safetensors.safe_open(str(index[name].file), "np") as f:
    return f.get_tensor(name)


def _gather(sources: dict[str, keys.Source], index, cfg: MixtralConfig, dtype, pool=None) -> dict:
  """Reads `sources` one tensor at a time into leaves of `dtype`.

  Expert leaves are written into the preallocated `pool` arrays ([E, ...]);
  the other leaves are returned as a dict of contiguous arrays.
  """
  leaves = {}
  for name, source in sources.items():
    x = _read(index, name)
    for target, y in zip(source.rule.targets, source.rule.transform(x, cfg), strict=True):
      if keys.is_expert_leaf(target):
        pool[target][slice(None) if source.expert is None else source.expert] = y
      else:
        leaves[target] = np.ascontiguousarray(y, dtype=dtype)
    del x, y
  return leaves


def convert(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
    progress: bool | None = None,
) -> MixtralConfig | SwitchConfig:
  """Converts a HF Mixtral or Switch Transformers safetensors folder into a jaxmoe checkpoint at `out`.

  Args:
    hf_dir: folder with config.json and model.safetensors or a sharded
      model.safetensors.index.json; tokenizer files are copied along.
    out: checkpoint folder to create; must not exist. Nothing is left there
      (nor any temporary folder) if the conversion fails.
    dtype: "float32", "bfloat16" or "float16"; None takes config.json's
      dtype/torch_dtype when it is one of those, else float32.
    progress: tqdm bar over layers on stderr; None shows it when stderr is a tty.

  Returns:
    The config written to the checkpoint header (MixtralConfig or SwitchConfig).
  """
  hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out)
  if out.exists():
    raise ConversionError(f"output {out} already exists; remove it or choose another path")
  if not hf_dir.is_dir():
    raise ConversionError(f"{hf_dir} is not a folder")
  cfg = read_config(hf_dir, dtype)
  index = index_tensors(find_weights(hf_dir))
  if cfg.architecture == "switch":
    from checkpoints_convert.switch_convert import convert_switch

    return convert_switch(hf_dir, out, cfg, index, progress)
  layout = check_tensors(index, cfg)
  target = jnp.dtype(cfg.dtype)
  with checkpoint.writer(out, cfg) as w:
    w.write_globals(**_gather(keys.global_sources(), index, cfg, target))
    # One pool buffer, refilled per layer: write_layer returns only once the
    # part is on disk, and reuse spares the allocator a layer-sized churn.
    pool = {k: np.empty(s, target) for k, s in expert_shapes(cfg, cfg.num_experts).items()}
    bar = tqdm(
        range(cfg.num_layers), desc="converting layers", unit="layer", file=sys.stderr,
        disable=None if progress is None else not progress,
    )
    for layer in bar:
      leaves = _gather(keys.layer_sources(layer, cfg, layout), index, cfg, target, pool)
      w.write_layer(layer, leaves, pool)
      del leaves  # before the next layer is read, so only one is ever held
    checkpoint.copy_tokenizer(hf_dir, w.folder)
    w.finish(identity_slot_map(cfg))
  return cfg
