"""Deterministic domain corpora built from the Python standard library alone.

Four domains, each a train and a held-out byte string with a fixed split:
  code        the stdlib's top-level .py files (sorted by name); every 10th file held out
  prose       the English of `pydoc_data.topics` (the language reference), topics sorted
              by name; every 8th topic held out
  arithmetic  generated lines such as "123+456=579" (+, -, *); train and held-out lines
              come from different seeds
  records     JSON lines about Unicode characters (`unicodedata`) and CSV rows of
              calendar dates (`calendar`, `datetime`); every 10th block of 32 records
              held out

Text is byte-tokenized (`ByteTokenizer`): a training row is BOS followed by T
bytes starting at a line start, so prompts that begin a line are in
distribution. The same Python version gives the same bytes; another version's
stdlib and Unicode tables differ a little.

Axis names (jaxmoe/axes.py): B rows, T tokens.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import functools
import json
import pathlib
import sysconfig
import unicodedata

import numpy as np

from jaxmoe.io.tokenizer import ByteTokenizer

DOMAINS = ("code", "prose", "arithmetic", "records")
BOS = ByteTokenizer.bos_id
MAX_BYTES = 3_000_000  # text kept per domain and split at most: more only costs reading time


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One domain: train and held-out bytes, and the line starts rows of seq_len bytes begin at."""

  name: str
  seq_len: int
  train: np.ndarray  # uint8
  heldout: np.ndarray  # uint8
  train_starts: np.ndarray  # int64 offsets of line starts usable as row starts
  heldout_starts: np.ndarray


@functools.cache
def code_files() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The stdlib's top-level .py files' text, sorted by name: (train files, held-out files: every 10th)."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  train, held = [], []
  for i, path in enumerate(sorted(root.glob("*.py"), key=lambda p: p.name)):
    text = path.read_text(encoding="utf-8", errors="replace")
    (held if i % 10 == 0 else train).append(text)
  return tuple(train), tuple(held)


def _code() -> tuple[str, str]:
  train, held = code_files()
  return "\n".join(train), "\n".join(held)


def _prose() -> tuple[str, str]:
  from pydoc_data.topics import topics

  train, held = [], []
  for i, key in enumerate(sorted(topics)):
    (held if i % 8 == 0 else train).append(topics[key])
  return "\n".join(train), "\n".join(held)


def arithmetic_lines(seed: int, count: int) -> list[str]:
  """'a+b=c', 'a-b=c' or 'a*b=c' with a, b < 1000 (products of numbers < 100)."""
  rng = np.random.default_rng(seed)
  ops = rng.integers(0, 3, count)
  a, b = rng.integers(0, 1000, count), rng.integers(0, 1000, count)
  out = []
  for op, x, y in zip(ops.tolist(), a.tolist(), b.tolist()):
    if op == 0:
      out.append(f"{x}+{y}={x + y}")
    elif op == 1:
      out.append(f"{x}-{y}={x - y}")
    else:
      x, y = x % 100, y % 100
      out.append(f"{x}*{y}={x * y}")
  return out


def _arithmetic() -> tuple[str, str]:
  return "\n".join(arithmetic_lines(0, 120_000)), "\n".join(arithmetic_lines(1, 12_000))


def _unicode_records() -> list[str]:
  out = []
  for code in range(0x20, 0x3400):
    char = chr(code)
    name = unicodedata.name(char, "")
    if not name:
      continue
    record = {
      "code": code,
      "char": char,
      "name": name,
      "category": unicodedata.category(char),
      "bidi": unicodedata.bidirectional(char),
    }
    out.append(json.dumps(record, ensure_ascii=True))
  return out


def _calendar_records() -> list[str]:
  out = ["date,weekday,month,day_of_year,iso_week"]
  day = datetime.date(1990, 1, 1)
  while day.year < 2030:
    out.append(
      f"{day.isoformat()},{calendar.day_name[day.weekday()]},{calendar.month_name[day.month]},"
      f"{day.timetuple().tm_yday},{day.isocalendar()[1]}"
    )
    day += datetime.timedelta(days=1)
  return out


def _records() -> tuple[str, str]:
  train, held = [], []
  for source in (_unicode_records(), _calendar_records()):
    for i in range(0, len(source), 32):
      (held if (i // 32) % 10 == 0 else train).append("\n".join(source[i : i + 32]))
  return "\n".join(train), "\n".join(held)


_BUILDERS = {"code": _code, "prose": _prose, "arithmetic": _arithmetic, "records": _records}


def _line_starts(data: np.ndarray, seq_len: int) -> np.ndarray:
  starts = np.concatenate([[0], np.flatnonzero(data == ord("\n")) + 1])
  return starts[starts + seq_len <= data.size]


@functools.cache
def load(name: str, seq_len: int) -> Corpus:
  """The corpus of domain `name` (one of DOMAINS), rows of `seq_len` bytes after BOS."""
  if name not in _BUILDERS:
    raise KeyError(f"unknown domain {name!r}; known: {list(DOMAINS)}")
  train, held = _BUILDERS[name]()
  data = [np.frombuffer(t.encode("utf-8")[:MAX_BYTES], np.uint8) for t in (train, held)]
  starts = [_line_starts(d, seq_len) for d in data]
  if starts[0].size == 0 or starts[1].size == 0:
    raise ValueError(
      f"domain {name!r}: this Python's standard library gives too little text "
      f"({data[0].size} train, {data[1].size} held-out bytes) for rows of {seq_len}"
    )
  return Corpus(name, seq_len, data[0], data[1], *starts)


def rows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
  """int32 [B, 1 + seq_len]: BOS, then seq_len bytes from each start."""
  idx = starts[:, None] + np.arange(seq_len)[None, :]
  out = np.empty((starts.size, seq_len + 1), np.int32)
  out[:, 0] = BOS
  out[:, 1:] = data[idx]
  return out


def sample_rows(corpus: Corpus, rng: np.random.Generator, count: int) -> np.ndarray:
  """`count` training rows [count, 1 + seq_len] at random line starts."""
  starts = corpus.train_starts[rng.integers(0, corpus.train_starts.size, count)]
  return rows(corpus.train, starts, corpus.seq_len)


def heldout_rows(corpus: Corpus, count: int) -> np.ndarray:
  """`count` held-out rows [count, 1 + seq_len] at line starts spread evenly over the held-out text."""
  starts = corpus.heldout_starts
  picks = np.linspace(0, starts.size - 1, count).round().astype(np.int64)
  return rows(corpus.heldout, starts[picks], corpus.seq_len)


class Batches:
  """An endless, seeded stream of training batches [B, 1 + T] drawn from one or more domains.

  Each row picks its domain uniformly at random, so a mixed stream is an even mix.
  """

  def __init__(self, domains: tuple[str, ...], batch_size: int, seq_len: int, seed: int | tuple[int, ...]):
    self.corpora = [load(d, seq_len) for d in domains]
    self.batch_size, self.seq_len = batch_size, seq_len
    self.rng = np.random.default_rng(seed)

  def __iter__(self):
    return self

  def __next__(self) -> np.ndarray:
    which = self.rng.integers(0, len(self.corpora), self.batch_size)
    out = np.empty((self.batch_size, self.seq_len + 1), np.int32)
    for k, corpus in enumerate(self.corpora):
      pick = np.flatnonzero(which == k)
      if pick.size:
        out[pick] = sample_rows(corpus, self.rng, pick.size)
    return out


def calibration_text(domains, seq_len: int, bytes_per_domain: int = 512) -> str:
  """Training text of every domain in turn (never held-out text), for the output distance metric."""
  parts = []
  for d in domains:
    c = load(d, seq_len)
    start = int(c.train_starts[c.train_starts.size // 2])
    parts.append(bytes(c.train[start : start + bytes_per_domain]).decode("utf-8", errors="replace"))
  return "\n".join(parts)
