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

from sse_starlette import EventSourceResponse

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


async def wait_response(hub, p, receive, deadline: float, timeout_s: float) -> dict:
  """The finished engine response of `p`; raises APIError on timeout, failure or engine error, and
  ClientGone if the client disconnects first."""
  watcher = asyncio.ensure_future(_watch_disconnect(receive, lambda: p.push("gone", None)))
  try:
    while True:
      try:
        events = await p.next_events(deadline)
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


async def _events(hub, p, writer: StreamWriter, deadline: float, timeout_s: float):
  try:
    done = False
    while not done:
      try:
        events = await p.next_events(deadline)
      except TimeoutError:
        hub.close(p, "timeout")
        yield _dumps(error_body(504, f"the request timed out after {timeout_s:g} s", "timeout"))
        break
      for kind, payload in events:
        if kind == "tokens":
          yield writer.chunk(p.text.push(payload), payload)
        elif kind == "done":
          done = True
          if payload["error"] is not None:
            e = _engine_error(payload)
            yield _dumps(e.body())
          else:
            for chunk in writer.final(payload):
              yield chunk
        elif kind == "failed":
          done = True
          yield _dumps(error_body(500, payload, "engine_failure"))
    yield "[DONE]"
  finally:  # also when the client disconnects: the response cancels this generator
    hub.close(p)


def stream_response(hub, p, chat: bool, include_usage: bool, deadline: float, timeout_s: float, ping_s: float):
  writer = StreamWriter(p, chat, include_usage)
  return EventSourceResponse(
    _events(hub, p, writer, deadline, timeout_s),
    ping=ping_s,
    send_timeout=30.0,  # a client that stops reading is dropped, and its row freed
    headers={"Cache-Control": "no-cache"},
  )
