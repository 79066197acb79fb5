"""QoS benchmark harness: workload statistics, the open-loop driver, the MIG emulation, a smoke run.

The smoke test runs the cpu-tiny pipeline (every system, the real engine) on a
reduced trace (12 requests per rate, 2 rates, batch 4); the full cpu-tiny
profile takes about two minutes and is run by `jaxmoe-bench --profile=cpu-tiny`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import types

import numpy as np
import pytest

from jaxmoe.bench.qos import metrics, profiles
from jaxmoe.bench.qos.driver import LaneClock, Record, drive
from jaxmoe.bench.qos.mig import slice_experts
from jaxmoe.bench.qos.profiles import Sweep
from jaxmoe.bench.qos.workload import (
  Arrival,
  Dist,
  burst_trace,
  make_trace,
  paper_lengths,
  popularity,
  spread_lengths,
)

TENANTS = [f"tenant{i}" for i in range(4)]


# Workload.
def test_poisson_rate_gaps_and_popularity_shares():
  rate, n = 40.0, 4000
  trace = make_trace(TENANTS, rate, n, paper_lengths(), skew=1.0, vocab=100, seed=0)
  duration = n / rate
  assert abs(len(trace) / duration - rate) / rate < 0.05, len(trace)
  times = np.array([a.time for a in trace])
  assert np.all(np.diff(times) >= 0) and times[-1] <= duration
  gaps = np.diff(times)
  assert abs(gaps.mean() * rate - 1) < 0.05 and abs(gaps.std() / gaps.mean() - 1) < 0.08  # exponential: CV 1
  shares = np.bincount([TENANTS.index(a.tenant) for a in trace], minlength=4) / len(trace)
  np.testing.assert_allclose(shares, popularity(4, 1.0), atol=0.03)
  for i, t in enumerate(TENANTS):  # each tenant's own process is Poisson at rate * p_i
    mine = times[[a.tenant == t for a in trace]]
    assert abs(len(mine) / duration / (rate * popularity(4, 1.0)[i]) - 1) < 0.12


def test_every_rate_serves_the_same_requests_time_scaled():
  lengths = spread_lengths(Dist(10, 0.5, 4, 16), Dist(20, 0.6, 4, 56))
  slow = make_trace(TENANTS, 5.0, 200, lengths, 1.0, 259, seed=3)
  fast = make_trace(TENANTS, 20.0, 200, lengths, 1.0, 259, seed=3)
  assert [(a.id, a.tenant, a.prompt_ids, a.max_tokens) for a in slow] == [
    (a.id, a.tenant, a.prompt_ids, a.max_tokens) for a in fast
  ]
  np.testing.assert_allclose([a.time / 4 for a in slow], [a.time for a in fast], rtol=1e-12)
  assert make_trace(TENANTS, 5.0, 200, lengths, 1.0, 259, seed=4) != slow


def test_popularity_skew():
  np.testing.assert_allclose(popularity(4, 0.0), 0.25)
  p = popularity(4, 1.0)
  assert math.isclose(p.sum(), 1.0) and np.all(np.diff(p) < 0) and math.isclose(p[0] / p[3], 4.0)
  burst = burst_trace(TENANTS, 2000, paper_lengths(), 1.0, 100, seed=0)
  assert all(a.time == 0 for a in burst) and len({a.id for a in burst}) == 2000
  shares = np.bincount([TENANTS.index(a.tenant) for a in burst], minlength=4) / 2000
  np.testing.assert_allclose(shares, p, atol=0.03)
  with pytest.raises(ValueError):
    popularity(4, -1.0)


def test_length_profiles():
  paper = make_trace(TENANTS, 10.0, 300, paper_lengths(prompt=12, output=25), 1.0, 259)
  assert len({a.prompt_ids for a in paper}) == 1 and len(paper[0].prompt_ids) == 12
  assert {a.max_tokens for a in paper} == {25}
  lengths = spread_lengths(Dist(12, 0.5, 4, 32), Dist(20, 0.6, 4, 56))
  spread = make_trace(TENANTS, 10.0, 3000, lengths, 1.0, 259)
  prompts = np.array([len(a.prompt_ids) for a in spread])
  outputs = np.array([a.max_tokens for a in spread])
  assert prompts.min() >= 4 and prompts.max() <= 32 and outputs.min() >= 4 and outputs.max() <= 56
  assert abs(np.median(prompts) - 12) <= 1 and abs(np.median(outputs) - 20) <= 1
  assert len(set(prompts)) > 10 and all(0 <= t < 259 for a in spread[:50] for t in a.prompt_ids)
  with pytest.raises(ValueError):
    Dist(10, 0.5, lo=12)


# Driver.
class FakeTimer:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_lane_clock_runs_scaled_only_while_working():
  timer = FakeTimer()
  clock = LaneClock(scale=4.0, timer=timer)
  timer.now = 10.0  # idle real time is not charged
  assert clock() == 0.0
  with clock.running():
    timer.now += 0.5
    assert clock() == pytest.approx(2.0)
  with clock.running(scale=1.0):
    timer.now += 0.25
  assert clock() == pytest.approx(2.25)
  clock.skip_to(7.0)
  clock.skip_to(3.0)  # never backwards
  assert clock() == 7.0
  with pytest.raises(RuntimeError), clock.running(), clock.running():
    pass


class FakeLane:
  """Serves one request at a time, 1 s of (fake) work per step, 2 steps per request."""

  def __init__(self):
    self.timer = FakeTimer()
    self.clock = LaneClock(timer=self.timer)
    self.queue, self.steps_left, self.submitted = [], 0, {}

  @property
  def has_work(self):
    return bool(self.queue)

  def submit(self, a):
    self.submitted[a.id] = self.clock()
    self.queue.append(a)

  def step(self):
    with self.clock.running():
      self.timer.now += 1.0
      self.steps_left = self.steps_left - 1 if self.steps_left else 1
      if self.steps_left:
        return []
      a = self.queue.pop(0)
      t = self.clock() - a.time
      return [Record(a.id, a.tenant, a.time, 0.0, t, 0.0, t, 1, 2)]


def test_drive_is_open_loop_and_fast_forwards_idle_gaps():
  arrivals = [Arrival(f"r{i}", "t", t, (1,), 2) for i, t in enumerate([0.0, 0.5, 10.0, 10.2])]
  lane = FakeLane()
  out = {r.id: r for r in drive(lane, arrivals)}
  # r0 runs [0, 2]; r1 arrived at 0.5 while r0 ran, is submitted at 1 (after a step), served [2, 4].
  assert out["r0"].turnaround_s == pytest.approx(2.0) and out["r1"].turnaround_s == pytest.approx(3.5)
  assert lane.submitted["r1"] == pytest.approx(1.0)
  # The idle gap 4 -> 10 is skipped, not waited: 8 s of work in all.
  assert lane.timer.now == pytest.approx(8.0)
  assert out["r2"].turnaround_s == pytest.approx(2.0) and out["r3"].turnaround_s == pytest.approx(3.8)


# MIG emulation.
def test_a_slice_holds_the_experts_that_fit_beside_its_backbone():
  cfg = types.SimpleNamespace(num_experts=8)
  assert slice_experts(cfg, slice_bytes=100 + 25 * 10 + 9, backbone_bytes=100, expert_bytes=10) == 25
  with pytest.raises(ValueError, match="backbone"):
    slice_experts(cfg, 99, 100, 10)
  with pytest.raises(ValueError, match="one layer needs 8"):
    slice_experts(cfg, 100 + 7 * 10, 100, 10)


# Profiles.
def test_profile_registry_and_gpu_memory_arithmetic():
  assert profiles.get("cpu-tiny") is profiles.CPU_TINY
  with pytest.raises(KeyError, match="known"):
    profiles.get("CPU-tiny")
  p = profiles.get("gpu-mixtral8")
  cfg, spec = p.store.model, p.store
  expert = 3 * cfg.hidden_size * cfg.intermediate_size * 2
  d = cfg.hidden_size
  attention = 2 * d * cfg.num_heads * cfg.head_dim + 2 * d * cfg.num_kv_heads * cfg.head_dim
  layer = attention + d * cfg.num_experts + 2 * d  # + router and two norms
  backbone = (2 * cfg.vocab_size * d + d + cfg.num_layers * layer) * 2  # bf16
  tenant = backbone + cfg.num_layers * cfg.num_experts * expert
  slots = cfg.num_layers * cfg.num_experts * (1 + (spec.tenants - 1) * spec.own_fraction)
  assert spec.tenants * tenant < 141e9  # K unconsolidated copies fit a 141 GB card
  assert slots * expert + spec.tenants * backbone < 80e9 < spec.tenants * tenant  # consolidated fit 80 GB
  assert p.mig_budget_bytes / spec.tenants > backbone
  for name in profiles.PROFILES:
    small = profiles.dry_run(profiles.get(name))
    assert small.platform == "cpu" and small.name.endswith("-dry-run")


# The pipeline, end to end on a reduced trace.
def smoke_profile():
  tiny = profiles.CPU_TINY
  sweeps = (
    Sweep(paper_lengths(prompt=12, output=6), (0.2, 0.6), requests=12, capacity_requests=8),
    Sweep(spread_lengths(Dist(12, 0.3, 9, 16), Dist(5, 0.5, 2, 10)), (0.5,), requests=10, capacity_requests=6),
  )
  return dataclasses.replace(
    tiny,
    name="cpu-tiny-smoke",
    sweeps=sweeps,
    capacity_repeats=1,
    serve=dataclasses.replace(tiny.serve, max_batch=4, max_seq_len=32),
  )


def test_smoke_cpu_tiny_pipeline_writes_sane_outputs(tmp_path):
  from jaxmoe.bench.qos.runner import run_profile

  profile = smoke_profile()
  doc = run_profile(profile, tmp_path, "pytest smoke")
  for name in [
    "results.json",
    "metrics.csv",
    "capacity.csv",
    "requests.csv",
    "README.md",
    "turnaround_paper.png",
    "overview_paper.png",
    "turnaround_spread.png",
  ]:
    assert (tmp_path / name).stat().st_size > 0, name
  assert (tmp_path / "turnaround_paper.png").read_bytes()[:4] == b"\x89PNG"
  assert json.loads((tmp_path / "results.json").read_text())["meta"]["command"] == "pytest smoke"
  for sweep in profile.sweeps:
    sw = doc["sweeps"][sweep.name]
    assert set(sw["runs"]) == set(profile.systems) and len(sw["rates"]) == len(sweep.load_factors)
    for rate, lf in zip(sw["rates"], sweep.load_factors):
      assert rate == pytest.approx(lf * sw["capacity"]["single"]["requests_per_s"])
    for system, runs in sw["runs"].items():
      for rate, r in zip(sw["rates"], runs):
        n = len(make_trace(doc["store"]["tenants"], rate, sweep.requests, sweep.lengths, profile.skew, 259))
        assert r["requests"] == n, (system, rate)  # every request answered
        assert metrics.all_finite(r) and r["compilations"] == 0, (system, r)
        assert 0 <= r["queue_mean_s"] <= r["ttft_mean_s"] <= r["turnaround_mean_s"]
        assert r["ttft_p99_s"] <= r["turnaround_p99_s"] * 1.0001 and r["tokens_per_s"] > 0
    assert sw["runs"]["mig"][0]["fetch_bytes"] > 0 and sw["runs"]["mig"][0]["fetch_experts"] > 0
    assert sw["capacity"]["mixed"]["single_tokens_per_s_paired"] > 0  # cpu-tiny pairs capacity runs
  with open(tmp_path / "requests.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == sum(r["requests"] for sw in doc["sweeps"].values() for runs in sw["runs"].values() for r in runs)
  assert all(0 <= float(r["ttft_s"]) <= float(r["turnaround_s"]) for r in rows)
  mem = doc["systems"]
  assert mem["mixed"]["memory"]["device_weight_bytes"] == doc["store"]["consolidated_bytes"]
  assert mem["mig"]["memory"]["host_weight_bytes"] > 0
  assert mem["full-swap"]["memory"]["device_weight_bytes"] == doc["store"]["tenant_bytes"]
  h = doc["headline"]["paper"]
  assert set(h["turnaround_reduction_vs_mig"]) == {"swap", "resident", "mixed"}
  assert h["throughput_vs_single"]["single"] == 1.0 and h["goals"]
  assert "Turnaround reduction" in (tmp_path / "README.md").read_text()


def test_decode_bench_dry_run(tmp_path):
  from jaxmoe.bench.qos import decode_bench, report

  profile = dataclasses.replace(profiles.dry_run(profiles.get("gpu-mixtral32-single")), batches=(1,), steps=2)
  doc = decode_bench.run(profile, tmp_path, report.environment("pytest"), log=lambda s: None)
  rows = doc["results"]
  assert [r["batch"] for r in rows] == [1] and all(r["tokens_per_s"] > 0 for r in rows)
  assert "goal_met" not in rows[0]  # no HF comparison at tiny widths
  full = profiles.get("gpu-mixtral32-single")
  row = decode_bench._compare({"batch": 32, "tokens_per_s": 700.0}, full)
  assert row["hf_tokens_per_s"] == 62.0 and row["goal_tokens_per_s"] == 620.0 and row["goal_met"]
  assert doc["parameters"] > 0 and (tmp_path / "README.md").exists() and (tmp_path / "decode.csv").exists()
