"""Overlapped decoding: step n+1 is dispatched before step n's token ids are read back.

The engine keeps a decode step's output ids on the device and feeds them
straight into the next step, so the device never waits for the host's
bookkeeping (detokenizing, stop strings, callbacks, admissions), which runs
while the next step computes. Rows admitted by a prefill get their first
token merged in on the device (`merge`).

A row that finishes at step n (end of sequence, stop string, length, cancel)
has already been dispatched into step n+1: that step's token for it is
dropped when read. Its one extra write lands inside its own reserved pages
(they cover prompt + max_tokens positions, one more than a finished row
writes) or in the scratch page, and the device runs the programs in order, so
pages given back at step n are written by a later admission only after step
n+1 is done with them.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Dispatched:
  """A device step whose token ids have not been read back yet."""

  seqs: tuple  # the Sequences it produced a token for
  tokens: jax.Array  # int32 on the device: [max_batch] for a decode step, [admitted bucket] for a prefill
  index: tuple[int, ...]  # where each sequence's token is in `tokens`


@jax.jit
def merge(tokens: jax.Array, first: jax.Array, rows: jax.Array) -> jax.Array:
  """`tokens` [B] with first[i] written at row rows[i]; rows[i] >= B (padding) is dropped."""
  return tokens.at[rows].set(first, mode="drop")
