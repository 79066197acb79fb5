"""Which experts to share: per-position grouping, a global budget, and owners.

Grouping. At each position (layer l, logical expert e) the K tenants' experts
are clustered by complete linkage on the [A, A] distance matrix: repeatedly
join the two groups whose farthest members are closest. Each join removes one
expert from the pool and costs its height (the largest distance inside the new
group), so every member of a group is within that distance of every other.
Bitwise-identical experts are joined first at every position, whatever the
metric says (the key is (not identical, distance)). Complete linkage never
lowers the height of a later join, so a position's joins are taken in order.

Selection. All joins of all positions are ranked globally by
(not identical, height, layer, expert, step) and the first m are applied:
  budget mode    the smallest m with (L*E*K - m) * expert_bytes <= budget,
                 but never fewer than the identical joins;
  fraction mode  m = round(share_fraction * L*E*(K-1)), never fewer than the
                 identical joins (share_fraction=1 keeps one expert per position).
With K = 2 and the l2 metric this is the paper's rule: positions ranked by
distance, the closest shared until the pool fits.

Owners. A group of several tenants keeps one expert:
  round_robin  member (l*E + e) mod group size (the paper rotates owners);
  base         the named base tenant when it is a member, else the member
               closest to the base tenant's expert at this position;
  medoid       the member with the smallest summed distance to the others;
  average      the float32 mean of the members' weights (owner None).
Ties are broken in the round-robin order of the position. A group of identical
experts keeps its first member's copy under every policy (bit for bit).

Slots. Layer l's pool lists its groups sorted by (expert, first member), so
each tenant's slot map is increasing in e, as in its own checkpoint.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import numpy as np

from jaxmoe.errors import ConsolidateError

GB = 10**9  # budgets are in decimal gigabytes


class Owner(enum.Enum):
  ROUND_ROBIN = "round_robin"
  BASE = "base"
  MEDOID = "medoid"
  AVERAGE = "average"


@dataclasses.dataclass(frozen=True)
class Selection:
  """How much to share (exactly one of budget_bytes, share_fraction) and who owns it."""

  budget_bytes: int | None = None  # bound on the pool: unique experts x expert bytes
  share_fraction: float | None = None  # fraction of the L*E*(K-1) possible joins
  owner: Owner = Owner.ROUND_ROBIN
  base: int = 0  # tenant index for Owner.BASE

  def __post_init__(self):
    if (self.budget_bytes is None) == (self.share_fraction is None):
      raise ConsolidateError("give exactly one of a memory budget and a share fraction")
    if self.budget_bytes is not None and self.budget_bytes < 0:
      raise ConsolidateError(f"budget {self.budget_bytes} bytes is negative")
    if self.share_fraction is not None and not 0.0 <= self.share_fraction <= 1.0:
      raise ConsolidateError(f"share_fraction={self.share_fraction} must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class Dendrogram:
  """Complete-linkage joins of the K tenants at one position."""

  partitions: tuple[tuple[tuple[int, ...], ...], ...]  # [m]: groups after m joins
  heights: tuple[float, ...]  # [m]: height of join m + 1
  exact: tuple[bool, ...]  # [m]: join m + 1 merges bitwise-identical experts only


@dataclasses.dataclass(frozen=True)
class Group:
  """One pool slot: the tenants that share it and where its weights come from."""

  layer: int
  expert: int
  members: tuple[int, ...]  # tenant indices, increasing
  owner: int | None  # tenant whose copy is kept; None: the members' average
  height: float  # largest distance between two members (0 for one member)
  exact: bool  # all members bitwise identical (True for one member)


@dataclasses.dataclass(frozen=True)
class Plan:
  layers: tuple[tuple[Group, ...], ...]  # layers[l][s]: slot s of layer l's pool
  slot_maps: np.ndarray  # [A, L, E] int32
  joins_possible: int
  joins_identical: int
  joins_applied: int

  @property
  def slots_per_layer(self) -> list[int]:
    return [len(groups) for groups in self.layers]

  @property
  def unique_experts(self) -> int:
    return sum(self.slots_per_layer)


def cluster(dist: np.ndarray, same: np.ndarray) -> Dendrogram:
  """Complete linkage over A items: dist [A, A] float, same [A, A] bool.

  Lance-Williams update: the link of A u B to C is the max of A's and B's, for
  the distance and for "some pair differs" alike. Ties go to the lowest pair of
  groups (groups ordered by first member).
  """
  d = np.nan_to_num(np.asarray(dist, np.float64), nan=np.inf)
  x = ~np.asarray(same, bool)  # inexact: some pair across the two groups is not identical
  groups = [(i,) for i in range(d.shape[0])]
  partitions, heights, exact = [tuple(groups)], [], []
  while len(groups) > 1:
    rows, cols = np.triu_indices(len(groups), 1)
    xs, ds = x[rows, cols], d[rows, cols]
    candidates = np.flatnonzero(xs == xs.min())
    best = candidates[np.argmin(ds[candidates])]  # first minimum: row-major order
    a, b = int(rows[best]), int(cols[best])
    heights.append(float(ds[best]))
    exact.append(not xs[best])
    for m in (d, x):
      m[a, :] = m[:, a] = np.maximum(m[a], m[b])
      m[a, a] = 0
    keep = [i for i in range(len(groups)) if i != b]
    d, x = d[np.ix_(keep, keep)], x[np.ix_(keep, keep)]
    groups[a] = tuple(sorted(groups[a] + groups[b]))  # keeps its place: a < b, first member of a
    del groups[b]
    partitions.append(tuple(groups))
  return Dendrogram(tuple(partitions), tuple(heights), tuple(exact))


def check_budget(budget_bytes: int, num_layers: int, num_experts: int, expert_bytes: int) -> None:
  """Raises when even one expert per position (everything shared) exceeds the budget."""
  smallest = num_layers * num_experts * expert_bytes
  if budget_bytes < smallest:
    raise ConsolidateError(
      f"budget {budget_bytes / GB:.9g} GB ({budget_bytes} bytes) is below the smallest possible pool, "
      f"{num_layers * num_experts} experts x {expert_bytes} bytes = {smallest} bytes "
      f"({smallest / GB:.9g} GB) with every position fully shared"
    )


def joins_to_apply(sel: Selection, total: int, possible: int, identical: int, expert_bytes: int) -> int:
  """How many of the ranked joins to apply; `total` = L*E*K experts before sharing."""
  if sel.budget_bytes is not None:
    fits = sel.budget_bytes // expert_bytes
    if total - possible > fits:
      raise ConsolidateError(f"budget {sel.budget_bytes} bytes cannot hold one expert per position")
    wanted = total - fits
  else:
    wanted = math.floor(sel.share_fraction * possible + 0.5)
  return min(possible, max(identical, wanted, 0))


def ranked_joins(dendros: list[list[Dendrogram]]) -> list[tuple[int, int, int]]:
  """(layer, expert, step) of every join, in the global order they are applied."""
  keys = [
    (not d.exact[m], d.heights[m], l, e, m)
    for l, row in enumerate(dendros)
    for e, d in enumerate(row)
    for m in range(len(d.heights))
  ]
  return [(l, e, m) for _, _, l, e, m in sorted(keys)]


def choose_owner(members: tuple[int, ...], dist: np.ndarray, exact: bool, sel: Selection, rotation: int) -> int | None:
  """The tenant whose copy a group keeps (None: average); `rotation` = l*E + e."""
  if len(members) == 1 or exact:
    return members[0]
  start = rotation % len(members)
  ring = members[start:] + members[:start]  # tie order: round robin
  if sel.owner is Owner.ROUND_ROBIN:
    return ring[0]
  if sel.owner is Owner.AVERAGE:
    return None
  if sel.owner is Owner.BASE:
    if sel.base in members:
      return sel.base
    return min(ring, key=lambda t: dist[t, sel.base])
  if sel.owner is Owner.MEDOID:
    return min(ring, key=lambda t: sum(dist[t, u] for u in members))
  raise ValueError(f"unknown owner policy {sel.owner!r}")


def select(dist: np.ndarray, same: np.ndarray, expert_bytes: int, sel: Selection) -> Plan:
  """Groups, owners and slot maps for every position.

  Args:
    dist: [L, E, K, K] distances under the chosen metric.
    same: [L, E, K, K] bitwise identity of the experts.
    expert_bytes: bytes of one expert (w1 + w3 + w2).
    sel: budget or fraction, and owner policy.

  Returns:
    The Plan; its pool holds `plan.unique_experts` experts.
  """
  num_layers, num_experts, k, _ = dist.shape
  dendros = [[cluster(dist[l, e], same[l, e]) for e in range(num_experts)] for l in range(num_layers)]
  possible = num_layers * num_experts * (k - 1)
  identical = sum(sum(d.exact) for row in dendros for d in row)
  count = joins_to_apply(sel, num_layers * num_experts * k, possible, identical, expert_bytes)
  applied = np.zeros((num_layers, num_experts), int)
  for l, e, m in ranked_joins(dendros)[:count]:
    assert m == applied[l, e], "complete linkage joins must be applied in order"
    applied[l, e] += 1
  layers, maps = [], np.zeros((k, num_layers, num_experts), np.int32)
  for l in range(num_layers):
    groups = []
    for e in range(num_experts):
      for members in dendros[l][e].partitions[applied[l, e]]:
        groups.append(_make_group(l, e, num_experts, members, dist[l, e], same[l, e], sel))
    for s, g in enumerate(groups):
      maps[list(g.members), l, g.expert] = s
    layers.append(tuple(groups))
  return Plan(tuple(layers), maps, possible, identical, count)


def _make_group(l, e, num_experts, members, dist, same, sel) -> Group:
  pairs = [(i, j) for i in members for j in members if i < j]
  height = max((float(dist[i, j]) for i, j in pairs), default=0.0)
  exact = all(bool(same[i, j]) for i, j in pairs)
  owner = choose_owner(members, dist, exact, sel, l * num_experts + e)
  return Group(l, e, tuple(members), owner, height, exact)
