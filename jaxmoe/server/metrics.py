"""Prometheus metrics: request outcomes and latencies per tenant, the engine's counters, residency.

Every numeric key of `Engine.stats()` is exported as a gauge
`jaxmoe_engine_<key>` (a dict of numbers as one gauge with a `key` label), read
from the engine thread's latest snapshot, so counters the engine gains later
(expert cache, KV pages) appear without a change here.
"""

from __future__ import annotations

import math
import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
STEPS = (0, 1, 2, 4, 8, 16)
UNKNOWN = "unknown"  # the tenant label of requests naming no tenant of this store


def metric_name(key: str) -> str:
  return re.sub(r"[^a-zA-Z0-9_]", "_", str(key)).strip("_") or "value"


def _number(value) -> float | None:
  if isinstance(value, bool):
    return float(value)
  if isinstance(value, (int, float)) and math.isfinite(value):
    return float(value)
  return None


class EngineCollector:
  """Gauges from the engine loop's stats snapshot and the tenants' residency."""

  def __init__(self, loop, tenants):
    self.loop, self.tenants = loop, tenants
    try:
      from jaxmoe.serving.engine import compilations as compiled
    except ImportError:  # the engine may drop this helper; the gauge goes with it
      compiled = None
    self.compiled = compiled

  def collect(self):
    for key, value in dict(self.loop.stats).items():
      name = f"jaxmoe_engine_{metric_name(key)}"
      if isinstance(value, dict):
        family = GaugeMetricFamily(name, f"Engine.stats()[{key!r}]", labels=["key"])
        for sub, v in value.items():
          if _number(v) is not None:
            family.add_metric([str(sub)], _number(v))
        yield family
      elif _number(value) is not None:
        yield GaugeMetricFamily(name, f"Engine.stats()[{key!r}]", value=_number(value))
    yield GaugeMetricFamily(
      "jaxmoe_server_engine_alive", "1 while the engine thread runs", value=float(self.loop.alive)
    )
    yield GaugeMetricFamily(
      "jaxmoe_server_engine_step_failures", "Engine steps that raised", value=float(self.loop.step_failures)
    )
    resident = GaugeMetricFamily(
      "jaxmoe_tenant_resident", "1 if the tenant's backbone is on the device", labels=["model"]
    )
    backbone = GaugeMetricFamily(
      "jaxmoe_device_backbone_bytes", "Bytes of the tenant's backbone on the device", labels=["model"]
    )
    shared = GaugeMetricFamily(
      "jaxmoe_tenant_shared_expert_fraction",
      "Share of the tenant's experts held in common with another tenant",
      labels=["model"],
    )
    on_device = self.tenants.resident()
    for t in self.tenants.names:
      resident.add_metric([t], float(t in on_device))
      backbone.add_metric([t], float(self.tenants.backbone_bytes[t] if t in on_device else 0))
      shared.add_metric([t], self.tenants.shared_fraction[t])
    yield resident
    yield backbone
    yield shared
    yield GaugeMetricFamily(
      "jaxmoe_device_pool_bytes", "Bytes of the shared expert pool", value=self.tenants.pool_bytes
    )
    if self.compiled is not None:  # programs compiled while serving: a steady server compiles nothing
      yield GaugeMetricFamily("jaxmoe_server_compiled_programs", "Serving programs compiled", value=self.compiled())


class Metrics:
  """The server's registry (one per app, so several apps live in one process)."""

  def __init__(self):
    disable_created_metrics()  # process-wide: the *_created series double the text and nothing reads them
    self.registry = r = CollectorRegistry()
    self.requests = Counter(
      "jaxmoe_requests",
      "Requests answered, by tenant, endpoint and outcome",
      ["model", "endpoint", "outcome"],
      registry=r,
    )
    self.errors = Counter("jaxmoe_http_errors", "Error responses, by HTTP status", ["status"], registry=r)
    self.prompt_tokens = Counter("jaxmoe_prompt_tokens", "Prompt tokens of served requests", ["model"], registry=r)
    self.generated = Counter("jaxmoe_generated_tokens", "Tokens generated (streamed or not)", ["model"], registry=r)
    self.ttft = Histogram(
      "jaxmoe_time_to_first_token_seconds", "Arrival to first token", ["model"], buckets=LATENCY, registry=r
    )
    self.tpot = Histogram(
      "jaxmoe_time_per_output_token_seconds", "Per token after the first", ["model"], buckets=PER_TOKEN, registry=r
    )
    self.turnaround = Histogram(
      "jaxmoe_request_turnaround_seconds", "Arrival to last token", ["model"], buckets=LATENCY, registry=r
    )
    self.queue = Histogram(
      "jaxmoe_request_queue_seconds", "Arrival to admission into a batch row", ["model"], buckets=LATENCY, registry=r
    )
    self.cancel_steps = Histogram(
      "jaxmoe_cancel_decode_steps",
      "Decode steps the engine ran between a client disconnect and the row being freed",
      buckets=STEPS,
      registry=r,
    )
    self.waiting = Gauge("jaxmoe_server_waiting_requests", "Accepted requests without a first token", registry=r)
    self.inflight = Gauge("jaxmoe_server_inflight_requests", "Requests the server is answering", registry=r)

  def attach(self, loop, tenants) -> None:
    self.registry.register(EngineCollector(loop, tenants))

  def served(self, endpoint: str, response: dict) -> None:
    """Counts a finished engine response and observes its latencies."""
    model = response["model"]
    self.requests.labels(model, endpoint, response["finish_reason"]).inc()
    if response["error"] is not None:
      return
    t, u = response["timings"], response["usage"]
    self.prompt_tokens.labels(model).inc(u["prompt_tokens"])
    self.ttft.labels(model).observe(t["ttft_s"])
    self.turnaround.labels(model).observe(t["turnaround_s"])
    self.queue.labels(model).observe(t["queue_s"])
    if u["completion_tokens"] > 1:
      self.tpot.labels(model).observe(t["tpot_s"])
