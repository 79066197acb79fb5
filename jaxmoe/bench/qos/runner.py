"""Runs a QoS profile: every system over the same traces, then the report.

Order of work, one system at a time (so a GPU holds one system's weights):
  build the system from the host store
  warm up: bursts of every admission-group size and prompt-length bucket the
           traces use, so every program is compiled before anything is timed
           (the compile count during each timed run is recorded; it is 0)
  per sweep: capacity runs (a backlog; the best of `capacity_repeats`, since
           on a shared machine other load only ever slows a run down), then
           the open-loop trace at each rate
  free the system's device memory
The single model runs first: its capacity turns each sweep's load factors
into arrival rates (req/s) for every system. Every system then serves the
identical trace at each rate. With `paired_capacity` (CPU profiles) the
single model stays built and its backlog runs alternate with every other
system's, so each throughput ratio compares runs made under the same load
from other processes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from jaxmoe.bench.qos import metrics
from jaxmoe.bench.qos.driver import Record
from jaxmoe.bench.qos.hoststore import HostStore, build_host_store
from jaxmoe.bench.qos.profiles import QosProfile, Sweep
from jaxmoe.bench.qos.systems import SYSTEMS, System, make_system
from jaxmoe.bench.qos.workload import Arrival, burst_trace, make_trace
from jaxmoe.buckets import pow2
from jaxmoe.serving.engine import compilations


@dataclasses.dataclass
class SweepResult:
  rates: list[float] | None = None
  capacity: dict[str, dict] = dataclasses.field(default_factory=dict)
  runs: dict[str, list[dict]] = dataclasses.field(default_factory=dict)
  records: list[tuple[str, float, Record]] = dataclasses.field(default_factory=list)  # (system, rate, record)


def warm_bursts(profile: QosProfile, tenants: list[str]) -> list[list[Arrival]]:
  """Bursts covering each (admission group bucket, prompt bucket) pair the profile's traces can hit.

  A fresh engine's KV cache is not yet committed to the device, so its first
  admission compiles other programs than later ones. So: one burst per tenant
  first (each partition slice's engine admits once), then every burst for one
  tenant (an engine that stays; the first burst again at the end), then every
  burst alternating two tenants, so systems that build an engine per tenant
  switch (full-model swap) start a fresh one per burst.
  """
  serve = profile.serve
  groups = sorted({pow2(n, serve.max_batch) for n in range(1, serve.max_batch + 1)})
  lengths: dict[int, int] = {}
  for s in profile.sweeps:
    p = s.lengths.prompt
    for n in [p.median] if p.sigma == 0 else range(p.lo, p.max + 1):
      b = pow2(n, serve.max_seq_len, floor=8)
      lengths[b] = max(lengths.get(b, 0), n)
  shapes = [(g, n) for n in sorted(lengths.values()) for g in groups]
  order = [(t, shapes[0]) for t in tenants]  # every engine (a partition slice each) admits once
  order += [(tenants[0], s) for s in shapes + shapes[:1]]
  order += [(tenants[(i + 1) % 2 if len(tenants) > 1 else 0], s) for i, s in enumerate(shapes)]

  def burst(j, tenant, g, n):
    return [Arrival(f"warm{j}-{i}", tenant, 0.0, tuple(range(1, n + 1)), 2) for i in range(g)]

  return [burst(j, t, g, n) for j, (t, (g, n)) in enumerate(order)]


def timed_run(system: System, arrivals: list[Arrival]) -> tuple[list[Record], dict]:
  before, compiled = system.counters(), compilations()
  start = time.perf_counter()
  records = system.run(arrivals)
  extra = {"wall_s": time.perf_counter() - start, "compilations": compilations() - compiled}
  extra.update({k: v - before[k] for k, v in system.counters().items()})
  return records, extra


def _capacity(system: System, burst: list[Arrival], repeats: int, reference: System | None) -> dict:
  """Best of `repeats` backlog runs; with a reference (the single model), its runs alternate with them."""
  caps, refs = [], []
  for _ in range(repeats):
    records, extra = timed_run(system, burst)
    caps.append(metrics.capacity(records) | extra)
    if reference is not None:
      refs.append(metrics.capacity(timed_run(reference, burst)[0])["tokens_per_s"])
  cap = max(caps, key=lambda c: c["tokens_per_s"])
  cap |= {"saturation_rps": cap["requests_per_s"], "tokens_per_s_tries": [c["tokens_per_s"] for c in caps]}
  if refs:
    cap |= {"single_tokens_per_s_paired": max(refs), "single_tokens_per_s_paired_tries": refs}
  return cap


def _run_sweep(
  system: System,
  sweep: Sweep,
  result: SweepResult,
  profile: QosProfile,
  host: HostStore,
  reference: System | None,
  log: Callable[[str], None],
) -> None:
  vocab, seed = host.config.vocab_size, profile.seed
  burst = burst_trace(host.tenants, sweep.capacity_requests, sweep.lengths, profile.skew, vocab, seed)
  cap = _capacity(system, burst, profile.capacity_repeats, reference if reference is not system else None)
  result.capacity[system.name] = cap
  log(
    f"  {system.name:9s} {sweep.name:6s} capacity {cap['requests_per_s']:8.2f} req/s "
    f"{cap['tokens_per_s']:9.1f} tok/s (best of {len(cap['tokens_per_s_tries'])})"
  )
  if result.rates is None:
    result.rates = [lf * cap["requests_per_s"] for lf in sweep.load_factors]
  runs = []
  for lf, rate in zip(sweep.load_factors, result.rates):
    trace = make_trace(host.tenants, rate, sweep.requests, sweep.lengths, profile.skew, vocab, seed)
    records, extra = timed_run(system, trace)
    summary = metrics.summarize(records, rate) | extra
    summary.update(load_factor=lf, saturated=rate > cap["requests_per_s"])
    runs.append(summary)
    result.records.extend((system.name, rate, r) for r in records)
    log(
      f"  {system.name:9s} {sweep.name:6s} {rate:8.2f} req/s: turnaround mean "
      f"{1e3 * summary['turnaround_mean_s']:8.1f} ms p99 {1e3 * summary['turnaround_p99_s']:8.1f} ms, "
      f"TTFT mean {1e3 * summary['ttft_mean_s']:7.1f} ms ({extra['wall_s']:.1f} s)"
    )
  result.runs[system.name] = runs


def run_qos(profile: QosProfile, systems: tuple[str, ...] | None = None, log: Callable[[str], None] = print) -> dict:
  """Runs the profile; returns {"host": ..., "sweeps": {name: SweepResult}, "systems": {...}, "headline"}."""
  start = time.perf_counter()
  names = list(systems or profile.systems)
  unknown = sorted(set(names) - set(SYSTEMS))
  if unknown or "single" not in names:
    raise ValueError(
      f"systems must include 'single' (its capacity sets the arrival rates) and come from "
      f"{list(SYSTEMS)}; got unknown {unknown}"
    )
  names.sort(key=lambda n: n != "single")
  log(
    f"{profile.name}: building {profile.store.tenants} tenants ({profile.store.model.num_layers} layers, "
    f"D={profile.store.model.hidden_size}, E={profile.store.model.num_experts})"
  )
  host = build_host_store(profile.store)
  sweeps = {s.name: SweepResult() for s in profile.sweeps}
  system_info, reference = {}, None
  for name in names:
    t0 = time.perf_counter()
    system = make_system(name, host, profile.serve.engine_config(), profile.mig_budget_bytes, profile.timer)
    for burst in warm_bursts(profile, host.tenants):
      system.run(burst)
    warm_s = time.perf_counter() - t0
    log(f"{name}: built and warmed in {warm_s:.1f} s")
    for sweep in profile.sweeps:
      _run_sweep(system, sweep, sweeps[sweep.name], profile, host, reference, log)
    system_info[name] = {"memory": system.memory(), "build_and_warm_s": warm_s, "total_s": time.perf_counter() - t0}
    if name == "single" and profile.paired_capacity:
      reference = system  # kept to alternate with every other system's capacity runs
    else:
      system.close()
  if reference is not None:
    reference.close()
  headline = {n: metrics.headline(r.runs, r.capacity) for n, r in sweeps.items()}
  return {
    "host": host,
    "sweeps": sweeps,
    "systems": system_info,
    "headline": headline,
    "runtime_s": time.perf_counter() - start,
  }


def run_profile(profile, out_dir, command: str, systems=None, log=print) -> dict:
  """Runs a QoS or decode profile and writes its report; returns the JSON document."""
  from jaxmoe.bench.qos import decode_bench, report
  from jaxmoe.bench.qos.profiles import DecodeProfile

  env = report.environment(command)
  if isinstance(profile, DecodeProfile):
    return decode_bench.run(profile, out_dir, env, log)
  if systems:
    systems = tuple(dict.fromkeys(["single", *systems]))
  result = run_qos(profile, systems, log)
  return report.write(out_dir, profile, result, env)


def format_headline(doc: dict) -> str:
  lines = []
  for sweep, h in doc.get("headline", {}).items():
    for mode, red in h["turnaround_reduction_vs_mig"].items():
      per = ", ".join(f"{100 * x:.1f}%" for x in red["per_rate"])
      lines.append(f"{sweep}: {mode} turnaround vs MIG: {per}; average {100 * red['average']:.1f}%")
    ratios = ", ".join(f"{k} {v:.3f}" for k, v in h["throughput_vs_single"].items() if v is not None)
    lines.append(f"{sweep}: capacity tokens/s vs single: {ratios}")
  return "\n".join(lines)
