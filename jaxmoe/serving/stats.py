"""What an engine reports about the requests it served, in bounded memory.

Counters are exact over the engine's life; latency percentiles are over the
most recent `history` requests, so a long-running engine holds a fixed amount.
"""

from __future__ import annotations

import collections

import numpy as np

TIMINGS = ("queue_s", "ttft_s", "tpot_s", "turnaround_s")


class ServedStats:
  def __init__(self, history: int = 10_000):
    self.requests = self.completed = self.errors = self.completion_tokens = 0
    self.recent = {k: collections.deque(maxlen=history) for k in TIMINGS}

  def add(self, response: dict) -> None:
    self.requests += 1
    if response["error"] is not None:
      self.errors += 1
      return
    self.completed += 1
    self.completion_tokens += response["usage"]["completion_tokens"]
    for k in TIMINGS:
      value = response["timings"][k]
      if value is not None:
        self.recent[k].append(value)

  def percentile(self, key: str, q: float) -> float | None:
    values = self.recent[key]
    return float(np.percentile(np.fromiter(values, float), q)) if values else None
