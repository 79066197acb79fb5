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


def cache_budget(config, store) -> tuple[int | None, int]:
  """(cache slots for config.expert_cache_gb or None for the whole pool, slots one layer may need at once).

  Refuses a budget below one layer's worst case, with the minimum in the message.
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
  slots = int(gb * 1e9 / expert + 1e-6)  # a budget given as n experts of bytes / 1e9 holds n
  if slots < need:
    raise ValueError(
      f"expert_cache_gb={gb:g} holds {slots} experts of {expert / 1e6:.3g} MB; one layer's worst case "
      f"needs {need} (up to {cfg.num_experts} per tenant of a batch): at least expert_cache_gb="
      f"{need * expert / 1e9:.4g}"
    )
  return slots, need


def pin(cache: ExpertCache, store, tenants, need: int) -> None:
  """Pins every expert of `tenants`, leaving room for one layer's `need` of the others."""
  names = list(tenants)
  try:
    cache.pin(np.concatenate([np.ravel(store.slot_maps[t]) for t in names]))
  except ValueError as e:
    raise ValueError(f"pinned_tenants {names}: {e}; raise expert_cache_gb or pin fewer") from None
  if cache.capacity - cache.pinned_count < need:
    raise ValueError(
      f"pinned_tenants {names} hold {cache.pinned_count} of the cache's {cache.capacity} experts; one layer "
      f"may need {need} more: raise expert_cache_gb or pin fewer"
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
