"""The expert pool beyond device memory: a host tier, and a device cache of the experts in use.

Three tiers, as JetStream keeps adapters: the store on disk, host memory, the
device. A `HostPool` holds every pool slot on the host: all of them in memory
(`ArrayPool`, pinned host buffers where the device has them), or read lazily
out of the store's files through tensorstore with a bounded host cache
(`StorePool`). An `ExpertCache` holds C <= X slots on the device in donated
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
cache slot holds them). While a layer's experts run, `prefetch` starts copying
what the next layer routed to at the previous step (routing repeats from token
to token), so those copies overlap compute.

Eviction keeps hot experts: each slot's score is a use count that decays with
every later use of the cache (LRFU: frequency-aware LRU). The victims are the
lowest-scored slots that the current layer does not need and that are not
pinned (`pin`: a tenant's experts that must stay resident).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import buckets
from jaxmoe.devices import pinned_host_sharding, to_device
from jaxmoe.nn import moe

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
    packed = moe.pack({n: np.asarray(w) for n, w in pool.items()})  # what the device cache holds
    self._slots = {n: [stage(np.ascontiguousarray(w[s])) for s in range(self.num_slots)] for n, w in packed.items()}

  @property
  def expert_bytes(self) -> int:
    return int(sum(np.prod(s) * self.dtypes[n].itemsize for n, s in self.shapes.items()))

  def read(self, slots) -> dict[str, list]:
    """Host buffers of `slots`, per leaf."""
    return {n: [self._slots[n][int(s)] for s in slots] for n in self.leaves}


class StorePool:
  """Every pool slot read lazily out of a store's per-layer parts, with at most `host_bytes` cached.

  tensorstore reads the chunks a slot lives in and keeps them in its own LRU
  cache, bounded by the context's `cache_pool` limit: disk -> host -> device.
  """

  def __init__(self, store_path, parts: list[str], slots_per_layer: list[int], shapes: dict, dtype, host_bytes: int):
    import tensorstore as ts

    self.leaves = tuple(shapes)
    self.shapes = {n: tuple(s) for n, s in shapes.items()}
    self.dtypes = {n: np.dtype(dtype) for n in shapes}
    self.num_slots = int(sum(slots_per_layer))
    self._layer_of = np.repeat(np.arange(len(slots_per_layer)), slots_per_layer)
    self._first = np.concatenate([[0], np.cumsum(slots_per_layer)[:-1]])
    context = ts.Context({"cache_pool": {"total_bytes_limit": int(host_bytes)}})
    base = pathlib.Path(store_path).absolute()
    self._arrays = [
      {
        n: ts.open(
          {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{base / part}", "path": n}},
          open=True,
          read=True,
          context=context,
        ).result()
        for n in self.leaves
      }
      for part in parts
    ]

  @property
  def expert_bytes(self) -> int:
    return int(sum(np.prod(s) * self.dtypes[n].itemsize for n, s in self.shapes.items()))

  def read(self, slots) -> dict[str, list]:
    out = {n: [] for n in self.leaves}
    for s in slots:
      layer = int(self._layer_of[int(s)])
      local = int(s) - int(self._first[layer])
      for n in self.leaves:
        out[n].append(moe.pack({n: self._arrays[layer][n][local].read().result()})[n])
    return out


@functools.partial(jax.jit, donate_argnames=("buffers",))
def _write(buffers: dict, cache_slots, experts: dict):
  """n experts per leaf (a list of [...] arrays) into cache slots [n] of the donated buffers."""
  return {n: buffers[n].at[cache_slots].set(jnp.stack(experts[n])) for n in buffers}


@dataclasses.dataclass
class CacheStats:
  hits: int = 0
  misses: int = 0
  bytes: int = 0
  seconds: float = 0.0
  prefetched: int = 0


class ExpertCache:
  """C pool slots on the device, the rest on the host (module docstring)."""

  def __init__(self, host, capacity: int):
    if capacity < 1:
      raise ValueError(f"an expert cache needs at least one slot, got {capacity}")
    self.host, self.capacity = host, int(capacity)
    packed = moe.pack({n: np.zeros((1, *s), host.dtypes[n]) for n, s in host.shapes.items()})
    self.buffers = to_device({n: jnp.zeros((self.capacity, *w.shape[1:]), w.dtype) for n, w in packed.items()})
    self.cache_of = np.full(host.num_slots, -1, np.int32)
    self.slot_in = np.full(self.capacity, -1, np.int64)
    self._score = np.zeros(host.num_slots)
    self._last = np.zeros(host.num_slots, np.int64)
    self._clock = 0
    self._pinned = np.zeros(host.num_slots, bool)
    self._dirty = True
    self._device_map = None
    self._last_routed: dict[int, np.ndarray] = {}  # layer -> slots it routed to last time
    self._inflight: dict[int, dict] = {}  # pool slot -> device arrays of a started prefetch
    self.stats = CacheStats()

  @property
  def device_map(self):
    """cache_of on the device: pool slot -> cache slot (-1: not resident)."""
    if self._dirty:
      self._device_map, self._dirty = to_device(self.cache_of.copy()), False
    return self._device_map

  def pin(self, slots) -> None:
    """Makes `slots` resident and keeps them so (a tenant's experts that must not be evicted)."""
    slots = np.unique(np.asarray(slots, np.int64))
    if int(self._pinned.sum()) + len(np.setdiff1d(slots, np.flatnonzero(self._pinned))) > self.capacity:
      raise ValueError(f"cannot pin {len(slots)} experts in a cache of {self.capacity}")
    self._pinned[slots] = True
    self._load(slots, protect=slots)

  def ensure(self, slots, layer: int | None = None) -> None:
    """Makes every pool slot in `slots` (any shape, host or device) resident; copies only the misses."""
    needed = np.unique(np.asarray(slots).reshape(-1)).astype(np.int64)
    self._clock += 1
    decay = DECAY ** (self._clock - self._last[needed])
    self._score[needed] = self._score[needed] * decay + 1.0
    self._last[needed] = self._clock
    missing = needed[self.cache_of[needed] < 0]
    self.stats.hits += len(needed) - len(missing)
    self._load(missing, protect=needed)
    if layer is not None:
      self._last_routed[layer] = needed

  def prefetch(self, layer: int) -> None:
    """Starts copying, for layer `layer`, the slots it routed to last time that are not resident."""
    guess = self._last_routed.get(layer)
    if guess is None:
      return
    for s in guess[self.cache_of[guess] < 0]:
      if int(s) not in self._inflight:
        arrays = self.host.read([s])
        self._inflight[int(s)] = jax.device_put({n: v[0] for n, v in arrays.items()}, jax.devices()[0])
        self.stats.prefetched += 1

  def _load(self, missing: np.ndarray, protect: np.ndarray) -> None:
    if len(missing) == 0:
      return
    if len(missing) > self.capacity:
      raise ValueError(f"a layer needs {len(missing)} experts resident at once; the cache holds {self.capacity}")
    start = time.perf_counter()
    victims = self._victims(len(missing), protect)
    fresh = [s for s in missing if int(s) not in self._inflight]
    read = self.host.read(fresh) if fresh else {n: [] for n in self.host.leaves}
    fresh_at = {int(s): i for i, s in enumerate(fresh)}
    experts = {}
    for n in self.host.leaves:
      parts = [self._inflight[int(s)][n] if int(s) in self._inflight else read[n][fresh_at[int(s)]] for s in missing]
      experts[n] = parts
    for s in missing:
      self._inflight.pop(int(s), None)
    self._write(victims, experts)
    old = self.slot_in[victims]
    self.cache_of[old[old >= 0]] = -1
    self.slot_in[victims] = missing
    self.cache_of[missing] = victims
    self._dirty = True
    self.stats.misses += len(missing)
    self.stats.bytes += len(missing) * self.host.expert_bytes
    self.stats.seconds += time.perf_counter() - start

  def _victims(self, n: int, protect: np.ndarray) -> np.ndarray:
    """The n cache slots to overwrite: empty ones first, then the lowest decayed scores."""
    held = self.slot_in
    score = np.full(self.capacity, -1.0)  # empty slots go first
    used = held >= 0
    decay = DECAY ** (self._clock - self._last[held[used]])
    score[used] = self._score[held[used]] * decay
    keep = np.zeros(self.capacity, bool)
    keep[used] = self._pinned[held[used]] | np.isin(held[used], protect)
    score[keep] = np.inf
    victims = np.argsort(score, kind="stable")[:n]
    if np.isinf(score[victims]).any():
      raise ValueError(f"a layer needs {n} more experts but only {int((~keep).sum())} cache slots can be evicted")
    return victims

  def _write(self, victims: np.ndarray, experts: dict) -> None:
    m = len(victims)
    width = buckets.pow2(m)  # few compiled write programs: pad by repeating the last copy
    idx = np.concatenate([victims, np.repeat(victims[-1:], width - m)]).astype(np.int32)
    padded = {n: list(parts) + [parts[-1]] * (width - m) for n, parts in experts.items()}
    on_device = jax.device_put(padded, jax.devices()[0])  # one dispatch for every copy
    self.buffers = _write(self.buffers, jnp.asarray(idx), on_device)

  def occupancy(self, slot_maps: dict[str, np.ndarray]) -> dict[str, float]:
    """Per tenant: the share of its L * E experts resident now."""
    return {t: float((self.cache_of[np.asarray(m).reshape(-1)] >= 0).mean()) for t, m in slot_maps.items()}

  def reset_routing(self) -> None:
    self._last_routed.clear()
