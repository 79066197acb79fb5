"""Slot placement over expert shards and the mesh table (host only: no devices needed)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe.nn import sharding
from jaxmoe.serving import placement


def test_parse_mesh_keeps_the_spec_order_and_rejects_bad_specs():
  assert sharding.parse_mesh("expert:4,data:2") == (("expert", 4), ("data", 2))
  assert sharding.parse_mesh("data:2, expert:4") == (("data", 2), ("expert", 4))
  assert sharding.parse_mesh("") == () and sharding.parse_mesh(None) == ()
  for bad in ("data", "data:0", "data:x", "pipe:2", "data:2,data:2"):
    with pytest.raises(ValueError):
      sharding.parse_mesh(bad)


@pytest.mark.parametrize("num_slots,n", [(16, 4), (13, 4), (8, 8), (5, 1)])
def test_round_robin_is_a_renumbering_with_padding(num_slots, n):
  p = placement.round_robin(num_slots, n)
  per = -(-num_slots // n)
  assert len(p.order) == n * per and p.shard_slots == per
  assert sorted(p.order[p.order >= 0].tolist()) == list(range(num_slots))
  assert np.array_equal(p.order[p.position], np.arange(num_slots))  # position is order's inverse
  assert np.array_equal(p.devices(), np.arange(num_slots) % n)
  pool = np.arange(num_slots * 3, dtype=np.float32).reshape(num_slots, 3)
  placed = p.rows(pool, 0, len(p.order))
  maps = np.random.default_rng(0).integers(0, num_slots, (2, 4))
  assert np.array_equal(placed[p.remap(maps)], pool[maps])  # every map reaches the same weights
  assert not placed[p.order < 0].any()


def test_balanced_evens_out_skewed_loads_within_capacity():
  loads = np.array([8, 1, 1, 1, 7, 1, 1, 1, 6, 1, 1, 1, 5, 1, 1, 1], float)
  rr, bal = placement.round_robin(16, 4), placement.balanced(loads, 4)
  assert np.bincount(bal.devices(), minlength=4).max() <= 4
  assert placement.shard_loads(bal, loads).max() < placement.shard_loads(rr, loads).max()
  assert placement.shard_loads(bal, loads).tolist() == [11, 10, 9, 8]  # each heavy slot with three light ones


def test_reference_loads_count_tenants_per_slot():
  maps = {"a": np.array([[0, 1], [2, 3]]), "b": np.array([[0, 4], [2, 5]])}
  assert placement.reference_loads(maps, 6).tolist() == [2, 1, 2, 1, 1, 1]
  p = placement.make("balanced", 6, 2, maps)
  assert placement.shard_loads(p, placement.reference_loads(maps, 6)).tolist() == [4, 4]


def test_balanced_spreads_each_layer_and_its_load():
  # Two layers of 8 slots; in each, the first four are reached by three tenants.
  loads = np.array([3, 3, 3, 3, 1, 1, 1, 1] * 2, float)
  layers = np.repeat([0, 1], 8)
  p = placement.balanced(loads, 4, layers)
  for layer in (0, 1):
    mine = layers == layer
    assert np.bincount(p.devices()[mine], minlength=4).tolist() == [2, 2, 2, 2]
    assert np.bincount(p.devices()[mine], weights=loads[mine], minlength=4).tolist() == [4, 4, 4, 4]
  maps = {"a": np.array([[0, 1], [2, 3]]), "b": np.array([[0, 4], [2, 5]])}
  assert placement.slot_layers(maps, 7).tolist() == [0, 0, 1, 1, 0, 1, -1]
