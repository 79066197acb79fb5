"""Where a CPU decode step's time goes: XLA's own per-op trace of bench/decode.py's step, summed by op kind.

  python bench/decode_profile.py [--batch=8] [--tenants=1] [--steps=32] [--top=12]

The step of bench/decode.py (its D=256, L=4 model, rows at actual length 64,
max_seq_len 256) is timed untraced, then traced with XLA:CPU's per-thunk trace
events on (`--xla_cpu_enable_xprof_traceme`, set before jax loads; tracing
slows the step a little). Control-flow ops (`while`, `call`, `conditional`)
are left out: their events span their bodies' ops, which are counted. Ops are
grouped by name with XLA's numeric suffix dropped
(`dynamic-slice_bitcast_fusion.2` -> `dynamic-slice_bitcast_fusion`) and
printed as milliseconds and calls per step, largest first. In the routed MoE
loop, `dynamic-slice_bitcast_fusion` is the copy of one routed slot's weight
out of the pool before its matmul (`ynn_fusion`): XLA:CPU copies a
dynamically indexed operand of a dot instead of reading it in place.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import pathlib
import re
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 8, "Rows in the step.")
flags.DEFINE_integer("tenants", 1, "Tenants in the batch (1: one model; more: a mixed batch).")
flags.DEFINE_integer("steps", 32, "Steps timed and traced.")
flags.DEFINE_integer("top", 12, "Op kinds printed.")

_HOST_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "PjitFunction", "PjRt", "Execute", "$", "end: ")
_CONTROL_FLOW = {"while", "call", "conditional"}


def op_times(trace: dict, steps: int) -> list[tuple[str, float, float]]:
  """(op kind, ms per step, calls per step) of the XLA ops in a perfetto trace, largest first."""
  total, calls = collections.Counter(), collections.Counter()
  for e in trace["traceEvents"]:
    name = e.get("name", "")
    kind = re.sub(r"\.\d+$", "", name)
    if e.get("ph") != "X" or name.startswith(_HOST_EVENTS) or "::" in name or kind in _CONTROL_FLOW:
      continue
    total[kind] += e.get("dur", 0)
    calls[kind] += 1
  return [(k, us / 1e3 / steps, calls[k] / steps) for k, us in total.most_common()]


def main(argv):
  del argv
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_enable_xprof_traceme=true".strip()
  import jax
  from decode import StepBench, bench_config, median_time  # bench/decode.py, beside this script

  from jaxmoe.serving.synthetic import synthetic_store

  store = synthetic_store(bench_config(), 4, seed=0, own_fraction=0.25)
  bench = StepBench(store, list(store.tenants[: FLAGS.tenants]), FLAGS.batch, 256)
  bench.run(2)
  step_ms = 1e3 * median_time(lambda: bench.run(FLAGS.steps), 1) / FLAGS.steps
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    bench.run(FLAGS.steps)
    jax.profiler.stop_trace()
    (path,) = pathlib.Path(tmp).rglob("*.trace.json.gz")
    rows = op_times(json.loads(gzip.decompress(path.read_bytes())), FLAGS.steps)
  ops_ms = sum(ms for _, ms, _ in rows)
  print(f"K={FLAGS.tenants} B={FLAGS.batch}: step {step_ms:.2f} ms untraced; XLA ops {ops_ms:.2f} ms per traced step")
  for kind, ms, n in rows[: FLAGS.top]:
    print(f"  {ms:7.3f} ms  {100 * ms / ops_ms:5.1f}%  {n:6.1f} calls/step  {kind}")


if __name__ == "__main__":
  app.run(main)
