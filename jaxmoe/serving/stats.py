"""What an engine reports: the requests it served, in bounded memory, and its weights' counters.

Counters are exact over the engine's life; latency percentiles are over the
most recent `history` requests, so a long-running engine holds a fixed amount.
`weight_counters` reads the tenant switches, device bytes and expert-cache
counters off an engine's weights and KV cache.
"""

from __future__ import annotations

import collections

import numpy as np

from jaxmoe.serving import offload
from jaxmoe.trees import tree_bytes

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

  def summary(self, wall_s: float) -> dict:
    """Counts, tokens/s over `wall_s` and the TTFT and turnaround percentiles (p50, p99)."""
    out = {
      "requests": self.requests,
      "completed": self.completed,
      "errors": self.errors,
      "completion_tokens": self.completion_tokens,
      "wall_s": wall_s,
      "tokens_per_s": self.completion_tokens / wall_s if wall_s > 0 else 0.0,
    }
    out["ttft_p50_s"], out["ttft_p99_s"] = self.percentile("ttft_s", 50), self.percentile("ttft_s", 99)
    out["turnaround_p50_s"] = self.percentile("turnaround_s", 50)
    out["turnaround_p99_s"] = self.percentile("turnaround_s", 99)
    return out


def weight_counters(weights, kv) -> dict:
  """An engine's tenant switches, device bytes of weights and KV, its expert cache's and lazy pool's reads.

  Args:
    weights: the engine's `jaxmoe.serving.weights` object.
    kv: its KV cache (a pytree of device arrays).
  """
  st, lazy = weights.stats, weights.lazy_pool
  out = {
    "switches": st.switches,
    "switch_bytes": st.bytes,
    "switch_s": st.seconds,
    "device_weight_bytes": weights.device_bytes(),
    "kv_bytes": tree_bytes(kv),
    **offload.stats(weights.cache, weights.host_slot_maps),
  }
  if lazy is not None:  # a pool read lazily off disk: how many of its slots this process has read
    out.update(pool_slots_read=len(lazy.slots_read), pool_slots=lazy.num_slots)
    if weights.pool_slots_held is not None:  # on a mesh, its share
      out["pool_slots_held"] = weights.pool_slots_held
  return out
