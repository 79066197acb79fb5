"""The engine's expert-offloading settings: the device cache's size, pinned tenants, the stats it reports.

The cache itself (jaxmoe/serving/experts.py) knows pool slots only; this is
where EngineConfig.expert_cache_gb and pinned_tenants meet a store.
"""

from __future__ import annotations

import numpy as np

from jaxmoe.families import registry
from jaxmoe.serving.experts import ExpertCache, min_slots
from jaxmoe.serving.weights import Mode
from jaxmoe.trees import abstract, tree_bytes


def cache_budget(config, store, mesh=None) -> tuple[int | None, int]:
  """(cache slots per device for config.expert_cache_gb or None for the whole pool, slots one layer may need
  at once).

  Refuses a budget below one layer's worst case, with the minimum in the message. On a mesh with a `model`
  axis a device holds 1 / n of each cached expert (its features), so the same bytes hold n times as many.
  """
  cfg = store.config
  unknown = [t for t in config.pinned_tenants if t not in store.tenants]
  if unknown:
    raise ValueError(f"pinned_tenants: {unknown} are not tenants of this store ({store.tenants})")
  tenants = len(store.tenants) if config.mode is Mode.MIXED else 1
  need = min_slots([store.slot_maps[t] for t in store.tenants], cfg.num_experts, config.max_batch, tenants)
  gb = config.expert_cache_gb
  if gb is None:
    return None, need
  if not gb > 0:
    raise ValueError(f"expert_cache_gb={gb} must be > 0")
  expert = tree_bytes(abstract(registry.of(cfg).layout.expert_shapes(cfg, 1), cfg.dtype))
  if mesh is not None:
    expert /= mesh.mesh.shape.get("model", 1)
  slots = int(gb * 1e9 / expert + 1e-6)  # a budget given as n experts of bytes / 1e9 holds n
  if slots < need and (mesh is None or mesh.expert_shards == 1):  # over expert shards: `check_shards`
    raise ValueError(
      f"expert_cache_gb={gb:g} holds {slots} experts of {expert / 1e6:.3g} MB; one layer's worst case "
      f"needs {need} (up to {cfg.num_experts} per tenant of a batch): at least expert_cache_gb="
      f"{need * expert / 1e9:.4g}"
    )
  return slots, need


def shard_need(cache: ExpertCache, store, need: int) -> int:
  """Cache slots one expert shard may need for one layer: `need` at most, and never more than the layer's
  distinct slots the placement put on that shard (one device: `need`)."""
  if cache.shards == 1:
    return need
  worst = 0
  for layer in range(np.shape(store.slot_maps[store.tenants[0]])[0]):
    slots = np.unique(np.concatenate([cache.placed(np.asarray(store.slot_maps[t])[layer]) for t in store.tenants]))
    worst = max(worst, int(np.bincount(cache.shard_of[slots], minlength=cache.shards).max()))
  return min(need, worst)


def check_shards(cache: ExpertCache, store, need: int, gb: float) -> None:
  """Refuses a cache whose per-shard block cannot hold one layer's worst case on that shard."""
  per = shard_need(cache, store, need)
  if cache.per_shard < per:
    raise ValueError(
      f"expert_cache_gb={gb:g} holds {cache.per_shard} experts per device; one layer may need {per} on one "
      f"expert shard: at least expert_cache_gb={gb * per / cache.per_shard:.4g}"
    )


def pin(cache: ExpertCache, store, tenants, need: int) -> None:
  """Pins every expert of `tenants`, leaving room on every shard for one layer's `need` of the others."""
  names = list(tenants)
  try:
    cache.pin(cache.placed(np.concatenate([np.ravel(store.slot_maps[t]) for t in names])))
  except ValueError as e:
    raise ValueError(f"pinned_tenants {names}: {e}; raise expert_cache_gb or pin fewer") from None
  per = shard_need(cache, store, need)
  if cache.min_unpinned() < per:
    where = " on one expert shard" if cache.shards > 1 else ""
    raise ValueError(
      f"pinned_tenants {names} hold {cache.pinned_count} of the cache's {cache.capacity} experts; one layer "
      f"may need {per} more{where}: raise expert_cache_gb or pin fewer"
    )


def stats(cache: ExpertCache | None, slot_maps: dict) -> dict:
  """The cache's counters as Engine.stats() and summary() keys (none without a cache)."""
  if cache is None:
    return {}
  st = cache.stats
  return {
    "expert_cache_slots": cache.capacity,
    "expert_pool_slots": cache.host.num_slots,
    "expert_cache_hits": st.hits,
    "expert_cache_misses": st.misses,
    "expert_cache_bytes": st.bytes,
    "expert_cache_prefetch_bytes": st.prefetch_bytes,
    "expert_cache_s": st.seconds,
    "expert_cache_prefetched": st.prefetched,
    "expert_cache_occupancy": cache.occupancy(slot_maps),
  }
