"""The event-loop side of the engine thread: one `Pending` per request, fed by engine batches.

The engine thread hands each `Batch` over with `call_soon_threadsafe`; the
hub routes its parts to the requests' `Pending` objects, which handlers await.
Every handler ends with `Hub.close`, whatever happened (served, timed out,
client gone, error): it drops the request's state and, if the engine still
holds the request, cancels it there, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import uuid

from jaxmoe.server.detok import SentText
from jaxmoe.server.errors import APIError
from jaxmoe.server.loop import Batch, Submission
from jaxmoe.server.metrics import UNKNOWN

log = logging.getLogger("jaxmoe.server")


class Pending:
  """One request between its submission and the end of its answer, with its deadline armed."""

  def __init__(self, rid: str, model: str, asked, endpoint: str, deadline: float):
    self.rid, self.model, self.asked, self.endpoint = rid, model, asked, endpoint
    loop = asyncio.get_running_loop()
    self.accepted: asyncio.Future = loop.create_future()
    self.items: collections.deque = collections.deque()
    self.wake = asyncio.Event()
    self.text: SentText | None = None
    self.waiting = True  # counted as waiting until its first token
    self.ended = False  # the engine holds it no more (finished, rejected, failed)
    self.expired = False
    self.ping_due = False
    self.generated = None  # the tokens counter for this request's model
    # One timer per request rather than a timeout per wait: waits happen once per token.
    self.timer = loop.call_at(deadline, self._expire)
    self.pinger: asyncio.TimerHandle | None = None

  def start_pings(self, every_s: float) -> None:
    """From now on `next_events` also returns [] every `every_s` seconds (a keep-alive is due)."""

    def tick():
      self.ping_due = True
      self.wake.set()
      self.pinger = asyncio.get_running_loop().call_later(every_s, tick)

    self.pinger = asyncio.get_running_loop().call_later(every_s, tick)

  def stop_timers(self) -> None:
    self.timer.cancel()
    if self.pinger is not None:
      self.pinger.cancel()

  def _expire(self) -> None:
    self.expired = True
    if not self.accepted.done():
      self.accepted.set_exception(TimeoutError())
    self.wake.set()

  def push(self, kind: str, payload) -> None:
    self.items.append((kind, payload))
    self.wake.set()

  async def next_events(self) -> list:
    """The events since the last call ([] when a keep-alive is due and nothing came); raises
    TimeoutError once the deadline has passed."""
    while not self.items and not self.expired and not self.ping_due:
      self.wake.clear()
      await self.wake.wait()
    self.ping_due = False
    if not self.items:
      if self.expired:
        raise TimeoutError
      return []
    items = list(self.items)
    self.items.clear()
    return items


class Hub:
  """Submits requests to the engine loop and routes what comes back (see module docstring)."""

  def __init__(self, tenants, metrics, tokenizer):
    self.tenants, self.metrics, self.tokenizer = tenants, metrics, tokenizer
    self.pending: dict[str, Pending] = {}
    self._prefix, self._count = uuid.uuid4().hex[:12], 0
    self.waiting = 0  # submitted, no token yet (the engine thread bounds the accepted ones)
    self.engine_loop = None
    self.aio: asyncio.AbstractEventLoop | None = None

  def bind(self, engine_loop, aio: asyncio.AbstractEventLoop) -> None:
    self.engine_loop, self.aio = engine_loop, aio

  # The engine thread.
  def deliver(self, batch: Batch) -> None:
    if self.aio is not None and not self.aio.is_closed():
      self.aio.call_soon_threadsafe(self._dispatch, batch)

  # The event loop.
  async def submit(self, endpoint: str, request: dict, deadline: float, fill_max_tokens: bool = False) -> Pending:
    """Queues a request and waits for the engine thread's verdict; raises APIError (400/404/429/504)."""
    model = request.get("model")
    label = model if isinstance(model, str) and model in self.tenants.names else UNKNOWN
    self._count += 1  # unique in this process; the prefix keeps ids unique across restarts
    rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{self._prefix}{self._count}"
    p = Pending(rid, label, model, endpoint, deadline)
    try:
      self.engine_loop.submit(Submission(rid, {**request, "id": rid}, fill_max_tokens))
    except queue.Full:
      raise APIError(429, "the server's request queue is full; retry later", "queue_full") from None
    self.pending[rid] = p
    self.waiting += 1
    try:
      await p.accepted
    except TimeoutError:
      self.close(p, "timeout")
      raise APIError(504, "timed out before the engine took the request", "timeout", counted=True) from None
    except BaseException:
      self.close(p)
      raise
    return p

  def close(self, p: Pending, outcome: str = "cancelled") -> bool:
    """Ends a request's life here; if the engine still holds it, cancels it there and counts it
    with `outcome`. True if it was cancelled."""
    if self.pending.pop(p.rid, None) is None:
      return False
    p.stop_timers()
    self._leave_waiting(p)
    if not p.ended:
      p.ended = True
      self.engine_loop.cancel(p.rid)
      self.metrics.requests.labels(p.model, p.endpoint, outcome).inc()
      return True
    return False

  def _leave_waiting(self, p: Pending) -> None:
    if p.waiting:
      p.waiting = False
      self.waiting -= 1

  def _dispatch(self, batch: Batch) -> None:
    try:
      self._route(batch)
    except Exception:  # a bug here must not take the event loop's callback machinery down
      log.exception("dispatching an engine batch failed")

  def _route(self, batch: Batch) -> None:
    get = self.pending.get
    for rid, request in batch.accepted:
      if (p := get(rid)) is not None and not p.accepted.done():
        p.text = SentText()
        p.accepted.set_result(request)
    for rid, message, status in batch.rejected:
      if (p := get(rid)) is not None:
        p.ended = True
        self._leave_waiting(p)
        # 404 where the error is about the model name (an unknown tenant), 400 for everything else.
        named = isinstance(p.asked, str) and p.asked and p.model == UNKNOWN and repr(p.asked) in message
        if status == 400 and named:
          status = 404
        code = {404: "model_not_found", 429: "queue_full", 500: "internal_error"}.get(status)
        if not p.accepted.done():
          p.accepted.set_exception(APIError(status, message, code))
    for rid, (ids, text) in batch.tokens.items():
      if (p := get(rid)) is not None:
        self._leave_waiting(p)
        if p.generated is None:
          p.generated = self.metrics.generated.labels(p.model)  # the labelled child, looked up once
        p.generated.inc(len(ids))
        self.tenants.active = p.model
        p.push("tokens", (ids, text))
    for response in batch.finished:
      if (p := get(response["id"])) is not None:
        p.ended = True
        self._leave_waiting(p)
        self.metrics.served(p.endpoint, response)
        p.push("done", response)
    for rid, message in batch.failed:
      if (p := get(rid)) is not None:
        p.ended = True
        self._leave_waiting(p)
        self.metrics.requests.labels(p.model, p.endpoint, "failed").inc()
        p.push("failed", message)
    for _, found, steps in batch.cancelled:
      if found:
        self.metrics.cancel_steps.observe(steps)
