"""Host side of the paged KV cache: the free-page allocator and the rows' decode state.

Pages are reserved when a sequence is admitted, for every position it can
reach (prompt plus max_tokens; an encoder-decoder also its encoder positions),
and returned when it finishes, so a running sequence never waits for a page
and never shares one; admission waits while too few are free. `HostRows` mirrors
the device's `paged.Rows`: the engine changes it when rows change and uploads
it; a decode step advances the device copy and `advance` does the same here.
"""

from __future__ import annotations

import numpy as np

from jaxmoe import buckets
from jaxmoe.devices import commit
from jaxmoe.nn import paged
from jaxmoe.nn.sampling import SamplingParams


class PageAllocator:
  """Free pages of one pool, in `shards` blocks of `pages_per_shard` pages (page 0 of each is its scratch page).

  Global page g is page g % pages_per_shard of shard g // pages_per_shard
  (jaxmoe/nn/paged.py); one shard is the whole pool, pages 1..P-1.
  """

  def __init__(self, pages_per_shard: int, shards: int = 1):
    self.pages_per_shard, self.shards = pages_per_shard, shards
    self._free = [
      list(range((s + 1) * pages_per_shard - 1, s * pages_per_shard, -1)) for s in range(shards)
    ]  # pop() hands out low pages first

  @property
  def usable(self) -> int:
    """Pages sequences can hold, every shard's."""
    return self.shards * (self.pages_per_shard - 1)

  @property
  def largest(self) -> int:
    """The most pages one sequence can hold (its pages lie in one shard)."""
    return self.pages_per_shard - 1

  @property
  def free(self) -> int:
    return sum(len(f) for f in self._free)

  def free_in(self, shard: int) -> int:
    return len(self._free[shard])

  def take(self, n: int, shard: int = 0) -> list[int]:
    free = self._free[shard]
    if n > len(free):
      raise RuntimeError(f"asked for {n} KV pages with {len(free)} free in shard {shard}")
    return [free.pop() for _ in range(n)]

  def give_back(self, pages: list[int]) -> None:
    for p in reversed(pages):
      self._free[p // self.pages_per_shard].append(p)


def pages_for(positions: int, page_size: int) -> int:
  return -(-positions // page_size)


class HostRows:
  """The decode state of every batch row, on the host."""

  def __init__(self, batch: int, width: int, cross_width: int):
    self.tables = np.zeros((batch, width), np.int32)
    self.cross_tables = np.zeros((batch, max(cross_width, 1)), np.int32) if cross_width else None
    self.lengths = np.zeros(batch, np.int32)
    self.enc_lengths = np.zeros(batch, np.int32) if cross_width else None
    self.active = np.zeros(batch, bool)
    self.sampling = SamplingParams.full(batch)
    self.dirty = True

  def set(
    self,
    row: int,
    pages: list[int],
    cross_pages: list[int],
    length: int,
    enc_length: int,
    seed: int,
    steps: int,
    temperature: float,
    top_p: float,
  ) -> None:
    self.tables[row] = 0
    self.tables[row, : len(pages)] = pages
    if self.cross_tables is not None:
      self.cross_tables[row] = 0
      self.cross_tables[row, : len(cross_pages)] = cross_pages
      self.enc_lengths[row] = enc_length
    self.lengths[row], self.active[row] = length, True
    sp = self.sampling
    sp.seeds[row], sp.steps[row], sp.temperature[row], sp.top_p[row] = seed, steps, temperature, top_p
    self.dirty = True

  def clear(self, row: int) -> None:
    self.tables[row] = 0
    if self.cross_tables is not None:
      self.cross_tables[row] = 0
      self.enc_lengths[row] = 0
    self.lengths[row], self.active[row] = 0, False
    self.sampling.temperature[row] = 0.0  # idle rows stay greedy: no nucleus sort on their account
    self.dirty = True

  def advance(self) -> None:
    self.lengths += self.active
    self.sampling.steps[:] += self.active

  def width_for(self, page_size: int) -> int:
    """Pages a step must attend over: enough for the longest active row, a power of two."""
    longest = int(self.lengths[self.active].max(initial=0)) + 1
    return min(self.tables.shape[1], buckets.pow2(pages_for(longest, page_size)))

  def upload(self, width: int) -> paged.Rows:
    """The device copy, with block tables cut to `width` pages."""
    self.dirty = False
    sp = self.sampling
    cross = None if self.cross_tables is None else self.cross_tables
    return commit(
      paged.Rows(
        self.tables[:, :width].copy(),
        self.lengths.copy(),
        self.active.copy(),
        SamplingParams(sp.seeds.copy(), sp.steps.copy(), sp.temperature.copy(), sp.top_p.copy()),
        None if cross is None else cross.copy(),
        None if self.enc_lengths is None else self.enc_lengths.copy(),
      )
    )
