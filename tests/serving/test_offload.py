"""Expert offloading: an engine whose device holds only part of the pool serves exactly what the
all-on-device engine serves, in every mode, for both families, at any budget it accepts."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from jaxmoe.families.mixtral import config as mixtral_config
from jaxmoe.families.switch import config as switch_config
from jaxmoe.nn import moe_ops
from jaxmoe.serving import Engine, EngineConfig, Mode
from jaxmoe.serving.experts import ArrayPool, ExpertCache, min_slots
from jaxmoe.serving.synthetic import synthetic_store

MAX_SEQ, BATCH = 32, 4
CONFIGS = {"mixtral": mixtral_config.preset("tiny"), "switch": switch_config.preset("tiny-switch")}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def store(request):
  return synthetic_store(CONFIGS[request.param], k=3, seed=1, own_fraction=0.5, noise=0.05)


def workload(store, n: int = 6):
  rng = np.random.default_rng(5)
  return [
    {
      "id": f"r{i}",
      "model": store.tenants[i % len(store.tenants)],
      "prompt_ids": rng.integers(0, 250, int(rng.integers(5, 9))).tolist(),  # one prompt bucket: few compiles
      "max_tokens": int(rng.integers(1, 7)),
      **({"temperature": 0.8, "top_p": 0.9, "seed": i} if i % 2 else {}),
    }
    for i in range(n)
  ]


def expert_bytes(store) -> int:
  return ArrayPool(store.pool).expert_bytes


def serve(store, mode: Mode, slots: int | None = None):
  gb = None if slots is None else slots * expert_bytes(store) / 1e9
  engine = Engine(store, EngineConfig(max_seq_len=MAX_SEQ, page_size=4, max_batch=BATCH, mode=mode, expert_cache_gb=gb))
  for r in workload(store):
    engine.submit(r)
  out = {o["id"]: (o["token_ids"], o["error"]) for o in engine.run_until_done()}
  return out, engine


def minimum(store, mode: Mode) -> int:
  tenants = len(store.tenants) if mode is Mode.MIXED else 1
  return min_slots(store.slot_maps.values(), store.config.num_experts, BATCH, tenants)


@pytest.mark.parametrize("mode", list(Mode))
def test_a_cache_smaller_than_the_pool_serves_the_same_tokens(store, mode):
  want, _ = serve(store, mode)
  assert all(err is None for _, err in want.values())
  pool = moe_ops.num_slots(store.pool)
  budgets = {minimum(store, mode), pool - 1} if mode is Mode.MIXED else {minimum(store, mode)}
  for slots in sorted(budgets):
    got, engine = serve(store, mode, slots)
    assert got == want, f"{mode.value}, {slots} of {pool} slots"
    assert engine.weights.expert_bytes() == slots * expert_bytes(store)  # the device holds only the cache
    stats = engine.summary()
    assert stats["expert_cache_slots"] == slots
    assert stats["expert_cache_misses"] > 0 or slots == pool - 1  # the cache starts full of the popular slots
    assert stats["expert_cache_bytes"] == stats["expert_cache_misses"] * expert_bytes(store)
    assert stats["expert_cache_prefetch_bytes"] == stats["expert_cache_prefetched"] * expert_bytes(store)
    engine.close()


def test_a_budget_below_one_layer_is_refused_with_the_minimum(store):
  need = minimum(store, Mode.MIXED)
  gb = (need - 1) * expert_bytes(store) / 1e9
  with pytest.raises(ValueError, match=r"one layer's worst case needs \d+ .*at least expert_cache_gb="):
    Engine(store, EngineConfig(max_seq_len=MAX_SEQ, page_size=4, max_batch=BATCH, mode=Mode.MIXED, expert_cache_gb=gb))


def test_pinned_tenant_stays_resident(store):
  pinned = store.tenants[0]
  slots = len(np.unique(store.slot_maps[pinned])) + minimum(store, Mode.SWAP)
  assert slots < moe_ops.num_slots(store.pool)
  gb = slots * expert_bytes(store) / 1e9
  cfg = EngineConfig(
    max_seq_len=MAX_SEQ, page_size=4, max_batch=BATCH, mode=Mode.SWAP, expert_cache_gb=gb, pinned_tenants=(pinned,)
  )
  engine = Engine(store, cfg)
  for r in workload(store):
    engine.submit(r)
  engine.run_until_done()
  occupancy = engine.summary()["expert_cache_occupancy"]
  assert occupancy[pinned] == 1.0 and min(occupancy.values()) < 1.0
  with pytest.raises(ValueError, match="pin fewer|cannot pin"):  # no room left for the other tenants' layer
    Engine(store, dataclasses.replace(cfg, pinned_tenants=tuple(store.tenants[:2])))
  with pytest.raises(ValueError, match="not tenants of this store"):
    Engine(store, dataclasses.replace(cfg, pinned_tenants=("nobody",)))


def test_eviction_keeps_the_frequently_used_expert():
  pool = {"w": np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 2, 2), np.float32)}
  cache = ExpertCache(ArrayPool(pool), capacity=3)
  for _ in range(5):
    cache.ensure([0])
  cache.ensure([1])
  cache.ensure([2])
  cache.ensure([3])  # evicts 1 (used once, longest ago), not 0 (used five times)
  assert cache.cache_of[0] >= 0 and cache.cache_of[1] < 0
  assert cache.stats.misses == 4 and cache.stats.hits == 4
  held = np.asarray(cache.buffers["w"])[cache.cache_of[[0, 2, 3]]]
  np.testing.assert_array_equal(held[:, 0, 0], [0, 2, 3])


def test_prefetch_brings_back_a_hot_expert_and_spares_the_running_layer():
  pool = {"w": np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 2, 2), np.float32)}
  cache = ExpertCache(ArrayPool(pool), capacity=3)
  for _ in range(3):
    cache.ensure([0], layer=1)  # layer 1 routes to slot 0, often
  cache.ensure([3, 4, 5], layer=0)  # a wide layer 0 evicts it
  assert cache.cache_of[0] < 0
  cache.ensure([3], layer=0)  # layer 0 now running on slot 3
  cache.prefetch(1)
  assert cache.cache_of[3] >= 0 and cache.cache_of[0] >= 0 and cache.stats.prefetched == 1
  misses = cache.stats.misses
  cache.ensure([0], layer=1)
  assert cache.stats.misses == misses  # the prefetch made it a hit
  held = np.asarray(cache.buffers["w"])[cache.cache_of[[0, 3]]]
  np.testing.assert_array_equal(held[:, 0, 0], [0, 3])
  assert cache.stats.bytes == cache.stats.misses * cache.host.expert_bytes
  assert cache.stats.prefetch_bytes == cache.stats.prefetched * cache.host.expert_bytes
  cache.prefetch(0)  # layer 0 last routed to slot 3, resident: nothing to copy
  assert cache.stats.prefetched == 1


def test_pinning_what_is_already_resident_copies_nothing_twice():
  pool = {"w": np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 2, 2), np.float32)}
  cache = ExpertCache(ArrayPool(pool), capacity=4)
  cache.fill([5, 4, 3])
  cache.pin([4, 3, 0])
  held = sorted(int(s) for s in cache.slot_in if s >= 0)
  assert held == [0, 3, 4, 5] and cache.stats.misses == 1
  np.testing.assert_array_equal(np.asarray(cache.buffers["w"])[cache.cache_of[[0, 3, 4, 5]], 0, 0], [0, 3, 4, 5])
