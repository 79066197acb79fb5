"""Padded sizes: shapes that take few values, so jitted programs compile a bounded number of times."""

from __future__ import annotations


def pow2(n: int, cap: int | None = None, floor: int = 1) -> int:
  """The smallest power of two >= n, at least `floor`, at most `cap` when given."""
  out = max(floor, 1 << (max(n, 1) - 1).bit_length())
  return out if cap is None else min(cap, out)


def round_up(n: int, block: int) -> int:
  """n rounded up to a multiple of `block`."""
  return -(-n // block) * block
