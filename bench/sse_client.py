"""The streaming side of bench/server_load.py: a lean HTTP/1.1 SSE client and what it measures.

`Connection` speaks just enough HTTP/1.1 (keep-alive, chunked bodies) for the
OpenAI streaming endpoints; `send_good` sends one streaming request over it and
records its tokens, TTFT and TPOT in a `Load`.
"""

from __future__ import annotations

import asyncio
import json
import time


class Load:
  """What the HTTP clients measured."""

  def __init__(self, timed_from: float, end: float):
    self.timed_from, self.end = timed_from, end
    self.next, self.good, self.bad = 0, 0, 0
    self.tokens = 0  # streamed tokens that arrived in the timed window
    self.ttft, self.tpot, self.failures, self.mismatched = [], [], [], []
    self.served, self.answered_bad = 0, 0
    self.token_ids: dict[int, list[int]] = {}

  def timed(self, t: float) -> bool:
    return self.timed_from <= t < self.end


class Connection:
  """A lean keep-alive HTTP/1.1 client for one streaming client: SSE over chunked encoding.

  httpx costs several times more CPU per event; on a 2-core machine the load generator's CPU is
  taken from the server, so the streaming clients use this and only the bad requests use httpx.
  """

  def __init__(self, host: str, port: int, key: str):
    self.host, self.port, self.key = host, port, key
    self.reader = self.writer = None

  async def post(self, path: str, body: dict) -> tuple[int, dict]:
    if self.writer is None:
      self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
    data = json.dumps(body).encode()
    head = (
      f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {self.key}\r\n"
      f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    self.writer.write(head.encode() + data)
    status = int((await self.reader.readline()).split()[1])
    headers = {}
    while (line := await self.reader.readline()) not in (b"\r\n", b""):
      name, _, value = line.decode("latin-1").partition(":")
      headers[name.strip().lower()] = value.strip()
    return status, headers

  async def chunks(self, headers: dict):
    """The response body's chunks (or its whole body when it has a Content-Length)."""
    if "content-length" in headers:
      yield await self.reader.readexactly(int(headers["content-length"]))
      return
    while True:
      size = int((await self.reader.readline()).split(b";")[0], 16)
      if size == 0:
        await self.reader.readline()
        return
      yield (await self.reader.readexactly(size + 2))[:-2]

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
    self.reader = self.writer = None


async def send_good(conn: Connection, g: int, body: tuple, load: Load) -> None:
  endpoint, payload = body
  path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
  start, first, last, ids, done = time.perf_counter(), None, None, [], False
  try:
    status, headers = await conn.post(path, {**payload, "stream": True})
    if status != 200:
      body = b"".join([c async for c in conn.chunks(headers)])
      load.failures.append((g, status, body[:200].decode(errors="replace")))
      return
    buffer = b""
    async for chunk in conn.chunks(headers):
      buffer += chunk
      *lines, buffer = buffer.split(b"\n")
      for line in lines:
        if not line.startswith(b"data: "):
          continue
        if line.strip() == b"data: [DONE]":
          done = True
          continue
        event = json.loads(line[6:])
        if "error" in event:
          load.failures.append((g, "error event", event["error"]["message"]))
          continue
        new = event["choices"][0]["token_ids"] if event["choices"] else []
        if new:
          now = time.perf_counter()
          first, last = first or now, now
          ids += new
          load.tokens += len(new) if load.timed(now) else 0
    if headers.get("connection", "").lower() == "close":
      conn.close()
  except Exception as e:  # a good request must not fail: record it
    conn.close()
    load.failures.append((g, type(e).__name__, str(e)[:200]))
    return
  if not done:
    load.failures.append((g, "no [DONE]", ""))
    return
  if load.timed(start) and load.timed(time.perf_counter()):  # started and finished in the window
    load.served += 1
    load.token_ids[g] = ids
    if first is not None:
      load.ttft.append(first - start)
    if len(ids) > 1:
      load.tpot.append((last - first) / (len(ids) - 1))
