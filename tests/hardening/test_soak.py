"""A 1,000-request soak through the engine: bad lines mixed in, every request answered exactly once.

The variant with a faulty token callback checks that the engine isolates a
failing request (only it gets an error response) and keeps bounded aggregates
instead of every response (the Python heap stays flat over the second half).
"""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from jaxmoe.families.mixtral import config
from jaxmoe.serving import Engine, EngineConfig, Mode
from jaxmoe.serving import requests as req_lib
from jaxmoe.serving.batch import serve_lines
from jaxmoe.serving.synthetic import synthetic_store
from tests.hardening.test_request_matrix import BAD_LINES

N = 1000
MAX_SEQ = 32


@pytest.fixture(scope="module")
def store():
  return synthetic_store(config.preset("tiny"), k=3, seed=1, own_fraction=0.5, noise=0.05)


def soak_lines(store, n: int = N, seed: int = 0) -> tuple[list[bytes], set[int]]:
  """n lines, about one in ten bad; returns (lines, the 1-based numbers of the bad ones)."""
  rng = np.random.default_rng(seed)
  bad = [line for line, _ in BAD_LINES.values()]
  lines, bad_at = [], set()
  for i in range(n):
    if i % 10 == 7:
      lines.append(bad[(i // 10) % len(bad)])
      bad_at.add(i + 1)
      continue
    request = {
      "id": f"r{i}",
      "model": store.tenants[i % len(store.tenants)],
      "prompt_ids": rng.integers(0, 256, int(rng.integers(1, 8))).tolist(),
      "max_tokens": int(rng.integers(1, 4)),
    }
    if i % 3 == 0:
      request.update(temperature=0.8, top_p=0.9, seed=i)
    lines.append(json.dumps(request).encode())
  return lines, bad_at


def check_answered_once(out: list[dict], bad_at: set[int], failing: set[str] = frozenset()) -> None:
  assert sorted(r["line"] for r in out) == list(range(1, N + 1))
  for r in out:
    if r["line"] in bad_at or r["id"] in failing:
      assert r["finish_reason"] == "error" and r["error"]["message"], r
    else:
      assert r["error"] is None and 1 <= len(r["token_ids"]) <= 3, r


def test_soak_with_bad_lines_answers_every_request_once(store):
  lines, bad_at = soak_lines(store)
  engine = Engine(store, EngineConfig(mode=Mode.MIXED, max_batch=4, max_seq_len=MAX_SEQ))
  out: list[dict] = []
  summary = serve_lines(lines, engine, out.append)
  check_answered_once(out, bad_at)
  assert (summary["requests"], summary["errors"]) == (N, len(bad_at))


class Tally:
  """Per-line answer counts and outcomes in preallocated arrays: recording adds nothing to the heap."""

  def __init__(self, lines: list[bytes]):
    self.ids = [req_lib.line_id(line, n) for n, line in enumerate(lines, start=1)]
    self.answers = np.zeros(len(lines) + 1, np.int64)
    self.errors = np.zeros(len(lines) + 1, bool)
    self.offset = 0

  def __call__(self, response: dict) -> None:
    line = response["line"] + self.offset
    self.answers[line] += 1
    self.errors[line] = response["error"] is not None

  def check(self, bad_at: set[int], failing: set[str]) -> None:
    assert (self.answers[1:] == 1).all(), np.flatnonzero(self.answers[1:] != 1) + 1
    want = np.array([n in bad_at or self.ids[n - 1] in failing for n in range(1, len(self.ids) + 1)])
    assert (self.errors[1:] == want).all(), np.flatnonzero(self.errors[1:] != want) + 1


def test_soak_with_a_faulty_callback_is_isolated_and_memory_flat(store):
  lines, bad_at = soak_lines(store, seed=1)
  raised_once = set()

  def on_token(rid: str, token: int, delta: str) -> None:
    if rid == "r5":  # always fails: that request, and only it, gets an error response
      raise RuntimeError("callback failed")
    if rid == "r11" and rid not in raised_once:  # fails once: that request gets an error too
      raised_once.add(rid)
      raise RuntimeError("callback failed once")

  engine = Engine(store, EngineConfig(mode=Mode.MIXED, max_batch=4, max_seq_len=MAX_SEQ), on_token=on_token)
  tally = Tally(lines)
  serve_lines(lines[: N // 2], engine, tally)
  tracemalloc.start()
  try:
    tally.offset = N // 2
    serve_lines(lines[N // 2 :], engine, tally)
    growth = tracemalloc.get_traced_memory()[0]
  finally:
    tracemalloc.stop()
  tally.check(bad_at, failing={"r5", "r11"})
  # Every response kept costs about 1.1 kB; jax's bounded caches stay well below the bound.
  assert growth < 500 * (N // 2), f"Python heap grew {growth} bytes over {N // 2} requests"
