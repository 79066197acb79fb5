"""A MIG-style static partition, emulated on one device: K isolated slices, one per tenant.

What NVIDIA MIG gives K tenants of one card: K isolated instances, each with
1/K of the memory and 1/K of the compute, nothing shared. The emulation, exactly:

Memory. The device budget B (a profile's `mig_budget_bytes`; by default the
bytes of weights the consolidated jaxmoe store keeps on the device: the pool
once plus K backbones) is split evenly: a slice holds B / K bytes of weights.
Its tenant's whole model is its backbone plus L * E experts (nothing shared
across slices). The backbone must fit; the rest of the slice is its engine's
device expert cache (EngineConfig.expert_cache_gb, jaxmoe/serving/experts.py):
the experts that do not fit stay in host memory and are copied in when routed,
exactly as jaxmoe offloads (the same cache, eviction and prefetch; the real
routing decides what is copied). A slice too small for one layer's E experts
gets room for E (an engine cannot run a layer with fewer): more than its
share, in the partition's favour; `memory()` reports it. The KV cache is not counted against B, and every
slice gets the same max_batch as the other systems (generous to the partition).

Compute. A slice with 1/K of the compute runs on a clock with scale K: every
second of wall time its engine step takes (prefill, decode, sampling and the
engine's host work) is charged as K seconds of the slice's virtual time. This
is time slicing with a fixed 1/K share, which MIG's static split is: a slice
never borrows the idle compute of the others. Decode of large MoE models is
bound by memory bandwidth, and a 1/K MIG instance has about 1/K of it, so K
times slower steps is the right scale there; for tiny CPU models whose steps
are dominated by dispatch overhead it is the model of a K times smaller
device, not a measurement of one. Expert copies happen inside the
engine's step and are charged at scale K with it: a MIG slice also owns only
its share of the card's copy engines.

Slices are independent, so each is driven through its own tenant's arrivals
on its own clock; the scheduler inside a slice is the jaxmoe engine in
resident mode with one tenant (continuous batching, as for every system).
"""

from __future__ import annotations

import dataclasses

from jaxmoe.bench.qos.driver import EngineLane, LaneClock, Record, Timer, drive
from jaxmoe.bench.qos.hoststore import HostStore, host_tenant, tenant_model_store
from jaxmoe.bench.qos.workload import Arrival
from jaxmoe.devices import free
from jaxmoe.serving import Engine, EngineConfig, Mode


def slice_experts(cfg, slice_bytes: int, backbone_bytes: int, expert_bytes: int) -> int:
  """Experts a slice of `slice_bytes` holds on its device beside its tenant's backbone; at least one layer's E
  (an engine cannot run a layer with fewer), which gives a too small slice more memory than its share."""
  if slice_bytes < backbone_bytes:
    raise ValueError(
      f"a slice of {slice_bytes} bytes cannot hold its tenant's backbone "
      f"({backbone_bytes} bytes): raise the partition's memory budget"
    )
  return int(max(cfg.num_experts, (slice_bytes - backbone_bytes) // expert_bytes))


class MigSystem:
  """K isolated slices (module docstring)."""

  name = "mig"

  def __init__(self, host: HostStore, config: EngineConfig, budget_bytes: int, timer: Timer = Timer.WALL):
    cfg, k = host.config, len(host.tenants)
    self.host, self.budget_bytes, self.slice_bytes = host, budget_bytes, budget_bytes // k
    self.cache_slots = slice_experts(cfg, self.slice_bytes, host.backbone_bytes, host.expert_bytes)
    whole = cfg.num_layers * cfg.num_experts
    cache_gb = None if self.cache_slots >= whole else self.cache_slots * host.expert_bytes / 1e9
    config = dataclasses.replace(config, mode=Mode.RESIDENT, expert_cache_gb=cache_gb)
    self.params, self.lanes = {}, {}
    for t in host.tenants:
      self.params[t] = host.load_tenant(t) if cache_gb is None else host_tenant(host, t)
      engine = Engine(tenant_model_store(self.params[t], cfg, t), config, clock=LaneClock(k, timer.fn))
      self.lanes[t] = EngineLane(engine, engine.clock)

  def run(self, arrivals: list[Arrival]) -> list[Record]:
    out = []
    for t, lane in self.lanes.items():
      mine = [a for a in arrivals if a.tenant == t]
      if mine:
        out.extend(drive(lane, mine))
    return out

  def counters(self) -> dict:
    stats = [lane.feed.engine.stats() for lane in self.lanes.values()]
    return {
      "fetch_experts": sum(s.get("expert_cache_misses", 0) + s.get("expert_cache_prefetched", 0) for s in stats),
      "fetch_bytes": sum(s.get("expert_cache_bytes", 0) + s.get("expert_cache_prefetch_bytes", 0) for s in stats),
      "fetch_s": sum(s.get("expert_cache_s", 0.0) for s in stats),
    }

  def memory(self) -> dict:
    cfg, k = self.host.config, len(self.lanes)
    on_device = min(self.cache_slots, cfg.num_layers * cfg.num_experts)
    spilled = cfg.num_layers * cfg.num_experts - on_device
    return {
      "device_weight_bytes": sum(lane.feed.engine.stats()["device_weight_bytes"] for lane in self.lanes.values()),
      "host_weight_bytes": k * spilled * self.host.expert_bytes,
      "kv_bytes": sum(lane.feed.engine.stats()["kv_bytes"] for lane in self.lanes.values()),
      "budget_bytes": self.budget_bytes,
      "spilled_experts_per_slice": spilled,
      "slice_experts": self.cache_slots,
      "slice_raised_to_one_layer": self.slice_bytes - self.host.backbone_bytes
      < self.cache_slots * self.host.expert_bytes,
    }

  def close(self) -> None:
    for t, lane in self.lanes.items():
      lane.feed.engine.close()
      free(self.params[t])
    self.lanes, self.params = {}, {}
