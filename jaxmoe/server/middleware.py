"""ASGI middleware in front of every route: the API key, then the body size limit.

Both answer with OpenAI-style JSON errors before a handler runs. The body is
read here (at most the limit plus one chunk) and replayed to the app, so a
body without Content-Length (chunked) is bounded too; after the replay the
app's `receive` is the server's again, so handlers still see the client
disconnect.
"""

from __future__ import annotations

import hmac

from jaxmoe.server.errors import APIError

PUBLIC = ("/health", "/metrics")  # scraped by monitors, which carry no API key


class Guard:
  """Refuses requests without the bearer key (401) and bodies over `max_body_bytes` (413)."""

  def __init__(self, app, api_key: str | None, max_body_bytes: int, on_error=None):
    self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes
    self.on_error = on_error or (lambda path, status: None)

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    if self.api_key is not None and scope.get("path") not in PUBLIC and not self._authorized(headers):
      return await self._refuse(
        scope,
        receive,
        send,
        APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key"),
      )
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
      return await self._refuse(scope, receive, send, self._too_large())
    if scope.get("method") not in ("POST", "PUT", "PATCH"):
      return await self.app(scope, receive, send)
    body, more = bytearray(), True
    while more:
      message = await receive()
      if message["type"] == "http.disconnect":
        return  # the client left before sending its body: nothing to answer
      body += message.get("body", b"")
      more = message.get("more_body", False)
      if len(body) > self.max_body_bytes:
        return await self._refuse(scope, receive, send, self._too_large())
    return await self.app(scope, _replay(bytes(body), receive), send)

  def _authorized(self, headers: dict) -> bool:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

  def _too_large(self) -> APIError:
    return APIError(413, f"request body is over the limit of {self.max_body_bytes} bytes", "body_too_large")

  async def _refuse(self, scope, receive, send, error: APIError):
    self.on_error(scope.get("path", ""), error.status)
    await error.response()(scope, receive, send)


def _replay(body: bytes, receive):
  sent = False

  async def replay():
    nonlocal sent
    if not sent:
      sent = True
      return {"type": "http.request", "body": body, "more_body": False}
    return await receive()

  return replay
