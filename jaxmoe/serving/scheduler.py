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


def next_tenant(
  waiting: list[tuple[str, float]], running: str | None, active: str | None, now: float, max_wait_s: float
) -> tuple[str | None, str | None]:
  """(the tenant whose requests to admit now or None, a tenant to prefetch for or None).

  `waiting` is (tenant, arrival time) in arrival order, `running` the tenant of
  the running batch (None: empty), `active` the tenant whose weights are
  loaded. A running batch keeps its tenant until another has waited past
  max_wait_s: then nothing is admitted (the batch drains) and that tenant's
  weights are prefetched. An empty batch takes the starving tenant, else the
  loaded one if it has requests waiting (no switch), else the oldest request's.
  """
  if not waiting:
    return None, None
  current = running if running is not None else active
  starved = starving(waiting, current, now, max_wait_s)
  if running is not None:
    return (None, starved) if starved is not None else (running, None)
  if starved is not None:
    return starved, None
  if any(t == current for t, _ in waiting):
    return current, None
  return waiting[0][0], None
