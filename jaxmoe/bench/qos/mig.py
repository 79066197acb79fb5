"""A MIG-style static partition, emulated on one device: K isolated slices, one per tenant.

What NVIDIA MIG gives K tenants of one card: K isolated instances, each with
1/K of the memory and 1/K of the compute, nothing shared. The emulation, exactly:

Memory. The device budget B (a profile's `mig_budget_bytes`; by default the
bytes of weights the consolidated jaxmoe store keeps on the device: the pool
once plus K backbones) is split evenly: a slice holds B / K bytes of weights.
Its tenant's whole model is its backbone plus L * E experts (nothing shared
across slices). The backbone must fit; then as many experts as fit in the
rest stay on the device ("resident"), and the others ("spilled") live in host
memory (pinned where the device offers it). Spilled experts are spread evenly
over the layers. The KV cache is not counted against B, and every slice gets
the same max_batch as the other systems (generous to the partition).

Fetched when routed. Routing happens inside the jitted model, so the
emulation charges the expected traffic instead of the exact one, assuming
uniform routing: a token picks top_k distinct experts of E uniformly, so an
expert is used by at least one of n tokens of a forward pass with probability
h(n) = 1 - (1 - top_k / E)^n, and a layer with s spilled experts fetches
s * h(n) of them per pass. A slice step has up to two passes: the prefill of
the requests it admits (n = their prompt tokens) and the decode (n = rows
decoding). Each expert fetched is a real, blocking host-to-device copy of its
three weight arrays (`jax.device_put` of the host buffers, then
`block_until_ready`), with no device-side expert cache (each pass fetches
again); the copies are discarded. The number copied per pass is the expected
count, rounded by carrying the fraction to the next pass, so the total equals
the expectation. For the compute itself the slice keeps a full copy of its
model on the device (the emulation's own memory, reported separately as
`emulation_device_bytes`): the outputs are exact, the fetch costs time only.

Compute. A slice with 1/K of the compute runs on a clock with scale K: every
second of wall time its engine step takes (prefill, decode, sampling and the
engine's host work) is charged as K seconds of the slice's virtual time. This
is time slicing with a fixed 1/K share, which MIG's static split is: a slice
never borrows the idle compute of the others. Decode of large MoE models is
bound by memory bandwidth, and a 1/K MIG instance has about 1/K of it, so K
times slower steps is the right scale there; for tiny CPU models whose steps
are dominated by dispatch overhead it is the model of a K times smaller
device, not a measurement of one. The host-to-device fetches are charged at
scale 1 (the copy's wall time): the slices are assumed not to contend for
the host link, which favours the partition.

Slices are independent, so each is driven through its own tenant's arrivals
on its own clock; the scheduler inside a slice is the jaxmoe engine in
resident mode with one tenant (continuous batching, as for every system).
"""

from __future__ import annotations

import dataclasses
import time

import jax

from jaxmoe.bench.qos.driver import EngineLane, LaneClock, Record, Timer, drive
from jaxmoe.bench.qos.hoststore import HostStore, tenant_model_store
from jaxmoe.bench.qos.workload import Arrival
from jaxmoe.devices import default_sharding, free
from jaxmoe.serving import Engine, EngineConfig, Mode
from jaxmoe.trees import tree_bytes


@dataclasses.dataclass
class FetchStats:
  experts: int = 0
  bytes: int = 0
  seconds: float = 0.0


def spill_counts(
  num_layers: int, num_experts: int, slice_bytes: int, backbone_bytes: int, expert_bytes: int
) -> list[int]:
  """Spilled experts per layer for a slice of `slice_bytes` (spread evenly over the layers)."""
  if slice_bytes < backbone_bytes:
    raise ValueError(
      f"a slice of {slice_bytes} bytes cannot hold its tenant's backbone "
      f"({backbone_bytes} bytes): raise the partition's memory budget"
    )
  total = num_layers * num_experts
  resident = min(total, (slice_bytes - backbone_bytes) // expert_bytes)
  spilled = total - resident
  return [spilled // num_layers + int(i < spilled % num_layers) for i in range(num_layers)]


def expected_hits(spilled: list[int], tokens: int, top_k: int, num_experts: int) -> float:
  """Spilled experts a forward pass of `tokens` tokens routes to, under uniform routing."""
  if tokens <= 0:
    return 0.0
  return sum(spilled) * (1.0 - (1.0 - top_k / num_experts) ** tokens)


class Fetcher:
  """Copies the spilled experts a pass would route to from host to device (module docstring)."""

  def __init__(
    self, spilled_arrays: list[tuple], spilled: list[int], top_k: int, num_experts: int, timer=time.perf_counter
  ):
    self.arrays, self.spilled, self.top_k, self.num_experts = spilled_arrays, spilled, top_k, num_experts
    self.timer = timer
    self.stats = FetchStats()
    self._debt = 0.0
    self._next = 0

  def fetch(self, tokens: int) -> None:
    self._debt += expected_hits(self.spilled, tokens, self.top_k, self.num_experts)
    n = int(self._debt)
    self._debt -= n
    if n == 0 or not self.arrays:
      return
    picked = [self.arrays[(self._next + i) % len(self.arrays)] for i in range(n)]
    self._next = (self._next + n) % len(self.arrays)
    t0 = self.timer()
    copies = jax.device_put([list(p) for p in picked], default_sharding(), may_alias=False)
    jax.block_until_ready(copies)
    self.stats.seconds += self.timer() - t0
    self.stats.experts += n
    self.stats.bytes += tree_bytes(copies)
    free(copies)


class SliceLane(EngineLane):
  """One partition slice: fetches spilled experts (clock scale 1), then steps (clock scale K)."""

  def __init__(self, engine: Engine, clock: LaneClock, fetcher: Fetcher):
    super().__init__(engine, clock)
    self.fetcher = fetcher

  def step(self) -> list[Record]:
    prefill, decode = self.feed.engine.next_step_load()
    with self.clock.running(scale=1.0):
      self.fetcher.fetch(prefill)
      self.fetcher.fetch(decode)
    return super().step()


class MigSystem:
  """K isolated slices (module docstring)."""

  name = "mig"

  def __init__(self, host: HostStore, config: EngineConfig, budget_bytes: int, timer: Timer = Timer.WALL):
    cfg, k = host.config, len(host.tenants)
    self.host, self.budget_bytes, self.slice_bytes = host, budget_bytes, budget_bytes // k
    self.spilled = spill_counts(
      cfg.num_layers, cfg.num_experts, self.slice_bytes, host.backbone_bytes, host.expert_bytes
    )
    e_all = cfg.num_experts
    positions = [(i, e) for i, s in enumerate(self.spilled) for e in range(e_all - s, e_all)]
    config = dataclasses.replace(config, mode=Mode.RESIDENT)
    self.params, self.lanes = {}, {}
    for t in host.tenants:
      self.params[t] = host.load_tenant(t)
      engine = Engine(tenant_model_store(self.params[t], cfg, t), config, clock=LaneClock(k, timer.fn))
      fetcher = Fetcher(
        [host.expert_host(t, i, e) for i, e in positions], self.spilled, cfg.top_k, cfg.num_experts, timer.fn
      )
      self.lanes[t] = SliceLane(engine, engine.clock, fetcher)

  def run(self, arrivals: list[Arrival]) -> list[Record]:
    out = []
    for t, lane in self.lanes.items():
      mine = [a for a in arrivals if a.tenant == t]
      if mine:
        out.extend(drive(lane, mine))
    return out

  def counters(self) -> dict:
    stats = [lane.fetcher.stats for lane in self.lanes.values()]
    return {
      "fetch_experts": sum(s.experts for s in stats),
      "fetch_bytes": sum(s.bytes for s in stats),
      "fetch_s": sum(s.seconds for s in stats),
    }

  def memory(self) -> dict:
    k, spilled_bytes = len(self.lanes), sum(self.spilled) * self.host.expert_bytes
    return {
      "device_weight_bytes": k * (self.host.tenant_bytes - spilled_bytes),
      "host_weight_bytes": k * spilled_bytes,
      "emulation_device_bytes": k * self.host.tenant_bytes,
      "kv_bytes": sum(lane.feed.engine.stats()["kv_bytes"] for lane in self.lanes.values()),
      "budget_bytes": self.budget_bytes,
      "spilled_experts_per_slice": sum(self.spilled),
    }

  def close(self) -> None:
    for t, lane in self.lanes.items():
      lane.feed.engine.close()
      free(self.params[t])
    self.lanes, self.params = {}, {}
