"""Which tenant runs next when batches hold one tenant (swap and resident modes, full-model swap)."""

from __future__ import annotations

from collections.abc import Iterable


def starving(waiting: Iterable[tuple[str, float]], current: str | None, now: float, max_wait_s: float) -> str | None:
  """The tenant, other than `current`, of the longest-waiting request if it has waited past max_wait_s.

  `waiting` is (tenant, arrival time) in arrival order; only the oldest request
  of another tenant counts, so a switch goes to whoever has waited longest.
  """
  for tenant, arrival in waiting:
    if tenant != current:
      return tenant if now - arrival > max_wait_s else None
  return None
