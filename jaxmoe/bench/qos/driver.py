"""The open-loop driver: arrivals enter when their time comes, whether or not the server keeps up.

Discrete-event over a real clock. Each serving lane (one engine, or one
static-partition slice) has a `LaneClock` in virtual seconds from the start of
the trace. The clock runs with the real clock (`time.perf_counter`) only while
the lane works; the driver loop is:

  submit every arrival whose time <= lane clock
  if the lane has work: run one lane step (one engine step), clock running
  else: jump the clock to the next arrival (idle gaps are fast-forwarded)

So a run at a low rate does not sleep, nothing outside the lane's own steps
(other systems, the driver's bookkeeping) is charged to it, and latency is
what the lane's steps cost. A request that arrives during a step is submitted
after it; its timings are measured from its arrival time, not from the
hand-over (the engine measures from its `submit`; `Feed` adds the lateness).

What "real time" means is the lane's `Timer`: wall time (`time.perf_counter`),
which is the only choice on an accelerator, whose work does not show in the
host's CPU time; or this process's CPU time (`time.process_time`), for CPU
profiles with XLA's CPU backend single-threaded: on an idle machine the two
agree, and on a shared one CPU time does not count what other processes take,
so reruns agree (wall-clock runs on a busy 2-core machine varied by 2x).

A clock with `scale` s charges s seconds per real second of work: a static
partition slice with 1/K of the compute runs on a clock with scale K
(`mig.py`). Work charged at another scale (host-to-device copies) passes it to
`running`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import time
from collections.abc import Callable
from typing import Protocol

from jaxmoe.bench.qos.workload import Arrival


class Timer(enum.Enum):
  WALL = "wall"
  PROCESS_CPU = "process_cpu"

  @property
  def fn(self) -> Callable[[], float]:
    return time.perf_counter if self is Timer.WALL else time.process_time


class LaneClock:
  """Virtual seconds of one lane: real time while it works (times `scale`), jumps over idle gaps."""

  def __init__(self, scale: float = 1.0, timer: Callable[[], float] = time.perf_counter):
    self.scale, self.timer = scale, timer
    self.base = 0.0
    self._anchor: float | None = None
    self._scale = scale

  def __call__(self) -> float:
    if self._anchor is None:
      return self.base
    return self.base + self._scale * (self.timer() - self._anchor)

  @contextlib.contextmanager
  def running(self, scale: float | None = None):
    """Lets the clock run with the real clock during the block (no nesting)."""
    if self._anchor is not None:
      raise RuntimeError("LaneClock.running does not nest")
    self._scale = self.scale if scale is None else scale
    self._anchor = self.timer()
    try:
      yield
    finally:
      self.base = self()
      self._anchor = None

  def skip_to(self, t: float) -> None:
    self.base = max(self.base, t)

  def reset(self) -> None:
    self.base, self._anchor = 0.0, None


@dataclasses.dataclass(frozen=True)
class Record:
  """One answered request; times in seconds from its arrival (virtual lane time)."""

  id: str
  tenant: str
  arrival: float
  queue_s: float
  ttft_s: float
  tpot_s: float
  turnaround_s: float
  prompt_tokens: int
  completion_tokens: int

  @property
  def finish(self) -> float:
    return self.arrival + self.turnaround_s


class Feed:
  """One engine fed with arrivals; its responses become Records timed from the arrival."""

  def __init__(self, engine, clock: LaneClock, model: str | None = None):
    self.engine, self.clock, self.model = engine, clock, model
    self._handed: dict[str, tuple[Arrival, float]] = {}

  @property
  def in_flight(self) -> int:
    return len(self._handed)

  def hand(self, a: Arrival) -> None:
    self._handed[a.id] = (a, self.clock())
    self.engine.submit(a.request(self.model))

  def step(self) -> list[Record]:
    return [self._record(r) for r in self.engine.step()]

  def _record(self, r: dict) -> Record:
    if r["error"] is not None:
      raise RuntimeError(f"benchmark request {r['id']} failed: {r['error']['message']}")
    a, handed = self._handed.pop(r["id"])
    late, t = handed - a.time, r["timings"]
    return Record(
      a.id,
      a.tenant,
      a.time,
      t["queue_s"] + late,
      t["ttft_s"] + late,
      t["tpot_s"],
      t["turnaround_s"] + late,
      r["usage"]["prompt_tokens"],
      r["usage"]["completion_tokens"],
    )


class Lane(Protocol):
  clock: LaneClock

  @property
  def has_work(self) -> bool: ...

  def submit(self, a: Arrival) -> None: ...

  def step(self) -> list[Record]: ...


class EngineLane:
  """A lane that hands every arrival to its engine at once (the engine schedules)."""

  def __init__(self, engine, clock: LaneClock, model: str | None = None):
    self.clock, self.feed = clock, Feed(engine, clock, model)

  @property
  def has_work(self) -> bool:
    return self.feed.engine.has_work

  def submit(self, a: Arrival) -> None:
    self.feed.hand(a)

  def step(self) -> list[Record]:
    with self.clock.running():
      return self.feed.step()


def drive(lane: Lane, arrivals: list[Arrival]) -> list[Record]:
  """Runs `arrivals` open loop through `lane` from virtual time 0 until every request is answered."""
  pending = collections.deque(sorted(arrivals, key=lambda a: a.time))
  lane.clock.reset()
  out: list[Record] = []
  while pending or lane.has_work:
    now = lane.clock()
    while pending and pending[0].time <= now:
      lane.submit(pending.popleft())
    if lane.has_work:
      out.extend(lane.step())
    elif pending:
      lane.clock.skip_to(pending[0].time)
  if len(out) != len(arrivals):
    raise RuntimeError(f"{len(arrivals)} requests in, {len(out)} answered")
  return out
