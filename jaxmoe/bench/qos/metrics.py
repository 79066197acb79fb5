"""From answered requests to the benchmark's figures.

Per run (system x rate): TTFT, time per output token, queueing and turnaround
(mean, p50, p90, p99), throughput over the run (requests/s and tokens/s from
the first arrival to the last answer).

Capacity (per system): a backlog of requests all arriving at time 0; requests
and tokens per second to the last answer. This is the system's saturation
rate for that tenant mix: above it, arrivals outpace service and queues grow
without bound (a run whose offered rate exceeds it is marked `saturated`).
For the static partition the backlog ends when its busiest slice is done, so
the figure is min over slices of (slice capacity / tenant share).

Headline (per sweep): for each jaxmoe mode, the reduction of turnaround
against the MIG-style partition, 1 - T_mode / T_mig, per rate (mean
turnaround at that rate) and over the sweep (the mean over rates of each
system's mean turnaround: "average turnaround over the rate sweep"); the
throughput of every system relative to the single model (capacity tokens/s;
against the single model's runs alternated with that system's when the
profile pairs them);
mean TTFT relative to the single model per rate.
"""

from __future__ import annotations

import math

import numpy as np

from jaxmoe.bench.qos.driver import Record

TIMINGS = ("turnaround", "ttft", "tpot", "queue")
JAXMOE_MODES = ("swap", "resident", "mixed")
GOAL_REDUCTION, AIM_REDUCTION, GOAL_THROUGHPUT = 0.85, 0.95, 0.95


def _stats(values: list[float], name: str) -> dict:
  v = np.asarray(values, np.float64)
  return {
    f"{name}_mean_s": float(v.mean()),
    f"{name}_p50_s": float(np.percentile(v, 50)),
    f"{name}_p90_s": float(np.percentile(v, 90)),
    f"{name}_p99_s": float(np.percentile(v, 99)),
  }


def summarize(records: list[Record], offered_rps: float) -> dict:
  """Latency percentiles and throughput of one run."""
  if not records:
    raise ValueError("no answered requests to summarize")
  out = {
    "requests": len(records),
    "completion_tokens": sum(r.completion_tokens for r in records),
    "offered_rps": offered_rps,
  }
  for name in TIMINGS:
    out.update(_stats([getattr(r, f"{name}_s") for r in records], name))
  first, last = min(r.arrival for r in records), max(r.finish for r in records)
  span = max(last - first, 1e-9)
  out.update(
    span_s=span,
    requests_per_s=len(records) / span,
    tokens_per_s=out["completion_tokens"] / span,
    drain_s=last - max(r.arrival for r in records),
  )
  return out


def capacity(records: list[Record]) -> dict:
  """Throughput of a backlog run (every arrival at time 0)."""
  makespan = max(r.finish for r in records)
  tokens = sum(r.completion_tokens for r in records)
  return {
    "requests": len(records),
    "completion_tokens": tokens,
    "makespan_s": makespan,
    "requests_per_s": len(records) / makespan,
    "tokens_per_s": tokens / makespan,
    "turnaround_mean_s": float(np.mean([r.turnaround_s for r in records])),
  }


def _ratio(a: float, b: float) -> float | None:
  return a / b if b and math.isfinite(a) and math.isfinite(b) else None


def headline(runs: dict[str, list[dict]], capacities: dict[str, dict]) -> dict:
  """The sweep's comparisons (module docstring); systems missing from the run are left out."""
  out: dict = {"turnaround_reduction_vs_mig": {}, "throughput_vs_single": {}, "ttft_vs_single": {}}
  mig = runs.get("mig")
  for mode in JAXMOE_MODES:
    if mig is None or mode not in runs:
      continue
    t_mode = [r["turnaround_mean_s"] for r in runs[mode]]
    t_mig = [r["turnaround_mean_s"] for r in mig]
    per_rate = [1.0 - a / b for a, b in zip(t_mode, t_mig)]
    out["turnaround_reduction_vs_mig"][mode] = {
      "per_rate": per_rate,
      "average": 1.0 - float(np.mean(t_mode)) / float(np.mean(t_mig)),
      "mean_of_per_rate": float(np.mean(per_rate)),
    }
  single_cap = capacities.get("single")
  for name, cap in capacities.items():
    if single_cap is not None:
      ref = cap.get("single_tokens_per_s_paired", single_cap["tokens_per_s"])
      out["throughput_vs_single"][name] = _ratio(cap["tokens_per_s"], ref)
  if "single" in runs:
    ref = runs["single"]
    for name, rs in runs.items():
      out["ttft_vs_single"][name] = [_ratio(r["ttft_mean_s"], s["ttft_mean_s"]) for r, s in zip(rs, ref)]
  out["goals"] = goals(out)
  return out


def goals(h: dict) -> dict:
  red = {m: v["average"] for m, v in h["turnaround_reduction_vs_mig"].items()}
  mixed = h["throughput_vs_single"].get("mixed")
  out = {f"turnaround_reduction_{m}_ge_{GOAL_REDUCTION}": r >= GOAL_REDUCTION for m, r in red.items()}
  out.update({f"turnaround_reduction_{m}_ge_{AIM_REDUCTION}": r >= AIM_REDUCTION for m, r in red.items()})
  if mixed is not None:
    out[f"mixed_throughput_ge_{GOAL_THROUGHPUT}x_single"] = mixed >= GOAL_THROUGHPUT
  return out


def all_finite(summary: dict) -> bool:
  return all(math.isfinite(v) for v in summary.values() if isinstance(v, float))
