"""jaxmoe checkpoints: an orbax parameter tree plus a small JSON header.

A checkpoint folder holds
  jaxmoe.json   {"format": 1, "config": {..., "architecture": ...},
                 "slots_per_layer": [...], "slot_map": [[...]]}
  params/<part> orbax StandardCheckpointer trees, the checkpoint parts of the
                family's layout (jaxmoe/families/*/layout.py): Mixtral's globals
                and layer_NNNN, Switch's globals, encoder_NNNN and decoder_NNNN;
                a part with an MoE layer holds its pool, and slot_map is local
                to each layer's pool
  tokenizer.json, tokenizer_config.json, ... copied from the source when present

Writes go to a temporary sibling folder renamed into place at the end, so a
failure leaves no partial checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxmoe import trees
from jaxmoe.errors import CheckpointError
from jaxmoe.families import registry
from jaxmoe.trees import Params

FORMAT_VERSION = 1
HEADER = "jaxmoe.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary folder that becomes `out` only if the block succeeds."""
  out = pathlib.Path(out).absolute()
  if out.exists():
    raise CheckpointError(f"output {out} already exists; remove it or choose another path")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  umask = os.umask(0)
  os.umask(umask)
  tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the result should be an ordinary folder
  try:
    yield tmp
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _part_checkpointer() -> ocp.AsyncCheckpointer:
  """Orbax checkpointer for Writer: numpy leaves are written without a copy.

  Orbax deep-copies host arrays so a caller may reuse them during an async
  save; Writer waits for every save, so that copy would only double the peak
  host memory of a conversion (tests/test_convert_memory.py).
  """
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
    (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
    (jax.Array, th.get_type_handler(jax.Array)),
  )
  return ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


class Writer:
  """Writes a checkpoint part by part so a converter holds one layer at a time.

  Parts are the family's (`layout.part_names`), each an orbax tree; Mixtral's:
  params/globals (embed, norm, lm_head) and params/layer_NNNN (that layer's
  backbone weights and expert pool).
  """

  def __init__(self, folder: pathlib.Path, cfg):
    self.folder, self.cfg = folder, cfg
    self.layout = registry.of(cfg).layout
    self.slots: dict[int, int] = {}  # MoE layer -> pool slots
    self.written: set[str] = set()
    self._moe_index = {name: m for m, name in enumerate(self.layout.moe_parts(cfg))}
    self._ckptr = _part_checkpointer()

  def _save(self, name: str, tree) -> None:
    self._ckptr.save(self.folder / "params" / name, args=ocp.args.PyTreeSave(tree))
    self._ckptr.wait_until_finished()

  def write_part(self, name: str, tree: dict) -> None:
    """One part: {"backbone": ..., "experts": pool} for a part with an MoE layer."""
    if name not in self.layout.part_names(self.cfg):
      raise CheckpointError(f"part {name!r} is not in the {self.cfg.architecture} layout")
    if name in self._moe_index:
      self.slots[self._moe_index[name]] = int(next(iter(tree["experts"].values())).shape[0])
    self._save(name, tree)
    self.written.add(name)

  def finish(self, slot_map: np.ndarray) -> None:
    """Writes the header; `slot_map` [L, E] is local to each MoE layer's pool."""
    missing = [n for n in self.layout.part_names(self.cfg) if n not in self.written]
    if missing:
      raise CheckpointError(f"checkpoint incomplete: parts {missing} not written")
    header = {
      "format": FORMAT_VERSION,
      "config": json.loads(self.cfg.to_json()),
      "slots_per_layer": [self.slots[m] for m in range(self.cfg.num_moe_layers)],
      "slot_map": np.asarray(slot_map, np.int32).reshape(self.cfg.num_moe_layers, -1).tolist(),
    }
    (self.folder / HEADER).write_text(json.dumps(header, indent=2))
    self._ckptr.close()


@contextlib.contextmanager
def writer(out: str | os.PathLike, cfg) -> Iterator[Writer]:
  """Atomic part-wise writer; call `finish(slot_map)` before the block ends."""
  with atomic_dir(out) as tmp:
    w = Writer(tmp, cfg)
    yield w
    if not (tmp / HEADER).is_file():
      raise CheckpointError("checkpoint writer closed without finish()")


def save(out: str | os.PathLike, cfg, params: Params, tokenizer_dir=None) -> None:
  """Writes a whole in-memory model (served layout) atomically; `tokenizer_dir` supplies tokenizer files."""
  layout = registry.of(cfg).layout
  layout.check_params(cfg, params)
  parts, local = layout.split_parts(cfg, jax.tree.map(np.asarray, params))
  with writer(out, cfg) as w:
    for name, tree in parts.items():
      w.write_part(name, tree)
    if tokenizer_dir is not None:
      copy_tokenizer(tokenizer_dir, w.folder)
    w.finish(local)


def copy_tokenizer(src: str | os.PathLike, dst: pathlib.Path) -> None:
  for name in TOKENIZER_FILES:
    path = pathlib.Path(src) / name
    if path.is_file():
      shutil.copy2(path, dst / name)


def read_header(path: str | os.PathLike) -> dict:
  path = pathlib.Path(path)
  header_path = path / HEADER
  if not header_path.is_file():
    raise CheckpointError(f"{path} is not a jaxmoe checkpoint: {HEADER} is missing")
  header = json.loads(header_path.read_text())
  if header.get("format") != FORMAT_VERSION:
    raise CheckpointError(f"{header_path}: format {header.get('format')!r}, expected {FORMAT_VERSION}")
  header["config"] = registry.config_from_dict(header["config"])
  return header


def restore_part(ckptr: ocp.StandardCheckpointer, folder: pathlib.Path, target):
  """One orbax tree restored into host numpy arrays; `target` holds ShapeDtypeStructs."""
  return jax.tree.map(np.asarray, ckptr.restore(folder, target))


def part_shapes(ckptr: ocp.StandardCheckpointer, folder: pathlib.Path) -> dict:
  """{"a/b": (shape, dtype name)} of one orbax tree, read from its metadata only."""
  meta = ckptr.metadata(folder).item_metadata
  flat = jax.tree_util.tree_flatten_with_path(getattr(meta, "tree", meta))[0]
  key = lambda path: "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
  return {key(p): (tuple(m.shape), np.dtype(m.dtype).name) for p, m in flat}


class Reader:
  """Reads a checkpoint part by part, so a caller can hold one layer at a time.

  Arrays come back as host numpy arrays, as from `load`.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path).absolute()
    self.header = read_header(self.path)
    self.config = self.header["config"]
    self.layout = registry.of(self.config).layout
    self.slots_per_layer: list[int] = list(self.header["slots_per_layer"])
    self.slot_map = np.asarray(self.header["slot_map"], np.int32).reshape(self.config.num_moe_layers, -1)
    self.targets = trees.abstract(self.layout.part_shapes(self.config, self.slots_per_layer), self.config.dtype)
    self._ckptr = ocp.StandardCheckpointer()

  def part_names(self) -> list[str]:
    return self.layout.part_names(self.config)

  def expected_shapes(self, name: str) -> dict:
    """What `part_shapes(name)` must be for this header's config, same keys."""
    flat = jax.tree_util.tree_flatten_with_path(self.targets[name])[0]
    key = lambda path: "/".join(str(k.key) for k in path)
    return {key(p): (tuple(s.shape), np.dtype(s.dtype).name) for p, s in flat}

  def part_shapes(self, name: str) -> dict:
    return part_shapes(self._ckptr, self.path / "params" / name)

  def read_part(self, name: str) -> dict:
    """One part's tree of host arrays (the layout's `part_shapes`)."""
    return restore_part(self._ckptr, self.path / "params" / name, self.targets[name])

  def read_pool(self, m: int) -> dict:
    """The expert pool of MoE layer m {name: [S_m, ...]}."""
    return self.read_part(self.layout.moe_parts(self.config)[m])["experts"]

  def close(self) -> None:
    self._ckptr.close()


@contextlib.contextmanager
def reader(path: str | os.PathLike) -> Iterator[Reader]:
  """A part-wise `Reader` over the checkpoint at `path`, closed at the end of the block."""
  r = Reader(path)
  try:
    yield r
  finally:
    r.close()


def load(path: str | os.PathLike) -> tuple[object, Params]:
  """Reads a checkpoint into host numpy arrays: (config, params in the served layout)."""
  with reader(path) as r:
    cfg = r.config
    params = r.layout.join_parts(cfg, {name: r.read_part(name) for name in r.part_names()}, r.slot_map)
  r.layout.check_params(cfg, params)
  return cfg, params
