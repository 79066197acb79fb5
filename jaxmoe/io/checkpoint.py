"""jaxmoe checkpoints: an orbax parameter tree plus a small JSON header.

A checkpoint folder holds
  jaxmoe.json   {"format": 1, "config": {..., "architecture": ...},
                 "slots_per_layer": [...], "slot_map": [[...]]}
  params/<part> orbax StandardCheckpointer trees, the checkpoint parts of the
                family's layout (jaxmoe/families/*/layout.py): Mixtral's globals
                and layer_NNNN, Switch's globals, encoder_NNNN and decoder_NNNN;
                a part with an MoE layer holds its pool, and slot_map is local
                to each layer's pool
  tokenizer.json, tokenizer_config.json, generation_config.json, ... copied
                from the source when present

The header also records a checksum of every part ("checksums": {part:
"sha256:..."}, jaxmoe/io/integrity.py), verified at load unless the caller
opts out (`verify_checksums=False`); headers written before checksums existed
load with a one-line UnverifiedWarning. Non-finite weights are refused at
write (and, when verifying, at load) naming the tensor. Writes go to a
temporary sibling folder renamed into place at the end (jaxmoe/io/files.py),
so a failure, a SIGTERM or a SIGKILL leaves no partial checkpoint, and the next
write of the same destination removes what a killed one left.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxmoe import trees
from jaxmoe.errors import CheckpointError, ConfigError
from jaxmoe.families import registry
from jaxmoe.io import files, integrity
from jaxmoe.trees import Params

FORMAT_VERSION = 1
HEADER = "jaxmoe.json"
# Copied along with the weights; generation_config.json holds the EOS ids generation stops on.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def atomic_dir(out: str | os.PathLike):
  """A temporary folder that becomes `out` only if the block succeeds (jaxmoe/io/files.py)."""
  return files.atomic_dir(out, CheckpointError)


def _part_checkpointer() -> ocp.AsyncCheckpointer:
  """Orbax checkpointer for Writer and StoreWriter: parts are written without a copy.

  Orbax deep-copies host arrays so a caller may reuse them during an async
  save; the writers wait for every save, so that copy would only double the
  peak host memory. Parts are written uncompressed: with zstd, tensorstore's
  OCDBT writer holds the whole compressed part in memory until it commits (a
  second copy of a layer, measured in tests/io/test_memory.py), and
  weights compress by only about 10%. Readers read either.
  """
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
    (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)),
    (jax.Array, th.get_type_handler(jax.Array)),
  )
  return ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))


class Writer:
  """Writes a checkpoint part by part so a converter holds one layer at a time.

  Parts are the family's (`layout.part_names`), each an orbax tree; Mixtral's:
  params/globals (embed, norm, lm_head) and params/layer_NNNN (that layer's
  backbone weights and expert pool). Each part's checksum is taken, and its
  values checked finite, before it is written.
  """

  def __init__(self, folder: pathlib.Path, cfg):
    self.folder, self.cfg = folder, cfg
    self.layout = registry.of(cfg).layout
    self.slots: dict[int, int] = {}  # MoE layer -> pool slots
    self.checksums: dict[str, str] = {}
    self._moe_index = {name: m for m, name in enumerate(self.layout.moe_parts(cfg))}
    self._ckptr = _part_checkpointer()
    self._open = True

  def _save(self, name: str, tree) -> None:
    self.checksums[name] = integrity.digest(tree, f"params/{name}", CheckpointError)
    self._ckptr.save(self.folder / "params" / name, args=ocp.args.PyTreeSave(tree))
    self._ckptr.wait_until_finished()

  def write_part(self, name: str, tree: dict) -> None:
    """One part: {"backbone": ..., "experts": pool} for a part with an MoE layer."""
    if name not in self.layout.part_names(self.cfg):
      raise CheckpointError(f"part {name!r} is not in the {self.cfg.architecture} layout")
    if name in self._moe_index:
      self.slots[self._moe_index[name]] = int(next(iter(tree["experts"].values())).shape[0])
    self._save(name, tree)

  def finish(self, slot_map: np.ndarray) -> None:
    """Writes the header; `slot_map` [L, E] is local to each MoE layer's pool."""
    missing = [n for n in self.layout.part_names(self.cfg) if n not in self.checksums]
    if missing:
      raise CheckpointError(f"checkpoint incomplete: parts {missing} not written")
    header = {
      "format": FORMAT_VERSION,
      "config": json.loads(self.cfg.to_json()),
      "slots_per_layer": [self.slots[m] for m in range(self.cfg.num_moe_layers)],
      "slot_map": np.asarray(slot_map, np.int32).reshape(self.cfg.num_moe_layers, -1).tolist(),
      "checksums": dict(self.checksums),
    }
    files.write_json(self.folder / HEADER, header, CheckpointError)
    self.close()

  def close(self) -> None:
    """Waits for any save in flight (a KeyboardInterrupt may leave one) and releases orbax."""
    if self._open:
      self._open = False
      self._ckptr.close()


@contextlib.contextmanager
def writer(out: str | os.PathLike, cfg) -> Iterator[Writer]:
  """Atomic part-wise writer; call `finish(slot_map)` before the block ends."""
  with atomic_dir(out) as tmp:
    w = Writer(tmp, cfg)
    try:
      yield w
    finally:
      w.close()  # before the temporary folder is removed: no orbax thread writes into it after
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


def _int_list(value, what: str) -> list[int]:
  if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
    raise CheckpointError(f"{what} must be a list of integers")
  return value


def check_slots(cfg, slots, slot_map, what: str) -> np.ndarray:
  """Validates a header's slots per layer and one slot map (local to each layer's pool) -> [L, E] int32."""
  layers = cfg.num_moe_layers
  if len(_int_list(slots, f"{what} slots_per_layer")) != layers or any(n < 1 for n in slots):
    raise CheckpointError(f"{what} slots_per_layer {slots!r} does not give {layers} MoE layers of >= 1 slot")
  rows = slot_map if isinstance(slot_map, list) else None
  if (
    rows is None
    or len(rows) != layers
    or not all(len(_int_list(r, f"{what} slot map")) == cfg.num_experts for r in rows)
  ):
    raise CheckpointError(f"{what} slot map is not [{layers}, {cfg.num_experts}] integers")
  out = np.asarray(rows, np.int64).reshape(layers, cfg.num_experts)
  if out.size and (out.min() < 0 or np.any(out >= np.asarray(slots)[:, None])):
    raise CheckpointError(f"{what} slot map points outside the pool of {slots} slots")
  return out.astype(np.int32)


def check_checksums(header: dict, names: list[str], what: str) -> dict[str, str] | None:
  """The header's checksums {part: digest}, None when it predates them."""
  sums = header.get("checksums")
  if sums is None:
    return None
  if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
    raise CheckpointError(f"{what}: 'checksums' must map part names to strings")
  missing = [n for n in names if n not in sums]
  if missing:
    raise CheckpointError(f"{what}: no checksum recorded for {missing[:3]}")
  return sums


def read_header(path: str | os.PathLike) -> dict:
  """`jaxmoe.json` validated: format, config (as the family's config object), slots, slot map, checksums."""
  path = pathlib.Path(path)
  header_path = path / HEADER
  if not header_path.is_file():
    raise CheckpointError(f"{path} is not a jaxmoe checkpoint: {HEADER} is missing")
  header = files.read_json(header_path, CheckpointError)
  if not isinstance(header, dict):
    raise CheckpointError(f"{header_path}: expected a JSON object, got {type(header).__name__}")
  if header.get("format") != FORMAT_VERSION:
    raise CheckpointError(f"{header_path}: format {header.get('format')!r}, expected {FORMAT_VERSION}")
  try:
    header["config"] = cfg = registry.config_from_dict(header.get("config"))
  except ConfigError as e:
    raise CheckpointError(f"{header_path}: {e}") from None
  header["slot_map"] = check_slots(cfg, header.get("slots_per_layer"), header.get("slot_map"), str(header_path))
  header["checksums"] = check_checksums(header, registry.of(cfg).layout.part_names(cfg), str(header_path))
  return header


class Reader:
  """Reads a checkpoint part by part, so a caller can hold one layer at a time.

  Arrays come back as host numpy arrays, as from `load`. Each part is checked
  against the header (shapes, dtypes) and, with `verify_checksums`, its
  recorded checksum and finiteness.
  """

  def __init__(self, path: str | os.PathLike, verify_checksums: bool = True):
    self.path = pathlib.Path(path).absolute()
    self.header = read_header(self.path)
    self.config = self.header["config"]
    self.layout = registry.of(self.config).layout
    self.slots_per_layer: list[int] = list(self.header["slots_per_layer"])
    self.slot_map = self.header["slot_map"]
    self.checksums = self.header["checksums"]
    self.verify = verify_checksums
    if verify_checksums and self.checksums is None:
      integrity.warn_unverified(self.path, "checkpoint")
    self.targets = trees.abstract(self.layout.part_shapes(self.config, self.slots_per_layer), self.config.dtype)
    self._ckptr = ocp.StandardCheckpointer()

  def part_names(self) -> list[str]:
    return self.layout.part_names(self.config)

  def expected_shapes(self, name: str) -> dict:
    """What `part_shapes(name)` must be for this header's config, same keys."""
    return integrity.target_shapes(self.targets[name])

  def part_shapes(self, name: str) -> dict:
    """{"a/b": (shape, dtype name)} of a stored part, from its metadata; CheckpointError if unreadable."""
    folder = self.path / "params" / name
    try:
      shapes = integrity.stored_shapes(self._ckptr, folder)
    except Exception as e:  # a damaged _METADATA raises whatever orbax's parser raises
      raise CheckpointError(f"{folder}: unreadable metadata ({integrity.one_line(e)})") from None
    if not shapes:
      raise CheckpointError(f"{folder}: no readable orbax metadata (_METADATA missing or damaged)")
    return shapes

  def read_part(self, name: str) -> dict:
    """One part's tree of host arrays (the layout's `part_shapes`)."""
    recorded = None if self.checksums is None else self.checksums[name]
    folder = self.path / "params" / name
    return integrity.read_tree(self._ckptr, folder, self.targets[name], recorded, self.verify, CheckpointError)

  def read_pool(self, m: int) -> dict:
    """The expert pool of MoE layer m {name: [S_m, ...]}."""
    return self.read_part(self.layout.moe_parts(self.config)[m])["experts"]

  def close(self) -> None:
    self._ckptr.close()


@contextlib.contextmanager
def reader(path: str | os.PathLike, verify_checksums: bool = True) -> Iterator[Reader]:
  """A part-wise `Reader` over the checkpoint at `path`, closed at the end of the block."""
  r = Reader(path, verify_checksums)
  try:
    yield r
  finally:
    r.close()


def load(path: str | os.PathLike, verify_checksums: bool = True) -> tuple[object, Params]:
  """Reads a checkpoint into host numpy arrays: (config, params in the served layout).

  Raises CheckpointError naming the file for anything damaged; with
  `verify_checksums` (the default) every part's checksum is compared.
  """
  with reader(path, verify_checksums) as r:
    cfg = r.config
    params = r.layout.join_parts(cfg, {name: r.read_part(name) for name in r.part_names()}, r.slot_map)
  r.layout.check_params(cfg, params)
  return cfg, params
