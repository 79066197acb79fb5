"""Text-to-text tasks for the Switch tenants, built from the corpora of corpus.py, and span corruption.

Four default tasks, one per domain (and prose-reverse); each is (input, target) byte pairs per split, taken
from that domain's train or held-out text, so no held-out text is trained on
(held-out inputs that also occur among the training inputs are dropped).
Every output follows from its input, so a small model trained for minutes can
learn it well (guessing a function's name or a masked word from context, which
this size of model gets right a few % of the time, would leave scores too low
for a 3% comparison to mean anything):
  code-params     a stdlib function's source (its one-line signature first, whole lines,
                  up to 63 bytes) -> its parameter names: "self, key, default" (functions
                  with a parameter besides self)
  prose-lower     a window of the language reference (whole lines, up to 61 bytes) with
                  one lower-case word of 4+ letters written in capitals between
                  SENTINELS[0] and SENTINELS[1] -> the word
  prose-reverse   the same with one word of 4+ letters written backwards (not a default task)
  arithmetic      an equation of the corpus, "939-396=543" -> the inverse one, "543+396=939"
                  (+ and - swap, * becomes /; held-out lines come from another seed)
  record-summary  a Unicode JSON record -> "LATIN CAPITAL LETTER B (Lu)"; a calendar CSV
                  row -> "Thursday 14 March 2024" (records up to 95 bytes)

The base pretrains with T5 span corruption over rows of the four domains'
training text (`SpanBatches`): 15% of a row's bytes, in spans of mean length
3, each replaced by its own sentinel; the target is every sentinel followed by
the bytes it replaced. Sentinels are the control bytes 14..31, which the
corpora never contain (`check_no_sentinels`).

Tokens are the ByteTokenizer's: the encoder reads BOS + input bytes (what
serving's prompt encoding gives), the decoder reads decoder_start (PAD) +
target and predicts target bytes + EOS.

Axis names (jaxmoe/axes.py): B rows, U encoder tokens, T decoder tokens.
"""

from __future__ import annotations

import ast
import calendar
import dataclasses
import datetime
import functools
import json
import re
import textwrap

import numpy as np

from jaxmoe.io.tokenizer import ByteTokenizer
from jaxmoe.train import corpus

BOS, EOS, PAD = ByteTokenizer.bos_id, ByteTokenizer.eos_id, ByteTokenizer.pad_id
START = PAD  # decoder_start_token_id, as T5's
SENTINELS = tuple(range(14, 32))  # control bytes absent from every corpus
SPLITS = ("train", "heldout")
_EQUATION = re.compile(r"(?P<a>-?\d+)(?P<op>[-+*])(?P<b>\d+)=(?P<c>-?\d+)")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task's domain and the longest encoder input and decoder target it makes (tokens)."""

  domain: str
  enc_len: int  # BOS + input bytes
  dec_len: int  # target bytes + EOS
  max_new_tokens: int  # what generation needs for the longest target, EOS included


# Inputs are short because training time grows with them; code-params and the prose tasks share a
# shape, so their fine-tunes run one compiled step (records need 96 bytes for the JSON ones).
TASKS: dict[str, TaskSpec] = {
  "code-params": TaskSpec("code", enc_len=64, dec_len=32, max_new_tokens=32),
  "prose-reverse": TaskSpec("prose", enc_len=64, dec_len=32, max_new_tokens=32),
  "prose-lower": TaskSpec("prose", enc_len=64, dec_len=32, max_new_tokens=32),
  "arithmetic": TaskSpec("arithmetic", enc_len=16, dec_len=16, max_new_tokens=16),
  "record-summary": TaskSpec("records", enc_len=96, dec_len=32, max_new_tokens=32),
}
TASK_NAMES = tuple(TASKS)
# The switch-demo tenants, one per domain. prose-reverse is not among them: after 2000 steps its
# tenant answered 1 of 128 held-out rows (reversing is much harder than copying for this model).
DEFAULT_TASKS = ("code-params", "prose-lower", "arithmetic", "record-summary")


def task(name: str) -> TaskSpec:
  """Exact-name lookup in the task registry."""
  if name not in TASKS:
    raise KeyError(f"unknown task {name!r}; known: {list(TASKS)}")
  return TASKS[name]


def _split_text(domain: str, split: str) -> str:
  c = corpus.load(domain, 16)
  data = c.train if split == "train" else c.heldout
  return bytes(data).decode("utf-8", errors="replace")


def _head_lines(text: str, limit: int) -> str:
  """The longest run of whole first lines within `limit` bytes (the first line cut if it alone is longer)."""
  out, size = [], 0
  for line in text.split("\n"):
    n = len(line.encode()) + (1 if out else 0)
    if size + n > limit:
      break
    out.append(line)
    size += n
  if not out:
    return text.encode()[:limit].decode("utf-8", errors="ignore")
  return "\n".join(out)


def _functions(source: str):
  """(ast node, dedented source from its def line) of every function and method."""
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return
  lines = source.split("\n")
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node, textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))


def _code_params(split: str, spec: TaskSpec) -> list[tuple[bytes, bytes]]:
  """Functions with a parameter besides self whose one-line signature fits: source head -> parameter names."""
  train, held = corpus.code_files()
  out = []
  for source in train if split == "train" else held:
    for node, text in _functions(source):
      a = node.args
      names = [x.arg for x in (*a.posonlyargs, *a.args)]
      names += [f"*{a.vararg.arg}"] if a.vararg else []
      names += [x.arg for x in a.kwonlyargs] + ([f"**{a.kwarg.arg}"] if a.kwarg else [])
      target = ", ".join(names)
      first = text.split("\n")[0]
      if names in ([], ["self"]) or not first.rstrip().endswith(":") or len(first) >= spec.enc_len:
        continue  # no parameter but self (a third of them), or the signature does not fit
      if len(target) + 1 <= spec.dec_len and text.isascii():
        out.append((_head_lines(text, spec.enc_len - 1).encode(), target.encode()))
  return out


def _prose_marked(split: str, spec: TaskSpec, keep, disguise) -> list[tuple[bytes, bytes]]:
  """Windows of whole lines; one word w with keep(w) written as disguise(w) between two sentinels (seeded)."""
  rng = np.random.default_rng(0 if split == "train" else 1)
  lines = [ln for ln in _split_text("prose", split).split("\n") if ln.strip() and ln.isascii()]
  open_, close = chr(SENTINELS[0]), chr(SENTINELS[1])
  out = []
  for i in range(len(lines)):
    window = _head_lines("\n".join(lines[i : i + 4]), spec.enc_len - 3)  # room for the two sentinels
    words = window.split(" ")
    picks = [j for j, w in enumerate(words) if w.isalpha() and len(w) >= 4 and keep(w)]
    if len(picks) < 2:
      continue
    j = int(picks[rng.integers(0, len(picks))])
    word = words[j]
    if len(word) + 1 <= spec.dec_len:
      masked = " ".join([*words[:j], open_ + disguise(word) + close, *words[j + 1 :]])
      out.append((masked.encode(), word.encode()))
  return out


def _prose_reverse(split: str, spec: TaskSpec) -> list[tuple[bytes, bytes]]:
  return _prose_marked(split, spec, lambda w: True, lambda w: w[::-1])


def _prose_lower(split: str, spec: TaskSpec) -> list[tuple[bytes, bytes]]:
  return _prose_marked(split, spec, str.islower, str.upper)


def _arithmetic(split: str, spec: TaskSpec) -> list[tuple[bytes, bytes]]:
  """'a+b=c' -> 'c-b=a', 'a-b=c' -> 'c+b=a', 'a*b=c' -> 'c/b=a' (b != 0)."""
  inverse = {"+": "-", "-": "+", "*": "/"}
  out = []
  for line in _split_text("arithmetic", split).split("\n"):
    m = _EQUATION.fullmatch(line)
    if m is None or (m["op"] == "*" and int(m["b"]) == 0):
      continue
    out.append((line.encode(), f"{m['c']}{inverse[m['op']]}{m['b']}={m['a']}".encode()))
  return out


def _record_summary(split: str, spec: TaskSpec) -> list[tuple[bytes, bytes]]:
  out = []
  for line in _split_text("records", split).split("\n"):
    if line.startswith("{"):
      rec = json.loads(line)
      summary = f"{rec['name']} ({rec['category']})"
    elif line[:1].isdigit():
      day = datetime.date.fromisoformat(line.split(",")[0])
      summary = f"{calendar.day_name[day.weekday()]} {day.day} {calendar.month_name[day.month]} {day.year}"
    else:
      continue  # the CSV header
    if len(line) + 1 <= spec.enc_len and len(summary) + 1 <= spec.dec_len:
      out.append((line.encode(), summary.encode()))
  return out


_BUILDERS = {
  "code-params": _code_params,
  "prose-reverse": _prose_reverse,
  "prose-lower": _prose_lower,
  "arithmetic": _arithmetic,
  "record-summary": _record_summary,
}


@functools.cache
def pairs(name: str, split: str) -> tuple[tuple[bytes, bytes], ...]:
  """Every (input, target) byte pair of task `name` in `split` ("train" or "heldout"), in corpus order."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} must be one of {SPLITS}")
  spec = task(name)
  out = tuple(_BUILDERS[name](split, spec))
  if split == "heldout":  # no held-out input the tenant trained on (a third of the short equations recur)
    seen = {x for x, _ in pairs(name, "train")}
    out = tuple(p for p in out if p[0] not in seen)
  if not out:
    raise ValueError(f"task {name!r}: no {split} pairs from this Python's standard library")
  return out


def heldout_pairs(name: str, count: int) -> list[tuple[bytes, bytes]]:
  """`count` held-out pairs spread evenly over the held-out split (all of them when it has fewer)."""
  held = pairs(name, "heldout")
  if count >= len(held):
    return list(held)
  return [held[i] for i in np.linspace(0, len(held) - 1, count).round().astype(np.int64)]


def check_no_sentinels() -> None:
  """Raises ValueError if any domain's text holds a sentinel byte (another Python's stdlib might)."""
  for domain in corpus.DOMAINS:
    c = corpus.load(domain, 16)
    for data in (c.train, c.heldout):
      if np.isin(data, SENTINELS).any():
        raise ValueError(f"domain {domain!r} contains sentinel bytes {SENTINELS[0]}..{SENTINELS[-1]}")


def encode(pairs_: list[tuple[bytes, bytes]], enc_len: int, dec_len: int) -> dict[str, np.ndarray]:
  """(input, target) pairs -> {"enc" [B, U], "enc_len" [B], "dec" [B, T], "target" [B, T]} int32.

  enc is BOS + input, dec is START + target, target is target + EOS; PAD after
  each. Inputs or targets longer than the shapes raise ValueError.
  """
  n = len(pairs_)
  enc = np.full((n, enc_len), PAD, np.int32)
  dec = np.full((n, dec_len), PAD, np.int32)
  target = np.full((n, dec_len), PAD, np.int32)
  lengths = np.empty(n, np.int32)
  for i, (x, y) in enumerate(pairs_):
    if len(x) + 1 > enc_len or len(y) + 1 > dec_len:
      raise ValueError(f"pair {i}: {len(x)} + 1 input or {len(y)} + 1 target tokens exceed ({enc_len}, {dec_len})")
    enc[i, 0], enc[i, 1 : 1 + len(x)] = BOS, np.frombuffer(x, np.uint8)
    lengths[i] = 1 + len(x)
    y_ids = np.frombuffer(y, np.uint8).astype(np.int32)
    target[i, : len(y) + 1] = np.append(y_ids, EOS)
    dec[i, : len(y) + 1] = np.insert(y_ids, 0, START)
  return {"enc": enc, "enc_len": lengths, "dec": dec, "target": target}


def _segments(rng: np.random.Generator, items: int, segments: int) -> np.ndarray:
  """T5's random segmentation: `items` split into `segments` nonempty runs, lengths [segments]."""
  first = np.concatenate([[0], rng.permutation(np.arange(items - 1) < segments - 1)]).astype(np.int64)
  return np.bincount(np.cumsum(first), minlength=segments)


def span_corrupt(row: bytes, rng: np.random.Generator, density: float, mean_span: float) -> tuple[bytes, bytes]:
  """T5 span corruption of one row: (input with a sentinel per span, sentinel + span bytes per span)."""
  length = len(row)
  noise = min(max(round(length * density), 1), length - 1)
  spans = min(max(round(noise / mean_span), 1), len(SENTINELS), noise)
  noise_len, keep_len = _segments(rng, noise, spans), _segments(rng, length - noise, spans)
  inp, out, pos = bytearray(), bytearray(), 0
  for s in range(spans):  # each span follows a kept run, as T5's noise mask starts with kept bytes
    inp += row[pos : pos + keep_len[s]]
    pos += keep_len[s]
    inp.append(SENTINELS[s])
    out.append(SENTINELS[s])
    out += row[pos : pos + noise_len[s]]
    pos += noise_len[s]
  return bytes(inp), bytes(out)


def span_shapes(row_len: int, density: float, mean_span: float) -> tuple[int, int]:
  """(enc_len, dec_len) that every span-corrupted row of `row_len` bytes fits."""
  noise = min(max(round(row_len * density), 1), row_len - 1)
  spans = min(max(round(noise / mean_span), 1), len(SENTINELS), noise)
  return 1 + row_len - noise + spans, noise + spans + 1


class SpanBatches:
  """Endless seeded span-corruption batches over rows of `row_len` bytes from the domains' training text."""

  def __init__(self, domains, batch_size: int, row_len: int, density: float, mean_span: float, seed):
    self.inner = corpus.Batches(tuple(domains), batch_size, row_len, seed)
    self.density, self.mean_span = density, mean_span
    self.shapes = span_shapes(row_len, density, mean_span)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rows = next(self.inner)[:, 1:].astype(np.uint8)  # drop the decoder-only BOS
    rng = self.inner.rng
    return encode([span_corrupt(r.tobytes(), rng, self.density, self.mean_span) for r in rows], *self.shapes)


class TaskBatches:
  """Endless seeded batches of one task's training pairs, drawn uniformly with replacement."""

  def __init__(self, name: str, batch_size: int, seed):
    self.pairs, self.spec = pairs(name, "train"), task(name)
    self.batch_size, self.rng = batch_size, np.random.default_rng(seed)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    pick = self.rng.integers(0, len(self.pairs), self.batch_size)
    return encode([self.pairs[i] for i in pick], self.spec.enc_len, self.spec.dec_len)
