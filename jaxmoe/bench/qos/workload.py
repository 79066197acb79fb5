"""Open-loop workloads: per-tenant Poisson arrivals, skewed popularity, length profiles.

A trace at total rate R req/s over K tenants gives tenant i (popularity rank
i, tenant 0 the most popular) its own Poisson process of rate R * p_i, with
Zipf popularity p_i proportional to 1 / (i + 1)^skew (skew 0: uniform).

Rate scaling keeps the requests fixed: tenant i's arrivals are the points of a
unit-rate Poisson process on [0, n * p_i] (drawn from a stream seeded by
(seed, i)), divided by R * p_i. The trace lasts n / R seconds and holds about
n requests. So, for one seed, every rate of a sweep serves exactly the same
requests (ids, tenants, prompts, output lengths) at time-scaled arrival times:
across a sweep only the load changes.

Lengths: the paper's profile is one fixed short prompt and 25 output tokens
for every request; a spread profile draws prompt and output lengths from
clipped log-normals. Output lengths are enforced by `max_tokens` with the
model's EOS disabled (the benchmark configs set eos_token_id=None).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Dist:
  """Token counts: log-normal around `median` (sigma 0: always `median`), clipped to [lo, hi]."""

  median: int
  sigma: float = 0.0
  lo: int = 1
  hi: int | None = None

  def __post_init__(self):
    if not 1 <= self.lo <= self.median or (self.hi is not None and self.hi < self.median):
      raise ValueError(f"need 1 <= lo <= median <= hi, got {self}")

  @property
  def max(self) -> int:
    return self.median if self.sigma == 0 else (self.hi if self.hi is not None else 8 * self.median)

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    if self.sigma == 0:
      return np.full(n, self.median, np.int64)
    x = np.rint(self.median * np.exp(self.sigma * rng.standard_normal(n))).astype(np.int64)
    return np.clip(x, self.lo, self.max)


@dataclasses.dataclass(frozen=True)
class LengthProfile:
  """How long prompts and outputs are; `same_prompt`: every request sends one fixed prompt."""

  name: str
  prompt: Dist
  output: Dist
  same_prompt: bool = False

  @property
  def max_total(self) -> int:
    return self.prompt.max + self.output.max


def paper_lengths(prompt: int = 12, output: int = 25) -> LengthProfile:
  """The paper's evaluation: one fixed short prompt, `output` tokens per request."""
  return LengthProfile("paper", Dist(prompt), Dist(output), same_prompt=True)


def spread_lengths(prompt: Dist, output: Dist) -> LengthProfile:
  return LengthProfile("spread", prompt, output)


@dataclasses.dataclass(frozen=True)
class Arrival:
  """One request of a trace: who sends it, when (seconds from the trace start), what."""

  id: str
  tenant: str
  time: float
  prompt_ids: tuple[int, ...]
  max_tokens: int

  def request(self, model: str | None = None) -> dict:
    """The engine request (OpenAI field names); `model` overrides the tenant (single-model system)."""
    return {
      "id": self.id,
      "model": model or self.tenant,
      "prompt_ids": list(self.prompt_ids),
      "max_tokens": self.max_tokens,
    }


def popularity(k: int, skew: float) -> np.ndarray:
  """[K] Zipf shares p_i proportional to 1 / (i + 1)^skew, summing to 1."""
  if k < 1 or skew < 0:
    raise ValueError(f"need k >= 1 and skew >= 0, got {k=}, {skew=}")
  w = 1.0 / np.arange(1, k + 1, dtype=np.float64) ** skew
  return w / w.sum()


def _unit_poisson(rng: np.random.Generator, horizon: float) -> np.ndarray:
  """Event times of a unit-rate Poisson process on [0, horizon]."""
  times, t = [], 0.0
  while True:
    t += rng.exponential()
    if t > horizon:
      return np.asarray(times)
    times.append(t)


def _tenant_requests(i: int, tenant: str, n_events: int, lengths: LengthProfile, vocab: int, seed: int):
  """(prompt_ids, max_tokens) for tenant i's first n_events requests; independent of the rate."""
  rng = np.random.default_rng([seed, 1, i])
  prompts = lengths.prompt.sample(rng, n_events)
  outputs = lengths.output.sample(rng, n_events)
  fixed = tuple(int(x) for x in np.random.default_rng([seed, 2]).integers(0, vocab, lengths.prompt.median))
  for j in range(n_events):
    ids = fixed if lengths.same_prompt else tuple(int(x) for x in rng.integers(0, vocab, prompts[j]))
    yield f"{tenant}-{j}", ids, int(outputs[j])


def make_trace(
  tenants: list[str], rate: float, n_requests: int, lengths: LengthProfile, skew: float, vocab: int, seed: int = 0
) -> list[Arrival]:
  """Open-loop trace at `rate` req/s in total, about `n_requests` long, sorted by arrival time."""
  if rate <= 0 or n_requests < 1:
    raise ValueError(f"need rate > 0 and n_requests >= 1, got {rate=}, {n_requests=}")
  shares = popularity(len(tenants), skew)
  out = []
  for i, tenant in enumerate(tenants):
    unit = _unit_poisson(np.random.default_rng([seed, 0, i]), n_requests * shares[i])
    times = unit / (rate * shares[i])
    for t, (rid, ids, out_len) in zip(times, _tenant_requests(i, tenant, len(unit), lengths, vocab, seed)):
      out.append(Arrival(rid, tenant, float(t), ids, out_len))
  return sorted(out, key=lambda a: (a.time, a.id))


def trace_duration(rate: float, n_requests: int) -> float:
  return n_requests / rate


def burst_trace(
  tenants: list[str], n_requests: int, lengths: LengthProfile, skew: float, vocab: int, seed: int = 0
) -> list[Arrival]:
  """`n_requests` all arriving at time 0, tenants drawn by popularity: a backlog that measures capacity."""
  shares = popularity(len(tenants), skew)
  picks = np.random.default_rng([seed, 3]).choice(len(tenants), size=n_requests, p=shares)
  counts = np.bincount(picks, minlength=len(tenants))
  gens = [_tenant_requests(i, t, int(counts[i]), lengths, vocab, seed + 7919) for i, t in enumerate(tenants)]
  out = []
  for i in picks:
    rid, ids, out_len = next(gens[i])
    out.append(Arrival(f"burst-{rid}", tenants[i], 0.0, ids, out_len))
  return out
