"""The systems compared on one trace, each built from the same host store.

  single      one tenant's whole model serves all traffic (every request is
              answered by tenant 0's model): the upper bound for one device
  swap        jaxmoe, consolidated pool + one backbone on the device; a tenant
  resident    switch copies the next backbone in / every backbone resident /
  mixed       batches mix tenants (`jaxmoe.serving.weights`)
  mig         K isolated slices with 1/K of the memory and compute (`mig.py`)
  full-swap   one whole tenant model (backbone and all L * E of its experts) on
              the device at a time; a tenant switch frees it and copies the
              next whole model in from host memory (a real, timed copy)

Every system serves through `jaxmoe.serving.Engine` (continuous batching, the
same max_batch, the same bucketed shapes), so they differ only in where the
weights live and how tenants share the device. Full-model swap schedules
tenants like the engine's swap mode, at whole-model granularity: it keeps
serving the loaded tenant while others wait at most max_wait_s, then stops
admitting, drains, and loads the tenant of the longest-waiting request.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from jaxmoe.bench.qos.driver import EngineLane, Feed, LaneClock, Record, Timer, drive
from jaxmoe.bench.qos.hoststore import HostStore, tenant_model_store
from jaxmoe.bench.qos.mig import MigSystem
from jaxmoe.bench.qos.workload import Arrival
from jaxmoe.devices import free
from jaxmoe.serving import Engine, EngineConfig, Mode
from jaxmoe.serving.scheduler import next_tenant
from jaxmoe.serving.weights import SwitchStats
from jaxmoe.trees import tree_bytes

SYSTEMS = ("single", "swap", "resident", "mixed", "mig", "full-swap")


class System(Protocol):
  name: str

  def run(self, arrivals: list[Arrival]) -> list[Record]: ...

  def counters(self) -> dict: ...

  def memory(self) -> dict: ...

  def close(self) -> None: ...


class JaxmoeSystem:
  """The jaxmoe engine over the consolidated store in one mode."""

  def __init__(self, host: HostStore, config: EngineConfig, timer: Timer = Timer.WALL):
    self.name, self.clock = config.mode.value, LaneClock(timer=timer.fn)
    self.engine = Engine(host.device_store(), config, clock=self.clock)

  def run(self, arrivals: list[Arrival]) -> list[Record]:
    return drive(EngineLane(self.engine, self.clock), arrivals)

  def counters(self) -> dict:
    s = self.engine.stats()
    return {k: s[k] for k in ("switches", "switch_bytes", "switch_s")}

  def memory(self) -> dict:
    s = self.engine.stats()
    return {k: s[k] for k in ("device_weight_bytes", "kv_bytes")}

  def close(self) -> None:
    self.engine.close()


class SingleSystem:
  """Tenant 0's whole model answers every request, whichever tenant sent it."""

  name = "single"

  def __init__(self, host: HostStore, config: EngineConfig, timer: Timer = Timer.WALL):
    self.tenant, self.clock = host.tenants[0], LaneClock(timer=timer.fn)
    self.params = host.load_tenant(self.tenant)
    self.engine = Engine(
      tenant_model_store(self.params, host.config, self.tenant),
      dataclasses.replace(config, mode=Mode.RESIDENT),
      clock=self.clock,
    )

  def run(self, arrivals: list[Arrival]) -> list[Record]:
    return drive(EngineLane(self.engine, self.clock, model=self.tenant), arrivals)

  def counters(self) -> dict:
    return {"switches": 0, "switch_bytes": 0, "switch_s": 0.0}

  def memory(self) -> dict:
    return {"device_weight_bytes": tree_bytes(self.params), "kv_bytes": self.engine.stats()["kv_bytes"]}

  def close(self) -> None:
    self.engine.close()
    free(self.params)


class FullSwapLane:
  """Holds arrivals itself and hands the loaded tenant's to a one-model engine (module docstring)."""

  def __init__(self, host: HostStore, config: EngineConfig, clock: LaneClock):
    self.host, self.config, self.clock = host, dataclasses.replace(config, mode=Mode.RESIDENT), clock
    self.queue: list[Arrival] = []
    self.tenant: str | None = None
    self.params = None
    self.feed: Feed | None = None
    self.stats = SwitchStats()

  @property
  def has_work(self) -> bool:
    return bool(self.queue) or self._busy

  @property
  def _busy(self) -> bool:
    return self.feed is not None and self.feed.engine.has_work

  def submit(self, a: Arrival) -> None:
    self.queue.append(a)

  def step(self) -> list[Record]:
    with self.clock.running():
      busy, waiting = self._busy, [(a.tenant, a.time) for a in self.queue]
      running = self.tenant if busy else None
      target, drain = next_tenant(waiting, running, self.tenant, self.clock(), self.config.max_wait_s)
      if not busy and target is not None and target != self.tenant:
        self._switch(target)
      if drain is None:  # a busy batch keeps its tenant until another starves, then drains
        self._hand()
      return self.feed.step()

  def _hand(self) -> None:
    room = self.config.max_batch - self.feed.in_flight
    chosen = [a for a in self.queue if a.tenant == self.tenant][: max(room, 0)]
    for a in chosen:
      self.queue.remove(a)
      self.feed.hand(a)

  def _switch(self, tenant: str) -> None:
    start = self.clock.timer()
    self.close()  # one whole model on the device at a time
    self.params = self.host.load_tenant(tenant)
    engine = Engine(tenant_model_store(self.params, self.host.config, tenant), self.config, clock=self.clock)
    self.feed = Feed(engine, self.clock)
    self.stats.switches += int(self.tenant is not None)
    self.stats.bytes += self.host.tenant_bytes
    self.stats.seconds += self.clock.timer() - start
    self.tenant = tenant

  def close(self) -> None:
    if self.feed is not None:
      self.feed.engine.close()
      free(self.params)
      self.feed, self.params = None, None


class FullSwapSystem:
  name = "full-swap"

  def __init__(self, host: HostStore, config: EngineConfig, timer: Timer = Timer.WALL):
    self.host, self.clock = host, LaneClock(timer=timer.fn)
    self.lane = FullSwapLane(host, config, self.clock)

  def run(self, arrivals: list[Arrival]) -> list[Record]:
    return drive(self.lane, arrivals)

  def counters(self) -> dict:
    s = self.lane.stats
    return {"switches": s.switches, "switch_bytes": s.bytes, "switch_s": s.seconds}

  def memory(self) -> dict:
    kv = self.lane.feed.engine.stats()["kv_bytes"] if self.lane.feed is not None else 0
    return {"device_weight_bytes": self.host.tenant_bytes, "kv_bytes": kv}

  def close(self) -> None:
    self.lane.close()


def make_system(
  name: str, host: HostStore, config: EngineConfig, mig_budget_bytes: int | None, timer: Timer = Timer.WALL
) -> System:
  """Builds the named system (exact names: SYSTEMS); the MIG budget defaults to the jaxmoe store's bytes."""
  if name == "single":
    return SingleSystem(host, config, timer)
  if name in ("swap", "resident", "mixed"):
    return JaxmoeSystem(host, dataclasses.replace(config, mode=Mode(name)), timer)
  if name == "mig":
    return MigSystem(host, config, mig_budget_bytes or host.consolidated_bytes, timer)
  if name == "full-swap":
    return FullSwapSystem(host, config, timer)
  raise KeyError(f"unknown system {name!r}; known: {list(SYSTEMS)}")
