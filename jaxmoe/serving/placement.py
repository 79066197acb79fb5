"""Which device of the `expert` axis holds each pool slot, and the pool and slot maps renumbered to match.

The pool is sharded in contiguous blocks of Xl = ceil(X / n) slots (device d
holds positions d * Xl ... (d + 1) * Xl - 1), so placing slot s on device d
means giving it a position in d's block. A placement is that renumbering:
`order` [n * Xl] (the source slot at each position, -1 for padding, which no
map reaches) and `position` [X] (each source slot's new index, applied to
every tenant's slot map). The model code never sees it: it follows the maps
(DESIGN: sharding changes the pool and the maps only).

Policies:
  round_robin  slot s on device s % n (the default). The pool is layer-major,
               so each layer's experts spread evenly over the devices
  balanced     longest-processing-time greedy over per-slot loads (routing
               counts recorded in calibration, or `reference_loads`: how many
               tenants reach each slot), layer by layer (each layer's slots
               spread evenly), each device capped at Xl slots
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import numpy as np

POLICIES = ("round_robin", "balanced")


@dataclasses.dataclass(frozen=True)
class Placement:
  order: np.ndarray  # [n * Xl] int: source slot at each position, -1: padding
  position: np.ndarray  # [X] int32: new index of each source slot
  num_shards: int

  @property
  def shard_slots(self) -> int:
    return len(self.order) // self.num_shards

  def devices(self) -> np.ndarray:
    """[X] the shard (device of the expert axis) of each source slot."""
    return self.position // self.shard_slots

  def remap(self, slot_map) -> np.ndarray:
    """A slot map (any shape) in source slots -> the same map in placed positions."""
    return self.position[np.asarray(slot_map)].astype(np.int32)

  def rows(self, pool_leaf, start: int, stop: int) -> np.ndarray:
    """Positions start..stop-1 of a placed pool leaf, read from the source leaf (zeros for padding)."""
    src = self.order[start:stop]
    out = np.zeros((stop - start, *pool_leaf.shape[1:]), pool_leaf.dtype)
    real = src >= 0
    out[real] = np.asarray(pool_leaf[src[real]])
    return out


def from_devices(devices: np.ndarray, n: int) -> Placement:
  """The placement putting source slot s on shard devices[s], in ascending slot order within a shard."""
  devices = np.asarray(devices)
  per = math.ceil(len(devices) / n) if len(devices) else 1
  order = np.full(n * per, -1, np.int64)
  position = np.zeros(len(devices), np.int32)
  for d in range(n):
    mine = np.flatnonzero(devices == d)
    if len(mine) > per:
      raise ValueError(f"shard {d} got {len(mine)} slots; at most {per}")
    order[d * per : d * per + len(mine)] = mine
    position[mine] = d * per + np.arange(len(mine))
  return Placement(order, position, n)


def round_robin(num_slots: int, n: int) -> Placement:
  return from_devices(np.arange(num_slots) % n, n)


def balanced(loads, n: int, layers=None) -> Placement:
  """Heaviest slot first onto the least-loaded shard that still takes slots (ties: the one with fewer to take).

  With `layers` [X] (each slot's MoE layer), each layer is balanced on its own:
  layers run one after another, so a step waits for each layer's busiest
  shard. A layer's S_l slots are first dealt out as counts, at most
  ceil(S_l / n) per shard, shards with more room left first (every shard
  holds at most Xl slots in all); then its slots go heaviest first.
  """
  loads = np.asarray(loads, np.float64)
  layers = np.zeros(len(loads), np.int64) if layers is None else np.asarray(layers)
  per = math.ceil(len(loads) / n) if len(loads) else 1
  total = np.zeros(n, np.int64)
  devices = np.zeros(len(loads), np.int64)
  for layer in np.unique(layers):
    mine = np.flatnonzero(layers == layer)
    counts, cap = np.zeros(n, np.int64), math.ceil(len(mine) / n)
    while counts.sum() < len(mine):
      for d in sorted(range(n), key=lambda d: (total[d] - per, d)):
        if counts.sum() < len(mine) and counts[d] < min(cap, per - total[d]):
          counts[d] += 1
      cap += 1  # a crowded last layer: relax the spread, never the per-shard size
    heap = [(0.0, int(counts[d]), d) for d in range(n) if counts[d]]
    heapq.heapify(heap)
    for s in mine[np.argsort(-loads[mine], kind="stable")]:
      load, left, d = heapq.heappop(heap)
      devices[s] = d
      if left > 1:
        heapq.heappush(heap, (load + loads[s], left - 1, d))
    total += counts
  return from_devices(devices, n)


def slot_layers(slot_maps: dict, num_slots: int) -> np.ndarray:
  """[X] the MoE layer each slot serves (from the tenants' [L, E] maps; -1: no map reaches it)."""
  layers = np.full(num_slots, -1, np.int64)
  for m in slot_maps.values():
    m = np.asarray(m)
    layers[m.reshape(-1)] = np.repeat(np.arange(m.shape[0]), m.shape[1])
  return layers


def reference_loads(slot_maps: dict, num_slots: int) -> np.ndarray:
  """[X] how many tenants reach each slot: a slot shared by K tenants carries K tenants' routing."""
  loads = np.zeros(num_slots)
  for m in slot_maps.values():
    np.add.at(loads, np.asarray(m).reshape(-1), 1.0)
  return loads


def make(policy: str, num_slots: int, n: int, slot_maps: dict | None = None, loads=None) -> Placement:
  """The placement of `num_slots` over n shards by `policy` (POLICIES)."""
  if policy == "round_robin":
    return round_robin(num_slots, n)
  if policy == "balanced":
    maps = slot_maps or {}
    layers = slot_layers(maps, num_slots) if maps else None
    return balanced(loads if loads is not None else reference_loads(maps, num_slots), n, layers)
  raise ValueError(f"unknown placement {policy!r}; known: {list(POLICIES)}")


def shard_loads(placement: Placement, loads) -> np.ndarray:
  """[n] summed load per shard."""
  return np.bincount(placement.devices(), weights=np.asarray(loads, np.float64), minlength=placement.num_shards)
