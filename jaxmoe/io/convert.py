"""Hugging Face safetensors folder -> jaxmoe checkpoint: the conversion driver of every family.

config.json's model_type picks the family (jaxmoe/families/registry.py). The
family's `hf_parts` checks every tensor name, shape and dtype from the
safetensors headers against config.json before anything is read or written;
the driver then reads one part at a time, hands it to the atomic part-wise
checkpoint writer and drops it, so host memory stays near one layer
(tests/io/test_memory.py). Tokenizer files are copied along.
"""

from __future__ import annotations

import os
import pathlib
import sys

from tqdm import tqdm

from jaxmoe.errors import ConversionError
from jaxmoe.families import base, registry
from jaxmoe.io import checkpoint, files, hf
from jaxmoe.trees import tree_bytes

DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(hf_config: dict, dtype: str | None) -> str:
  """The output dtype: `dtype`, else config.json's dtype/torch_dtype if supported, else float32."""
  if dtype is None:
    found = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return found if found in DTYPES else "float32"
  if dtype not in DTYPES:
    raise ConversionError(f"dtype={dtype!r} unsupported; choose one of {list(DTYPES)}")
  return dtype


def read_config(hf_dir: str | os.PathLike, dtype: str | None = None):
  """Reads `hf_dir/config.json` into the jaxmoe config of its model_type's family."""
  hf_config = hf.read_config(hf_dir)
  family = registry.for_hf_model_type(hf_config.get("model_type"))
  generation = hf.read_generation_config(hf_dir)
  return family.config.from_hf(hf_config, dtype=resolve_dtype(hf_config, dtype), generation=generation)


def convert(hf_dir: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None, progress: bool | None = None):
  """Converts a HF Mixtral or Switch Transformers safetensors folder into a jaxmoe checkpoint at `out`.

  Args:
    hf_dir: folder with config.json and model.safetensors or a sharded
      model.safetensors.index.json; tokenizer files are copied along.
    out: checkpoint folder to create; must not exist. Nothing is left there
      (nor any temporary folder) if the conversion fails.
    dtype: "float32", "bfloat16" or "float16"; None takes config.json's
      dtype/torch_dtype when it is one of those, else float32.
    progress: tqdm bar over parts on stderr; None shows it when stderr is a tty.

  Returns:
    The config written to the checkpoint header.
  """
  hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out)
  if out.exists():
    raise ConversionError(f"output {out} already exists; remove it or choose another path")
  if not hf_dir.is_dir():
    raise ConversionError(f"{hf_dir} is not a folder")
  cfg = read_config(hf_dir, dtype)
  family = registry.of(cfg)
  parts = family.hf_parts(cfg, hf.index_tensors(hf.find_weights(hf_dir)))
  with checkpoint.writer(out, cfg) as w:
    bar = tqdm(
      parts, desc="converting", unit="part", file=sys.stderr, disable=None if progress is None else not progress
    )
    for name, read in bar:
      tree = read()
      w.write_part(name, tree)
      dropped = tree_bytes(tree)
      del tree  # before the next part is read, so only one is ever held
      files.release_memory(dropped)
    checkpoint.copy_tokenizer(hf_dir, w.folder)
    w.finish(base.local_identity_slot_map(cfg.num_moe_layers, cfg.num_experts))
  return cfg
