"""Answering one accepted request: a JSON body, or a stream of server-sent events.

Both watch the client: a disconnect (the SSE response notices it itself; a
plain request through a watcher on `receive`) closes the request in the hub,
which cancels it in the engine before its next step. Both end at the
request's deadline with a 504 (a streamed error event once the stream has
begun).
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.responses import Response

from jaxmoe.server import protocol
from jaxmoe.server.errors import APIError, error_body


class ClientGone(Exception):
  """The client disconnected before its answer was ready."""


def _dumps(obj) -> str:
  return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _engine_error(response: dict) -> APIError:
  """An engine response with finish_reason "error": its message, 400 if the request was at fault."""
  error = response.get("error") or {}
  status = 400 if error.get("type") == "invalid_request_error" else 500
  return APIError(status, error.get("message") or "the engine could not serve this request", counted=True)


async def _watch_disconnect(receive, on_gone) -> None:
  while True:
    message = await receive()
    if message["type"] == "http.disconnect":
      on_gone()
      return


async def wait_response(hub, p, receive, timeout_s: float) -> dict:
  """The finished engine response of `p`; raises APIError on timeout, failure or engine error, and
  ClientGone if the client disconnects first."""
  watcher = asyncio.ensure_future(_watch_disconnect(receive, lambda: p.push("gone", None)))
  try:
    while True:
      try:
        events = await p.next_events()
      except TimeoutError:
        hub.close(p, "timeout")
        raise APIError(504, f"the request timed out after {timeout_s:g} s", "timeout", counted=True) from None
      for kind, payload in events:
        if kind == "done":
          if payload["error"] is not None:
            raise _engine_error(payload)
          return payload
        if kind == "failed":
          raise APIError(500, payload, "engine_failure", counted=True)
        if kind == "gone":
          hub.close(p, "cancelled")
          raise ClientGone
  finally:
    watcher.cancel()
    hub.close(p)


class StreamWriter:
  """SSE chunks of one request, completion or chat shaped."""

  def __init__(self, p, chat: bool, include_usage: bool):
    self.p, self.chat, self.include_usage = p, chat, include_usage
    self.created = int(time.time())
    self.first = True

  def chunk(self, text: str, token_ids: list[int], finish_reason=None) -> str:
    p = self.p
    if self.chat:
      body = protocol.chat_chunk(p.rid, self.created, p.model, text, token_ids, finish_reason, self.first)
    else:
      body = protocol.completion_chunk(p.rid, self.created, p.model, text, token_ids, finish_reason)
    self.first = False
    return _dumps(body)

  def final(self, response: dict) -> list[str]:
    out = [self.chunk(self.p.text.finish(response["text"]), [], response["finish_reason"])]
    if self.include_usage:
      obj = "chat.completion.chunk" if self.chat else "text_completion"
      out.append(_dumps(protocol.usage_chunk(self.p.rid, self.created, self.p.model, obj, response["usage"])))
    return out


def _sse(data: list[str]) -> bytes:
  """Server-sent events, pre-formatted: the response writes bytes as they are, in one send."""
  return b"".join(b"data: " + d.encode() + b"\r\n\r\n" for d in data)


def _stream_batch(hub, p, writer: StreamWriter, events: list) -> tuple[list[str], bool]:
  """SSE data for one wake-up's events (tokens of several steps merged into one chunk); done?"""
  out, tokens, text = [], [], ""
  for kind, payload in events:
    if kind == "tokens":
      tokens += payload[0]
      text += payload[1]
      continue
    if tokens:
      out.append(writer.chunk(p.text.push(text), tokens))
      tokens, text = [], ""
    if kind == "done":
      out += writer.final(payload) if payload["error"] is None else [_dumps(_engine_error(payload).body())]
      return out, True
    if kind == "failed":
      return out + [_dumps(error_body(500, payload, "engine_failure"))], True
  if tokens:
    out.append(writer.chunk(p.text.push(text), tokens))
  return out, False


PING = b": ping\r\n\r\n"  # an SSE comment: keeps idle connections (and proxies) open


async def _events(hub, p, writer: StreamWriter, timeout_s: float, interval_s: float, ping_s: float):
  try:
    p.start_pings(ping_s)
    done, first = False, True
    while not done:
      if interval_s > 0 and not first:
        await asyncio.sleep(interval_s)  # let the engine's steps pile up: one send for several
      first = False
      try:
        events = await p.next_events()
      except TimeoutError:
        hub.close(p, "timeout")
        yield _sse([_dumps(error_body(504, f"the request timed out after {timeout_s:g} s", "timeout")), "[DONE]"])
        return
      if not events:
        yield PING
        continue
      data, done = _stream_batch(hub, p, writer, events)
      if data or done:
        yield _sse(data + ["[DONE]"] if done else data)
  finally:  # also when the client disconnects: the response closes this generator
    hub.close(p)


class EventStream(Response):
  """An ASGI response sending the byte chunks of an async generator as they come (server-sent events).

  Not sse-starlette's EventSourceResponse: that opens an anyio cancel scope
  around every send, and an event per engine step makes sending the server's
  hot path. Plain asyncio instead: one task watches for the client's
  disconnect and one timer for a send that has waited longer than
  `send_timeout_s` (a client that stopped reading); either cancels the stream,
  and `on_close` always runs.
  """

  media_type = "text/event-stream"

  def __init__(self, chunks, send_timeout_s: float, on_close):
    super().__init__()  # a Response to FastAPI; the body is sent by __call__
    self.chunks, self.send_timeout_s, self.on_close = chunks, send_timeout_s, on_close
    self.sending_since: float | None = None
    self.stopped: str | None = None

  async def __call__(self, scope, receive, send):
    loop, task = asyncio.get_running_loop(), asyncio.current_task()

    def stop(why: str) -> None:
      if self.stopped is None:
        self.stopped = why
        task.cancel()

    def check_send() -> None:
      nonlocal watchdog
      since = self.sending_since
      if since is not None and loop.time() - since > self.send_timeout_s:
        stop("send timed out")
      else:
        watchdog = loop.call_later(self.send_timeout_s / 2, check_send)

    async def watch_disconnect() -> None:
      while (await receive())["type"] != "http.disconnect":
        pass
      stop("client disconnected")

    watcher = asyncio.ensure_future(watch_disconnect())
    watchdog = loop.call_later(self.send_timeout_s / 2, check_send)
    headers = [
      (b"content-type", b"text/event-stream; charset=utf-8"),
      (b"cache-control", b"no-cache"),
      (b"x-accel-buffering", b"no"),
    ]
    try:
      await send({"type": "http.response.start", "status": 200, "headers": headers})
      async for chunk in self.chunks:
        self.sending_since = loop.time()
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        self.sending_since = None
      await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
      if self.stopped is None:  # the server is shutting down: not ours to swallow
        raise
      if hasattr(task, "uncancel"):  # Python >= 3.11: the cancel was ours and is handled
        task.uncancel()
    except OSError:  # the connection broke under a send
      pass
    finally:
      watcher.cancel()
      watchdog.cancel()
      await self.chunks.aclose()
      self.on_close()


def stream_response(hub, p, chat: bool, include_usage: bool, timeout_s: float, cfg) -> EventStream:
  """The SSE answer of `p` under the ServerConfig `cfg` (pings, event interval, send timeout)."""
  events = _events(hub, p, StreamWriter(p, chat, include_usage), timeout_s, cfg.stream_interval_s, cfg.sse_ping_s)
  # A stream the client left before it began never runs the generator's `finally`: close here too.
  return EventStream(events, cfg.send_timeout_s, lambda: hub.close(p))
