"""bench/decode_profile.py's summary of an XLA:CPU trace: op kinds, leaf ops only, per step."""

from __future__ import annotations

import functools
import importlib.util

import pytest

from tests.helpers import REPO


@functools.cache
def _module():  # once per process: the script defines its absl flags on import
  spec = importlib.util.spec_from_file_location("decode_profile", REPO / "bench" / "decode_profile.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_op_times_groups_kinds_and_skips_host_and_control_flow_events():
  def x(name, dur):
    return {"ph": "X", "name": name, "dur": dur}

  events = [
    x("dynamic-slice_bitcast_fusion", 300.0),
    x("dynamic-slice_bitcast_fusion.2", 100.0),
    x("ynn_fusion.1", 200.0),
    x("while.95", 5000.0),  # spans its body's ops
    x("call.10", 50.0),
    x("end: ynn_fusion", 9.0),
    x("ThunkExecutor::Execute", 7000.0),
    x("$profiler.py:271 stop_trace", 9000.0),
    {"ph": "i", "name": "ynn_fusion", "dur": 1000.0},  # not a complete event
  ]
  rows = _module().op_times({"traceEvents": events}, steps=2)
  assert [k for k, _, _ in rows] == ["dynamic-slice_bitcast_fusion", "ynn_fusion"]
  (_, ms, calls), (_, ms2, calls2) = rows
  assert ms == pytest.approx(0.2) and calls == 1.0 and ms2 == pytest.approx(0.1) and calls2 == 0.5
