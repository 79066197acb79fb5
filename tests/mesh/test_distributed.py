"""Step plans (what process 0 broadcasts) and the mesh flags, without several processes or devices."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe.families.mixtral import config
from jaxmoe.nn import paged
from jaxmoe.nn.sampling import SamplingParams
from jaxmoe.serving import Engine, EngineConfig, distributed
from jaxmoe.serving.synthetic import synthetic_store


@pytest.mark.parametrize("cross", [False, True])
def test_a_plan_round_trips_rows_without_pickle(cross):
  sp = SamplingParams.full(4, seed=3, temperature=0.5)
  rows = paged.Rows(
    np.arange(8, dtype=np.int32).reshape(4, 2),
    np.array([1, 2, 3, 4], np.int32),
    np.array([True, False, True, True]),
    sp,
    np.ones((4, 3), np.int32) if cross else None,
    np.full(4, 5, np.int32) if cross else None,
  )
  plan = {"op": np.array("decode"), "tokens": np.array([7, 8, 9, 10], np.int32), **distributed._flat_rows(rows)}
  back = distributed._unpack(distributed._pack(plan))
  assert str(back["op"]) == "decode" and back["tokens"].tolist() == [7, 8, 9, 10]
  got = distributed._rows(back)
  for a, b in zip(*(sorted(paged_leaves(r).items()) for r in (got, rows))):
    assert a[0] == b[0] and np.array_equal(a[1], b[1]) and a[1].dtype == b[1].dtype, a[0]
  assert (got.cross_tables is None) == (not cross)


def paged_leaves(rows) -> dict:
  return {k: np.asarray(v) for k, v in distributed._flat_rows(rows).items()}


def test_initialize_without_a_coordinator_is_one_process(monkeypatch):
  for var in ("JAXMOE_COORDINATOR", "JAXMOE_NUM_PROCESSES", "JAXMOE_PROCESS_ID"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.initialize() is False
  assert distributed.is_leader()


def test_a_mesh_larger_than_the_devices_is_a_clear_error():
  store = synthetic_store(config.preset("tiny"), k=2, seed=0)
  with pytest.raises(ValueError, match="needs 64 devices"):
    Engine(store, EngineConfig(mesh="data:8,expert:8"))
  with pytest.raises(ValueError, match="unknown mesh axis"):
    Engine(store, EngineConfig(mesh="pipeline:2"))
