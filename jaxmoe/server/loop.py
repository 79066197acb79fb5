"""The engine thread: the one owner of a serving Engine, fed through a bounded queue.

The engine is not thread-safe, so exactly one thread touches it. HTTP
handlers put submissions into a bounded inbox and cancellations into a queue
of their own; between engine steps the thread validates the submissions
(`Engine.check`), queues those that fit under `max_waiting`, drops cancelled
requests, runs one step and hands everything that happened to
`deliver` as one `Batch` (tokens per request, accepted and rejected
submissions, finished responses). `deliver` runs on the engine thread and
must not block (the server passes a `call_soon_threadsafe` into its event
loop).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
import traceback
from collections.abc import Callable

from jaxmoe.errors import RequestError

log = logging.getLogger("jaxmoe.server")
STATS_EVERY_S = 0.1  # how stale the engine stats /metrics and /health read may be while the engine is busy


@dataclasses.dataclass
class Batch:
  """What one turn of the engine thread produced, for the HTTP side."""

  accepted: list = dataclasses.field(default_factory=list)  # (rid, Request)
  rejected: list = dataclasses.field(default_factory=list)  # (rid, message, HTTP status 400 | 429 | 500)
  tokens: dict = dataclasses.field(default_factory=dict)  # rid -> ([token ids], text those tokens completed)
  finished: list = dataclasses.field(default_factory=list)  # engine response dicts
  failed: list = dataclasses.field(default_factory=list)  # (rid, message): the engine raised
  cancelled: list = dataclasses.field(default_factory=list)  # (rid, found, decode steps the cancel waited)

  def __bool__(self) -> bool:
    return any(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class Submission:
  rid: str
  request: dict  # OpenAI field names, as parse_request reads them
  fill_max_tokens: bool = False  # no max_tokens given: as many as the context leaves


class EngineLoop:
  """Runs `engine.step()` in a dedicated thread; see the module docstring.

  Args:
    make_engine: builds the engine given the on_token callback (called on the caller's thread).
    deliver: receives each non-empty Batch, on the engine thread.
    max_waiting: valid requests queued in the engine without a first token; more are refused.
    inbox_size: bound of the submission/cancellation queue.
  """

  def __init__(self, make_engine: Callable, deliver: Callable[[Batch], None], max_waiting: int, inbox_size: int):
    self._batch = Batch()
    self.engine = make_engine(self._on_token)
    self.deliver = deliver
    self.inbox: queue.Queue = queue.Queue(maxsize=inbox_size)
    self._cancels: collections.deque = collections.deque()
    self.stats: dict = dict(self.engine.stats())  # replaced whole after each step: safe to read anywhere
    self.decode_steps = int(self.stats.get("decode_steps", 0))
    self._stats_at = time.monotonic()
    self.last_error: str | None = None
    self.step_failures = 0
    self.max_waiting = max_waiting
    self._live: set[str] = set()  # accepted, not finished
    self._unstarted: set[str] = set()  # accepted, no token yet: the engine's waiting queue
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name="jaxmoe-engine", daemon=True)

  # Called from any thread.
  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float = 30.0) -> None:
    self._stop.set()
    if self._thread.is_alive():
      self._thread.join(timeout)

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and not self._stop.is_set()

  def submit(self, sub: Submission) -> None:
    """Queues a submission; raises queue.Full when the inbox is full."""
    self.inbox.put_nowait(sub)

  def cancel(self, rid: str) -> None:
    """Asks the engine thread to drop `rid` before its next step (a client went away).

    Cancellations bypass the bounded inbox (a full inbox must not lose one); there is at most
    one per request the server holds, so they are bounded too.
    """
    self._cancels.append((rid, self.decode_steps))

  # The engine thread.
  def _on_token(self, rid: str, token_id: int, text_delta: str) -> None:
    # The engine's deltas hold back partial characters and what may become a stop string: they add
    # up to the final text.
    ids, text = self._batch.tokens.get(rid, ([], ""))
    ids.append(int(token_id))
    self._batch.tokens[rid] = (ids, text + text_delta)
    self._unstarted.discard(rid)

  def _run(self) -> None:
    while not self._stop.is_set():
      try:
        self._turn()
      except Exception:  # a bug in this loop must not stop serving: log it and go on
        log.exception("engine loop turn failed")
        self.last_error = traceback.format_exc(limit=3)
        time.sleep(0.01)
    self.engine.close()

  def _turn(self) -> None:
    self._drain(block=not self.engine.has_work)
    stepped = self.engine.has_work
    if stepped:
      self._step()
    batch, self._batch = self._batch, Batch()
    if stepped or batch:  # a cancel or an admission changes the counts too
      self.decode_steps = int(getattr(self.engine, "decode_steps", self.decode_steps))
      now = time.monotonic()
      # stats() walks the weights' trees: at most every STATS_EVERY_S while busy, and once idle.
      if now - self._stats_at >= STATS_EVERY_S or not self.engine.has_work:
        self.stats, self._stats_at = dict(self.engine.stats()), now
    if batch:
      self.deliver(batch)

  def _drain(self, block: bool) -> None:
    """Takes every queued submission, then every cancellation (which may name one of them)."""
    subs = []
    try:
      subs.append(self.inbox.get(timeout=0.05) if block and not self._cancels else self.inbox.get_nowait())
      while True:
        subs.append(self.inbox.get_nowait())
    except queue.Empty:
      pass
    for sub in subs:
      self._accept(sub)
    while self._cancels:
      rid, steps_then = self._cancels.popleft()
      found = self.engine.cancel(rid)
      self._live.discard(rid)
      self._unstarted.discard(rid)
      self._batch.cancelled.append((rid, found, self.decode_steps - steps_then))

  def _accept(self, sub: Submission) -> None:
    # Validation first, so a bad request is told what is wrong with it even when the queue is full.
    try:
      request, prompt = self._check(sub)
    except RequestError as e:
      self._batch.rejected.append((sub.rid, str(e), 400))
      return
    except Exception as e:  # a bug in validation: this request fails, the others go on
      log.exception("validating %s failed", sub.rid)
      self._batch.rejected.append((sub.rid, f"internal error while validating the request ({type(e).__name__})", 500))
      return
    if len(self._unstarted) >= self.max_waiting:
      message = f"the server's waiting queue is full ({self.max_waiting} requests); retry later"
      self._batch.rejected.append((sub.rid, message, 429))
      return
    self.engine.submit(request, prompt=prompt)
    self._live.add(sub.rid)
    self._unstarted.add(sub.rid)
    self._batch.accepted.append((sub.rid, request))

  def _check(self, sub: Submission):
    """engine.check, the one validation path: (Request, prompt ids). With fill_max_tokens, max_tokens is
    all the room the prompt leaves."""
    if not sub.fill_max_tokens:
      return self.engine.check(sub.request, sub.rid)
    prompt_len = len(sub.request.get("prompt_ids") or ())
    room = self.engine.room(prompt_len)
    if room < 1:
      raise RequestError(f"the prompt leaves no room in max_seq_len={self.engine.config.max_seq_len}")
    return self.engine.check({**sub.request, "max_tokens": room}, sub.rid)

  def _step(self) -> None:
    try:
      finished = self.engine.step()
    except Exception as e:  # isolate: fail what is in flight, keep the thread and the server up
      log.exception("engine step failed")
      self.step_failures += 1
      self.last_error = f"{type(e).__name__}: {e}"
      for rid in list(self._live):
        self.engine.cancel(rid)
        self._batch.failed.append((rid, f"the engine failed while serving this request ({type(e).__name__})"))
      self._live.clear()
      self._unstarted.clear()
      self._batch.tokens.clear()
      return
    for response in finished:
      self._live.discard(response["id"])
      self._unstarted.discard(response["id"])
    self._batch.finished.extend(finished)
