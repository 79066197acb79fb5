"""Multi-tenant stores: one shared expert pool, K backbones, K slot maps.

A store folder (written atomically by `store_writer`, read by `load_store`):
  store.json                   {"format": 1, "kind": "jaxmoe-store", "config",
                                "tenants", "slots_per_layer", "slot_maps",
                                "bytes", ...} plus what the writer's caller
                                adds (metric, owner policy, per-position
                                distances and groups)
  pool/layer_NNNN              orbax {w1 [X_l, D, F], w3 [X_l, D, F], w2 [X_l, F, D]}
  backbones/<tenant>/globals   orbax {embed, norm, lm_head}
  backbones/<tenant>/layer_NNNN  orbax, that tenant's layer (attention, norms, router)
  backbones/<tenant>/tokenizer.json ...  copied from the tenant's checkpoint

Slot maps in store.json are local to each layer's pool. store.json records a
checksum of every part ("checksums": {"pool/layer_0000": "sha256:...", ...}),
verified by `load_store` unless `verify_checksums=False`; a store written
before checksums existed loads with one UnverifiedWarning. Every family stores
the same way: a tenant's backbone as its checkpoint parts' backbone trees
(Switch: globals, encoder_NNNN, decoder_NNNN), pool/layer_NNNN per MoE layer
with that family's expert leaves. Loaded, tenant t's model is the served
layout {"backbone": backbones[t], "experts": pool, "slot_map": slot_maps[t]}
over one pool [X, ...] shared by every tenant.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import re
from collections.abc import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxmoe import trees
from jaxmoe.errors import ConfigError, StoreError
from jaxmoe.families import base, registry
from jaxmoe.io import checkpoint, files, integrity
from jaxmoe.io.tokenizer import load_tokenizer
from jaxmoe.nn import moe_ops
from jaxmoe.nn.moe import Impl
from jaxmoe.trees import Params

FORMAT_VERSION = 1
KIND = "jaxmoe-store"
HEADER = "store.json"
# Tenant names become folder names: a letter or digit, then letters, digits, '.', '_' or '-'.
TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_tenant_names(names: list[str]) -> None:
  """Raises StoreError unless the names are unique (ignoring case) and safe as folder names."""
  seen: dict[str, str] = {}
  for name in names:
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
      raise StoreError(
        f"tenant name {name!r} is not safe as a file name: use 1-64 letters, digits, "
        "'.', '_' or '-', starting with a letter or digit"
      )
    if name.lower() in seen:
      other = seen[name.lower()]
      also = "" if other == name else f" (names differ only in case from {other!r})"
      raise StoreError(f"duplicate tenant name {name!r}{also}")
    seen[name.lower()] = name


def expert_bytes(cfg) -> int:
  """Bytes of one expert (w1, w3, w2; Switch: wi, wo) in the config's dtype."""
  return trees.tree_bytes(trees.abstract(registry.of(cfg).layout.expert_shapes(cfg, 1), cfg.dtype))


def backbone_targets(cfg) -> dict[str, dict]:
  """{part name: abstract tree} of one tenant's backbone, as the store writes it."""
  layout = registry.of(cfg).layout
  parts = layout.part_shapes(cfg, [cfg.num_experts] * cfg.num_moe_layers)
  shapes = {name: tree if name == "globals" else tree["backbone"] for name, tree in parts.items()}
  return trees.abstract(shapes, cfg.dtype)


class StoreWriter:
  """Writes a store part by part; the pool and backbones one layer at a time."""

  def __init__(self, folder: pathlib.Path, cfg, tenants: list[str]):
    check_tenant_names(tenants)
    self.folder, self.cfg, self.tenants = folder, cfg, list(tenants)
    self.layout = registry.of(cfg).layout
    self.slots: dict[int, int] = {}
    self.pool_bytes = 0
    self.backbone_bytes = {t: 0 for t in self.tenants}
    self._parts = {t: set() for t in self.tenants}
    self.checksums: dict[str, str] = {}
    # The checkpoint Writer's checkpointer: no defensive copy of host arrays (we wait on every save).
    self._ckptr = checkpoint._part_checkpointer()
    self._open = True

  def _save(self, rel: str, tree) -> None:
    self.checksums[rel] = integrity.digest(tree, rel, StoreError)
    self._ckptr.save(self.folder / rel, args=ocp.args.PyTreeSave(tree))
    self._ckptr.wait_until_finished()

  def close(self) -> None:
    """Waits for any save in flight and releases orbax (also after a failure or an interrupt)."""
    if self._open:
      self._open = False
      self._ckptr.close()

  def _tenant(self, name: str) -> str:
    if name not in self._parts:
      raise StoreError(f"unknown tenant {name!r}; this store has {self.tenants}")
    return name

  def write_backbone_part(self, name: str, part: str, tree: dict) -> None:
    """One checkpoint part's backbone tree of tenant `name` (the layout's `part_names`)."""
    self._save(f"backbones/{self._tenant(name)}/{part}", tree)
    self.backbone_bytes[name] += trees.tree_bytes(tree)
    self._parts[name].add(part)

  def write_pool_layer(self, index: int, pool: dict) -> None:
    """MoE layer `index`'s pool {name: [X, ...]} (the family's expert leaves)."""
    tree = {n: pool[n] for n in self.layout.EXPERT_NAMES}
    self.slots[index] = int(tree[self.layout.EXPERT_NAMES[0]].shape[0])
    self._save(f"pool/layer_{index:04d}", tree)
    self.pool_bytes += trees.tree_bytes(tree)

  def copy_tokenizer(self, name: str, src: str | os.PathLike) -> None:
    dst = self.folder / "backbones" / self._tenant(name)
    dst.mkdir(parents=True, exist_ok=True)
    checkpoint.copy_tokenizer(src, dst)

  def byte_counts(self) -> dict:
    """What the written arrays take, and what K plain checkpoints would."""
    full_experts = self.cfg.num_moe_layers * self.cfg.num_experts * expert_bytes(self.cfg)
    backbones_total = sum(self.backbone_bytes.values())
    full = {t: self.backbone_bytes[t] + full_experts for t in self.tenants}
    total = self.pool_bytes + backbones_total
    return {
      "expert": expert_bytes(self.cfg),
      "pool": self.pool_bytes,
      "backbones": dict(self.backbone_bytes),
      "backbones_total": backbones_total,
      "total": total,  # pool + backbones: every array in the store
      "swap_resident": self.pool_bytes + max(self.backbone_bytes.values()),
      "full_copy": full,
      "full_copies": sum(full.values()),
      "slot_maps": len(self.tenants) * self.cfg.num_moe_layers * self.cfg.num_experts * 4,
    }

  def finish(self, slot_maps: dict[str, np.ndarray], extra: dict | None = None) -> dict:
    """Checks completeness, writes store.json, returns its content."""
    num_layers = self.cfg.num_moe_layers
    missing = sorted(set(range(num_layers)) - set(self.slots))
    if missing:
      raise StoreError(f"store incomplete: pool layers {missing} not written")
    for t in self.tenants:
      if self._parts[t] != set(self.layout.part_names(self.cfg)):
        raise StoreError(f"store incomplete: backbone of tenant {t!r}")
    slots = [self.slots[i] for i in range(num_layers)]
    maps = {t: np.asarray(slot_maps[t], np.int32).reshape(num_layers, -1) for t in self.tenants}
    for t, m in maps.items():
      outside = m.size and (m.min() < 0 or np.any(m >= np.asarray(slots)[:, None]))
      if m.shape != (num_layers, self.cfg.num_experts) or outside:
        raise StoreError(f"slot map of tenant {t!r} does not fit the pool {slots}")
    header = {
      "format": FORMAT_VERSION,
      "kind": KIND,
      "config": json.loads(self.cfg.to_json()),
      "tenants": self.tenants,
      "slots_per_layer": slots,
      "slot_maps": {t: m.tolist() for t, m in maps.items()},
      "bytes": self.byte_counts(),
      **(extra or {}),
      "checksums": dict(self.checksums),
    }
    files.write_json(self.folder / HEADER, header, StoreError, indent=1)
    self.close()
    return header


@contextlib.contextmanager
def store_writer(out: str | os.PathLike, cfg, tenants: list[str]) -> Iterator[StoreWriter]:
  """Atomic part-wise store writer; call `finish(slot_maps)` before the block ends."""
  with files.atomic_dir(out, StoreError) as tmp:
    w = StoreWriter(tmp, cfg, tenants)
    try:
      yield w
    finally:
      w.close()  # before the temporary folder is removed: no orbax thread writes into it after
    if not (tmp / HEADER).is_file():
      raise StoreError("store writer closed without finish()")


def read_store_header(path: str | os.PathLike) -> dict:
  """store.json validated (kind, format, config, tenants, slots, slot maps, checksums); StoreError names the file."""
  path = pathlib.Path(path)
  header_path = path / HEADER
  if not header_path.is_file():
    raise StoreError(f"{path} is not a jaxmoe store: {HEADER} is missing")
  header = files.read_json(header_path, StoreError)
  if not isinstance(header, dict):
    raise StoreError(f"{header_path}: expected a JSON object, got {type(header).__name__}")
  if header.get("kind") != KIND or header.get("format") != FORMAT_VERSION:
    raise StoreError(
      f"{header_path}: kind {header.get('kind')!r} format {header.get('format')!r}, "
      f"expected {KIND!r} format {FORMAT_VERSION}"
    )
  try:
    cfg = registry.config_from_dict(header.get("config"))
    tenants = header.get("tenants")
    if not isinstance(tenants, list) or not tenants:
      raise StoreError("'tenants' must be a non-empty list of names")
    check_tenant_names(tenants)
    maps = header.get("slot_maps")
    if not isinstance(maps, dict) or sorted(maps) != sorted(tenants):
      raise StoreError("'slot_maps' must hold one slot map per tenant")
    for t in tenants:
      checkpoint.check_slots(cfg, header.get("slots_per_layer"), maps[t], f"tenant {t!r}")
    checkpoint.check_checksums(header, list(part_paths(cfg, tenants)), "store")
  except (StoreError, checkpoint.CheckpointError, ConfigError) as e:
    raise StoreError(f"{header_path}: {e}") from None
  return header


def part_paths(cfg, tenants: list[str]) -> dict[str, tuple[str, str | None]]:
  """{store-relative part folder: (checkpoint part name, tenant or None for the pool)}."""
  layout = registry.of(cfg).layout
  out = {f"pool/layer_{i:04d}": (name, None) for i, name in enumerate(layout.moe_parts(cfg))}
  for t in tenants:
    out.update({f"backbones/{t}/{part}": (part, t) for part in layout.part_names(cfg)})
  return out


class LazyPool:
  """A store's pool read lazily out of its per-layer parts, with at most `host_bytes` cached in memory.

  The host tier between the disk and the device expert cache
  (jaxmoe/serving/experts.py): tensorstore reads only the chunks a slot lives in
  and keeps recent ones in an LRU cache bounded by `host_bytes`. Slots come back
  as the MoE boundary takes them (`moe_ops.pack`).
  """

  def __init__(self, path: pathlib.Path, cfg, slots_per_layer: list[int], host_bytes: int):
    import tensorstore as ts

    shapes = registry.of(cfg).layout.expert_shapes(cfg, 1)
    self.leaves = tuple(shapes)
    self.shapes = {n: tuple(s[1:]) for n, s in shapes.items()}
    self.dtypes = {n: np.dtype(jax.numpy.dtype(cfg.dtype)) for n in shapes}
    self.num_slots = int(sum(slots_per_layer))
    self._layer_of = np.repeat(np.arange(len(slots_per_layer)), slots_per_layer)
    self._first = np.concatenate([[0], np.cumsum(slots_per_layer)[:-1]]).astype(np.int64)
    self.slots_read: set[int] = set()  # every slot read so far (on a mesh: this process's share)
    context = ts.Context({"cache_pool": {"total_bytes_limit": int(host_bytes)}})
    self._arrays = []
    for i in range(len(slots_per_layer)):
      folder = path / f"pool/layer_{i:04d}"
      meta = json.loads((folder / "_METADATA").read_text())
      driver = "zarr3" if meta.get("use_zarr3") else "zarr"
      kv = lambda n, folder=folder: {"driver": "ocdbt", "base": f"file://{folder}", "path": n}  # noqa: E731
      spec = lambda n, driver=driver, kv=kv: {"driver": driver, "kvstore": kv(n)}  # noqa: E731
      self._arrays.append({n: ts.open(spec(n), open=True, read=True, context=context).result() for n in self.leaves})

  @property
  def expert_bytes(self) -> int:
    return int(sum(np.prod(s) * self.dtypes[n].itemsize for n, s in self.shapes.items()))

  def read(self, slots, leaves=None) -> dict[str, list]:
    """Host arrays of pool `slots`, per leaf (every leaf, or those named in `leaves`)."""
    leaves = self.leaves if leaves is None else tuple(leaves)
    out = {n: [] for n in leaves}
    for s in slots:
      layer = int(self._layer_of[int(s)])
      local = int(s) - int(self._first[layer])
      for n in leaves:
        out[n].append(moe_ops.pack({n: self._arrays[layer][n][local].read().result()})[n])
      self.slots_read.add(int(s))
    return out

  def packed_leaves(self) -> dict:
    """{leaf: an array-like [X, ...] of the packed pool} whose indexing reads only the indexed slots."""
    return {n: _LazyLeaf(self, n) for n in self.leaves}


class _LazyLeaf:
  """One leaf of a LazyPool as an array: `leaf[slots]` reads those slots (an int array) from disk."""

  def __init__(self, pool: LazyPool, name: str):
    self.pool, self.name = pool, name
    self.shape = (pool.num_slots, *pool.shapes[name])
    self.dtype = moe_ops.pack({name: np.zeros((0,), pool.dtypes[name])})[name].dtype

  def __getitem__(self, slots) -> np.ndarray:
    slots = np.asarray(slots).reshape(-1)
    if not len(slots):
      return np.zeros((0, *self.shape[1:]), self.dtype)
    return np.stack(self.pool.read(slots, [self.name])[self.name])


class Store:
  """A loaded store: host arrays in the served layout, plus one device copy of the pool for its models."""

  def __init__(
    self, path: pathlib.Path, metadata: dict, pool: dict | None, backbones: dict[str, Params], host_pool=None
  ):
    self.path = path
    self.metadata = metadata
    self.config = registry.config_from_dict(metadata["config"])
    self.family = registry.of(self.config)
    self.tenants: list[str] = list(metadata["tenants"])
    self.slots_per_layer: list[int] = list(metadata["slots_per_layer"])
    self._pool = pool  # {leaf: [X, ...]} over every MoE layer; None while read lazily
    self.host_pool: LazyPool | None = host_pool
    self.backbones = backbones
    self.slot_maps = {t: base.global_slot_map(metadata["slot_maps"][t], self.slots_per_layer) for t in self.tenants}
    self._device_pool = None
    self._models: dict[tuple[str, Impl], object] = {}

  @property
  def pool(self) -> dict:
    """The whole pool in host memory (a lazily read store reads it all now, once)."""
    if self._pool is None:
      lazy = self.host_pool
      packed = {n: np.stack(v) for n, v in lazy.read(range(lazy.num_slots)).items()}
      self._pool = {n: w.view(lazy.dtypes[n]) if w.dtype != lazy.dtypes[n] else w for n, w in packed.items()}
    return self._pool

  def pool_bytes(self) -> int:
    lazy = self.host_pool
    return lazy.num_slots * lazy.expert_bytes if lazy is not None else trees.tree_bytes(self._pool)

  def params(self, name: str) -> Params:
    """Tenant `name` in the served layout, over the host pool."""
    return {"backbone": self.backbones[self._check(name)], "experts": self.pool, "slot_map": self.slot_maps[name]}

  def export_params(self, name: str) -> Params:
    """Tenant `name` as a plain model: its experts gathered from the pool (X = L * E, identity map).

    What `checkpoint.save` needs to write the tenant back out as an ordinary checkpoint.
    """
    return base.plain_model(self.params(name))

  def device_pool(self) -> dict:
    """The pool on the default device, transferred once and reused by every tenant's model."""
    if self._device_pool is None:
      self._device_pool = jax.device_put(moe_ops.pack(self.pool))
    return self._device_pool

  @functools.cached_property
  def tokenizer(self):
    """The tokenizer the serving engine uses: the first tenant's (fine-tunes of one base share it)."""
    return load_tokenizer(self.path / "backbones" / self.tenants[0], self.config)

  def model(self, name: str, impl: Impl = Impl.AUTO):
    """Tenant `name` as its family's model object (like `jaxmoe.load` on its own checkpoint)."""
    key = (self._check(name), impl)
    if key not in self._models:
      params = {**self.params(name), "experts": self.device_pool()}
      tok = load_tokenizer(self.path / "backbones" / name, self.config)
      cls = self.family.model
      self._models[key] = cls(cls.config_for(self.config), params, tok, impl)
    return self._models[key]

  def _check(self, name: str) -> str:
    if name not in self.backbones:
      raise ValueError(f"unknown tenant {name!r}; this store has {self.tenants}")
    return name


def load_store(path: str | os.PathLike, verify_checksums: bool = True, host_cache_gb: float | None = None) -> Store:
  """Reads a store (from `jaxmoe-consolidate`) into host memory.

  StoreError names the file of anything damaged; with `verify_checksums` (the
  default) every part's recorded checksum is compared and its values checked
  finite. With `host_cache_gb`, the expert pool is not kept: it stays in the
  store's files, read lazily slot by slot (`LazyPool`) with at most that many
  10^9 bytes cached in host memory, for an engine whose device expert cache
  holds the experts in use (EngineConfig.expert_cache_gb); its parts are still
  verified at load, one layer in memory at a time. Backbones are always read.
  """
  if host_cache_gb is not None and not host_cache_gb > 0:
    raise ValueError(f"host_cache_gb={host_cache_gb} must be > 0")
  path = pathlib.Path(path).absolute()
  header = read_store_header(path)
  cfg = registry.config_from_dict(header["config"])
  layout = registry.of(cfg).layout
  sums = header.get("checksums")
  if verify_checksums and sums is None:
    integrity.warn_unverified(path, "store")
  targets = trees.abstract(layout.part_shapes(cfg, header["slots_per_layer"]), cfg.dtype)
  with ocp.StandardCheckpointer() as ckptr:

    def read(rel: str, target):
      recorded = None if sums is None else sums[rel]
      return integrity.read_tree(ckptr, path / rel, target, recorded, verify_checksums, StoreError)

    pool, lazy = None, None
    pool_parts = [(f"pool/layer_{i:04d}", targets[name]["experts"]) for i, name in enumerate(layout.moe_parts(cfg))]
    if host_cache_gb is None:
      parts = [read(rel, target) for rel, target in pool_parts]
      pool = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}
      del parts
    else:
      if verify_checksums:  # each part read once, then dropped: host memory stays one layer over the cache
        for rel, target in pool_parts:
          read(rel, target)
      lazy = LazyPool(path, cfg, header["slots_per_layer"], int(host_cache_gb * 1e9))
    bb_targets = {part: tree if part == "globals" else tree["backbone"] for part, tree in targets.items()}
    backbones = {
      t: layout.join_backbone(cfg, {part: read(f"backbones/{t}/{part}", tree) for part, tree in bb_targets.items()})
      for t in header["tenants"]
    }
  store = Store(path, header, pool, backbones, lazy)
  experts = (
    pool if lazy is None else trees.abstract(layout.expert_shapes(cfg, int(sum(header["slots_per_layer"]))), cfg.dtype)
  )
  for t in store.tenants:
    layout.check_params(cfg, {"backbone": backbones[t], "experts": experts, "slot_map": store.slot_maps[t]})
  return store
