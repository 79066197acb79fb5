"""The expert pool beyond device memory: a host tier, and a device cache of the experts in use.

Three tiers, as JetStream keeps adapters: the store on disk, host memory, the
device. A `HostPool` holds every pool slot on the host: all of them in memory
(`ArrayPool`, pinned host buffers where the device has them), or read lazily
out of the store's files through tensorstore with a bounded host cache
(`jaxmoe.io.store.LazyPool`, from `load_store(path, host_cache_gb=...)`). An `ExpertCache` holds C <= X slots on the device in donated
buffers [C, ...] and one more level of indirection: pool slot -> cache slot
(`cache_of`, uploaded to the device when it changes). Model code still reaches
experts only through maps: the engine hands it the cache buffers as the pool
and `cache_of[slot_map]` as the slot map.

How routing decisions reach the host: the model runs one layer at a time
(`stepped.py` of a family), stopping once per layer between the router and the
experts. The router's pool slots [T, K] come back (a few bytes), `ensure` copies
the missing ones into cache slots and the experts run. This costs one sync and
two dispatches per layer, and in exchange works at any budget that holds one
layer's worst case, exactly (the experts' math is the same program whichever
cache slot holds them). Right after a layer's experts are dispatched,
`prefetch` copies in what the next layer routed to the last time it ran
(routing repeats from token to token), displacing only colder experts: the
copies overlap the running layer, and the next layer's sync finds them
resident. A wrong guess costs bytes, never correctness: `ensure` still checks
every routed slot.

Eviction keeps hot experts: each slot's score is a use count that decays with
every later use of the cache (LRFU: frequency-aware LRU). The victims are the
lowest-scored slots that the current layer does not need and that are not
pinned (`pin`: a tenant's experts that must stay resident).

On a mesh (jaxmoe/serving/mesh.py: `EngineMesh.cache_buffers`, `cache_write`) the cache is split
like the pool: each of the S expert shards holds C cache slots (positions
d * C ... (d + 1) * C - 1 of the buffers [S * C, ...], sharded over `expert`,
and by features over `model`), and a pool slot is cached only in the block of
the shard the placement gave it. Eviction, pinning and prefetching choose
victims within that block. The expert-parallel MoE then reads the buffers as
a pool of S * C slots through `cache_of`, unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import buckets
from jaxmoe.devices import pinned_host_sharding, to_device
from jaxmoe.nn import moe_ops

DECAY = 0.98  # per use of the cache: a slot unused for ~35 uses counts half


class ArrayPool:
  """Every pool slot in host memory: per-slot buffers, pinned where the device offers pinned memory."""

  def __init__(self, pool: dict):
    self.leaves = tuple(pool)
    first = next(iter(pool.values()))
    self.num_slots = int(first.shape[0])
    self.shapes = {n: tuple(w.shape[1:]) for n, w in pool.items()}
    self.dtypes = {n: np.dtype(w.dtype) for n, w in pool.items()}
    host = pinned_host_sharding() if jax.default_backend() != "cpu" else None
    stage = (lambda x: jax.device_put(x, host)) if host is not None else (lambda x: x)
    packed = moe_ops.pack({n: np.asarray(w) for n, w in pool.items()})  # what the device cache holds
    self._slots = {n: [stage(np.ascontiguousarray(w[s])) for s in range(self.num_slots)] for n, w in packed.items()}

  @property
  def expert_bytes(self) -> int:
    return int(sum(np.prod(s) * self.dtypes[n].itemsize for n, s in self.shapes.items()))

  def read(self, slots) -> dict[str, list]:
    """Host buffers of `slots`, per leaf."""
    return {n: [self._slots[n][int(s)] for s in slots] for n in self.leaves}


def by_popularity(slot_maps) -> np.ndarray:
  """Pool slots ordered by how many (tenant, layer, expert) positions use them, most first (stable)."""
  uses = np.bincount(np.concatenate([np.ravel(m) for m in slot_maps]))
  return np.argsort(-uses, kind="stable")


def min_slots(slot_maps, num_experts: int, rows: int, tenants: int) -> int:
  """Cache slots one layer may need at once: a batch of `rows` rows of up to `tenants` tenants routes to
  at most E experts per tenant, and never to more than the layer's distinct slots (shared experts)."""
  maps = np.stack([np.asarray(m) for m in slot_maps])  # [A, L, E]
  distinct = max(len(np.unique(maps[:, layer])) for layer in range(maps.shape[1]))
  return int(min(num_experts * max(1, min(rows, tenants)), distinct))


def _host(x) -> np.ndarray:
  """A routing result on the host: on several processes gathered from all of them (every process calls this
  at the same point of the same step, so the collective lines up) and identical everywhere."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


@functools.partial(jax.jit, donate_argnames=("buffers",))
def _write(buffers: dict, cache_slots, experts: dict):
  """n experts per leaf (a list of [...] arrays) into cache slots [n] of the donated buffers."""
  return {n: buffers[n].at[cache_slots].set(jnp.stack(experts[n])) for n in buffers}


@dataclasses.dataclass
class CacheStats:
  hits: int = 0  # routed slots found resident
  misses: int = 0  # routed slots copied in on demand
  bytes: int = 0  # copied host -> device on demand: misses x expert bytes (never one twice in a layer)
  prefetch_bytes: int = 0  # copied ahead: prefetched x expert bytes
  seconds: float = 0.0  # host time spent starting those copies
  prefetched: int = 0  # slots copied ahead of their layer


class ExpertCache:
  """C pool slots on the device (per expert shard on a mesh), the rest on the host (module docstring)."""

  def __init__(self, host, capacity: int, mesh=None):
    """`capacity` cache slots per device; `mesh` an EngineMesh whose placement the pool slots follow."""
    if capacity < 1:
      raise ValueError(f"an expert cache needs at least one slot, got {capacity}")
    self.host, self.mesh = host, mesh
    self.shards = 1 if mesh is None else mesh.expert_shards
    self.per_shard = int(capacity)
    self.capacity = self.shards * self.per_shard  # every shard's slots
    if mesh is None:
      num_slots, self._source = host.num_slots, None
      self.shard_of = np.zeros(num_slots, np.int64)
    else:  # pool slots in placed numbering; `order` maps them back to the host tier's
      self._source = np.asarray(mesh.placement.order, np.int64)
      num_slots = len(self._source)
      self.shard_of = np.arange(num_slots) // mesh.placement.shard_slots
    packed = moe_ops.pack({n: np.zeros((1, *s), host.dtypes[n]) for n, s in host.shapes.items()})
    zeros = {n: jnp.zeros((self.capacity, *w.shape[1:]), w.dtype) for n, w in packed.items()}
    self.buffers = to_device(zeros) if mesh is None else mesh.cache_buffers(zeros)
    self.cache_of = np.full(num_slots, -1, np.int32)
    self.slot_in = np.full(self.capacity, -1, np.int64)
    self._score = np.zeros(num_slots)
    self._last = np.zeros(num_slots, np.int64)
    self._clock = 0
    self._pinned = np.zeros(num_slots, bool)
    self._dirty = True
    self._device_map = None
    self._last_routed: dict[int, np.ndarray] = {}  # layer -> slots it routed to last time
    self._protect = np.zeros(0, np.int64)  # what the running layer uses
    self.stats = CacheStats()

  @property
  def device_map(self):
    """cache_of on the device: pool slot -> cache slot (-1: not resident)."""
    if self._dirty:
      m = self.cache_of.copy()
      self._device_map, self._dirty = (to_device(m) if self.mesh is None else self.mesh.replicate(m)), False
    return self._device_map

  def _shard_positions(self, shard: int) -> slice:
    return slice(shard * self.per_shard, (shard + 1) * self.per_shard)

  def min_unpinned(self) -> int:
    """The fewest cache slots any shard has left once its pinned experts are in."""
    pinned = self.slot_in >= 0
    pinned[pinned] = self._pinned[self.slot_in[pinned]]
    return int(min(self.per_shard - pinned[self._shard_positions(d)].sum() for d in range(self.shards)))

  @property
  def pinned_count(self) -> int:
    return int(self._pinned.sum())

  def pin(self, slots) -> None:
    """Makes `slots` resident and keeps them so (a tenant's experts that must not be evicted)."""
    slots = np.unique(np.asarray(slots, np.int64))
    pinned = self._pinned.copy()
    pinned[slots] = True
    per_shard = np.bincount(self.shard_of[pinned], minlength=self.shards)
    if per_shard.max() > self.per_shard:
      where = f" on one expert shard ({self.per_shard} per shard)" if self.shards > 1 else ""
      raise ValueError(f"cannot pin {len(slots)} experts in a cache of {self.capacity}{where}")
    self._pinned[slots] = True
    self._load(slots[self.cache_of[slots] < 0], protect=slots)

  def fill(self, slots) -> None:
    """Loads `slots` into empty cache slots (as many as are empty), before serving: not counted as misses."""
    empty = [
      list(np.flatnonzero(self.slot_in[self._shard_positions(d)] < 0) + d * self.per_shard) for d in range(self.shards)
    ]
    chosen, where = [], []
    for s in np.asarray(slots, np.int64):
      free = empty[self.shard_of[s]]
      if self.cache_of[s] < 0 and free:
        chosen.append(s)
        where.append(free.pop(0))
    chosen, where = np.asarray(chosen, np.int64), np.asarray(where, np.int64)
    for start in range(0, len(chosen), 64):  # bounded write programs and staging copies
      self._install(chosen[start : start + 64], where[start : start + 64])

  def ensure(self, slots, layer: int | None = None) -> None:
    """Makes every pool slot in `slots` (any shape, host or device) resident; copies only the misses."""
    needed = np.unique(_host(slots).reshape(-1)).astype(np.int64)
    self._clock += 1
    decay = DECAY ** (self._clock - self._last[needed])
    self._score[needed] = self._score[needed] * decay + 1.0
    self._last[needed] = self._clock
    missing = needed[self.cache_of[needed] < 0]
    self.stats.hits += len(needed) - len(missing)
    self._load(missing, protect=needed)
    self._protect = needed
    if layer is not None:
      self._last_routed[layer] = needed

  def prefetch(self, layer: int) -> None:
    """Copies in, ahead of its router, what layer `layer` routed to last time, where that displaces only
    colder experts than the guess and none the running layer uses; the copies overlap the running layer.
    """
    guess = self._last_routed.get(layer)
    if guess is None:
      return
    guess = guess[self.cache_of[guess] < 0]
    if len(guess) == 0:
      return
    decay = DECAY ** (self._clock - self._last[guess])
    guess = guess[np.argsort(-(self._score[guess] * decay), kind="stable")]  # hottest first
    start = time.perf_counter()
    for d in range(self.shards):
      mine = guess[self.shard_of[guess] == d]
      victims, scores = self._ranked(self._protect, d)
      take = min(len(mine), len(victims))
      hot = self._score[mine[:take]] * DECAY ** (self._clock - self._last[mine[:take]])
      take = int(np.sum(scores[:take] < hot))  # both sorted: stop where the victim is as hot as the guess
      if take == 0:
        continue
      self._install(mine[:take], victims[:take])
      self.stats.prefetched += take
      self.stats.prefetch_bytes += take * self.host.expert_bytes
    self.stats.seconds += time.perf_counter() - start

  def _load(self, missing: np.ndarray, protect: np.ndarray) -> None:
    if len(missing) == 0:
      return
    start = time.perf_counter()
    where = " on one expert shard" if self.shards > 1 else ""
    for d in range(self.shards):
      mine = missing[self.shard_of[missing] == d]
      if len(mine) == 0:
        continue
      if len(mine) > self.per_shard:
        raise ValueError(
          f"a layer needs {len(mine)} experts resident at once{where}; the cache holds {self.per_shard}{where}"
        )
      victims, _ = self._ranked(protect, d)
      if len(victims) < len(mine):
        raise ValueError(
          f"a layer needs {len(mine)} more experts{where} but only {len(victims)} cache slots can be evicted"
        )
      self._install(mine, victims[: len(mine)])
    self.stats.misses += len(missing)
    self.stats.bytes += len(missing) * self.host.expert_bytes
    self.stats.seconds += time.perf_counter() - start

  def _ranked(self, protect: np.ndarray, shard: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Evictable cache slots of `shard`'s block, coldest first (empty ones before any), and their scores."""
    held = self.slot_in
    score = np.full(self.capacity, -1.0)  # empty slots go first
    used = held >= 0
    score[used] = self._score[held[used]] * DECAY ** (self._clock - self._last[held[used]])
    keep = np.zeros(self.capacity, bool)
    keep[used] = self._pinned[held[used]] | np.isin(held[used], protect)
    keep[np.arange(self.capacity) // self.per_shard != shard] = True  # other shards' blocks
    order = np.argsort(score, kind="stable")
    order = order[~keep[order]]
    return order, score[order]

  def _install(self, slots: np.ndarray, victims: np.ndarray) -> None:
    """Pool slots `slots` into cache slots `victims` (one donated write), and the maps updated."""
    experts = self.host.read(slots if self._source is None else self._source[slots])
    m = len(victims)
    width = buckets.pow2(m)  # few compiled write programs: pad by repeating the last copy
    idx = np.concatenate([victims, np.repeat(victims[-1:], width - m)]).astype(np.int32)
    padded = {n: list(parts) + [parts[-1]] * (width - m) for n, parts in experts.items()}
    if self.mesh is None:
      on_device = jax.device_put(padded, jax.devices()[0])  # one dispatch for every copy
      self.buffers = _write(self.buffers, jnp.asarray(idx), on_device)
    else:
      self.buffers = self.mesh.cache_write(self.buffers, idx, padded)
    old = self.slot_in[victims]
    self.cache_of[old[old >= 0]] = -1
    self.slot_in[victims] = slots
    self.cache_of[slots] = victims
    self._dirty = True

  def occupancy(self, slot_maps: dict[str, np.ndarray]) -> dict[str, float]:
    """Per tenant: the share of its L * E experts resident now."""
    return {t: float((self.cache_of[self.placed(m)] >= 0).mean()) for t, m in slot_maps.items()}

  def placed(self, slot_map) -> np.ndarray:
    """A store slot map (host slots) in this cache's slot numbering (the placement's, on a mesh)."""
    flat = np.asarray(slot_map).reshape(-1)
    return flat if self.mesh is None else self.mesh.placement.position[flat]

  def reset_routing(self) -> None:
    self._last_routed.clear()
