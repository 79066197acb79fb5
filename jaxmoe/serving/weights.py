"""Where tenants' weights live on the device in each serving mode.

All modes keep the shared expert pool on the device once, or, with an expert
cache smaller than the pool, the experts in use (jaxmoe/serving/experts.py).
They differ in the backbones (the per-tenant non-expert layers, routers
included):
  swap      one backbone on the device; a switch copies the next one in from
            staged host buffers (pinned host memory where the platform has it)
  resident  every backbone on the device; a switch moves no bytes
  mixed     every backbone on the device, stacked [A, ...] so one batch can
            mix tenants (rows pick their tenant's weights)
"""

from __future__ import annotations

import dataclasses
import enum
import time

import jax
import numpy as np

from jaxmoe.devices import free, pinned_host_sharding, to_device
from jaxmoe.families import base, registry
from jaxmoe.nn import moe_ops
from jaxmoe.serving.experts import ArrayPool, ExpertCache, by_popularity
from jaxmoe.trees import tree_bytes


class Mode(enum.Enum):
  SWAP = "swap"
  RESIDENT = "resident"
  MIXED = "mixed"


@dataclasses.dataclass
class SwitchStats:
  switches: int = 0
  bytes: int = 0
  seconds: float = 0.0


class TenantWeights:
  """Shared pool and slot maps on the device; backbones per mode (subclasses).

  Swap and resident serve one tenant per batch through `params(tenant)`;
  mixed serves `stacked` params to batches that mix tenants.
  """

  mode: Mode

  def __init__(self, store, cache_slots: int | None = None, mesh=None):
    self.tenants = list(store.tenants)
    self.index = {name: i for i, name in enumerate(self.tenants)}
    self.mesh = mesh  # jaxmoe.serving.mesh.EngineMesh: the pool sharded, maps renumbered, backbones replicated or split
    lazy = getattr(store, "host_pool", None)  # a store read lazily off disk (io/store.py)
    self.lazy_pool = lazy
    total = lazy.num_slots if lazy is not None else moe_ops.num_slots(store.pool)
    per_device = total if mesh is None else -(-total // mesh.expert_shards)  # slots a device holds of the pool
    self.cache = None
    if cache_slots is not None and cache_slots < per_device:  # the pool stays on the host; the device caches
      if mesh is not None:  # each expert shard caches the slots placed on it
        mesh.place(total, store.slot_maps)
      host = lazy if lazy is not None else ArrayPool(store.pool)
      self.pool, self.cache = None, ExpertCache(host, cache_slots, mesh)
      self.cache.fill(self.cache.placed(by_popularity(store.slot_maps.values())))  # the experts most tenants share
    elif mesh is None:
      self.pool = to_device(moe_ops.pack(store.pool))
    else:  # a store read lazily is read slot by slot: each process reads only its own devices' slots
      self.pool = mesh.pool(lazy.packed_leaves() if lazy is not None else moe_ops.pack(store.pool), store.slot_maps)
    # This process's share of the pool on a mesh (fixed once placed), for the read counts in the stats.
    self.pool_slots_held = mesh.held_slots(self.pool) if mesh is not None and self.pool is not None else None
    self.host_slot_maps = {t: np.asarray(store.slot_maps[t], np.int32) for t in self.tenants}
    self.slot_maps = {t: self._slot_map(store.slot_maps[t]) for t in self.tenants}
    self.stats = SwitchStats()
    self.active: str | None = None

  def _slot_map(self, slot_map):
    slot_map = np.asarray(slot_map, np.int32)
    return to_device(slot_map) if self.mesh is None else self.mesh.slot_map(slot_map)

  def _backbone(self, tree):
    return to_device(tree) if self.mesh is None else self.mesh.backbone(tree)

  def params(self, tenant: str) -> dict:
    """Single-tenant params for `tenant`, switching to it first if needed."""
    raise NotImplementedError

  def prefetch(self, tenant: str) -> None:
    """Starts bringing `tenant` in ahead of a switch (only swap moves bytes)."""

  def resident(self, tenant: str) -> bool:
    """Whether `tenant`'s backbone is on the device now."""
    return True

  def device_bytes(self) -> int:
    raise NotImplementedError

  def expert_bytes(self) -> int:
    """Device bytes of experts: the whole pool, or the cache's buffers."""
    return tree_bytes(self.pool) if self.cache is None else tree_bytes(self.cache.buffers)

  def close(self) -> None:
    """Frees every device buffer these weights hold."""
    free([v for k, v in vars(self).items() if k != "mesh"])


class ResidentWeights(TenantWeights):
  mode = Mode.RESIDENT

  def __init__(self, store, cache_slots: int | None = None, mesh=None):
    super().__init__(store, cache_slots, mesh)
    self.backbones = {t: self._backbone(store.backbones[t]) for t in self.tenants}

  def params(self, tenant: str) -> dict:
    if tenant != self.active:
      self.stats.switches += int(self.active is not None)
      self.active = tenant
    return {"backbone": self.backbones[tenant], "experts": self.pool, "slot_map": self.slot_maps[tenant]}

  def device_bytes(self) -> int:
    return self.expert_bytes() + tree_bytes(self.backbones)


class SwapWeights(TenantWeights):
  mode = Mode.SWAP

  def __init__(self, store, cache_slots: int | None = None, mesh=None):
    super().__init__(store, cache_slots, mesh)
    host = pinned_host_sharding() if mesh is None else None  # on a mesh: host numpy, replicated on a switch
    stage = (lambda x: jax.device_put(x, host)) if host is not None else np.asarray
    self.host = {t: jax.tree.map(stage, store.backbones[t]) for t in self.tenants}
    self.device_backbone = None
    self._prefetched: tuple[str, object] | None = None

  def prefetch(self, tenant: str) -> None:
    if tenant != self.active and (self._prefetched is None or self._prefetched[0] != tenant):
      self._prefetched = (tenant, self._backbone(self.host[tenant]))  # async copy

  def params(self, tenant: str) -> dict:
    if tenant != self.active:
      self._switch(tenant)
    return {"backbone": self.device_backbone, "experts": self.pool, "slot_map": self.slot_maps[tenant]}

  def _switch(self, tenant: str) -> None:
    start = time.perf_counter()
    if self.device_backbone is not None and (self._prefetched is None or self._prefetched[0] != tenant):
      free(self.device_backbone)  # before copying, so the device holds one backbone at a time
    if self._prefetched is not None and self._prefetched[0] == tenant:
      incoming = self._prefetched[1]
    else:
      incoming = self._backbone(self.host[tenant])
    old, self.device_backbone, self._prefetched = self.device_backbone, jax.block_until_ready(incoming), None
    if old is not None:
      free(old)
    self.stats.switches += int(self.active is not None)
    self.stats.bytes += tree_bytes(self.device_backbone)
    self.stats.seconds += time.perf_counter() - start
    self.active = tenant

  def device_bytes(self) -> int:
    return self.expert_bytes() + (tree_bytes(self.device_backbone) if self.device_backbone is not None else 0)

  def resident(self, tenant: str) -> bool:
    return tenant == self.active


class MixedWeights(TenantWeights):
  mode = Mode.MIXED

  def __init__(self, store, cache_slots: int | None = None, mesh=None):
    super().__init__(store, cache_slots, mesh)
    scanned = registry.of(store.config).layout.SCANNED
    stacked = base.stack_tenants(scanned, [store.backbones[t] for t in self.tenants])
    self.stacked = {
      "backbone": self._backbone(stacked),
      "experts": self.pool,
      "slot_map": self._slot_map(np.stack([np.asarray(store.slot_maps[t], np.int32) for t in self.tenants])),
    }

  def device_bytes(self) -> int:
    return self.expert_bytes() + tree_bytes(self.stacked["backbone"])


def make_weights(mode: Mode, store, cache_slots: int | None = None, mesh=None) -> TenantWeights:
  cls = {Mode.SWAP: SwapWeights, Mode.RESIDENT: ResidentWeights, Mode.MIXED: MixedWeights}[mode]
  return cls(store, cache_slots, mesh)
