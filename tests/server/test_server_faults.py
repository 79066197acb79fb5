"""The server around an engine that is slow, raises, or reports new counters (a scripted engine).

The real engine is exercised in test_openai_server.py; here a small engine
with the same public surface makes timeouts and failures happen on cue, with
nothing to compile.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxmoe.errors import RequestError
from jaxmoe.families.mixtral import config
from jaxmoe.io.tokenizer import ByteTokenizer
from jaxmoe.server import ServerConfig, create_app
from jaxmoe.server.run import serve_in_thread
from jaxmoe.serving import EngineConfig, Mode
from jaxmoe.serving.requests import Request, error_response, parse_request
from jaxmoe.serving.synthetic import synthetic_store


class ScriptedEngine:
  """Engine's public surface: one token ("a") per running row per step, `step_s` per step."""

  def __init__(self, tenants, cfg: EngineConfig, on_token, step_s=0.02):
    self.tenants, self.config, self.on_token, self.step_s = tenants, cfg, on_token, step_s
    self.tokenizer = ByteTokenizer()
    self.waiting, self.rows, self.done = [], {}, []
    self.fail_next_step = False
    self.steps = 0
    self.cache_hits = 0

  def check(self, request, default_id="request"):
    r = request if isinstance(request, Request) else parse_request(request, default_id)
    if r.model not in self.tenants:
      raise RequestError(f"unknown model {r.model!r}; this store serves {self.tenants}")
    if r.prompt == "boom":
      raise KeyError("a bug in validation")
    ids = self.tokenizer.encode(r.prompt) if r.prompt is not None else list(r.prompt_ids)
    if len(ids) + r.max_tokens > self.config.max_seq_len:
      raise RequestError(f"'max_tokens'={r.max_tokens} is above the limit")
    return r, ids

  def room(self, prompt_len):
    return self.config.max_seq_len - prompt_len

  def submit(self, request, default_id="request", prompt=None):
    try:
      r, ids = (request, prompt) if prompt is not None else self.check(request)
    except RequestError as e:
      self.done.append(error_response(getattr(request, "id", "request"), None, str(e)))
      return getattr(request, "id", "request")
    self.waiting.append((r, ids, []))
    return r.id

  @property
  def has_work(self):
    return bool(self.waiting or self.rows or self.done)

  def step(self):
    time.sleep(self.step_s)
    if self.fail_next_step:
      self.fail_next_step = False
      raise RuntimeError("device lost")
    while self.waiting and len(self.rows) < self.config.max_batch:
      r, ids, toks = self.waiting.pop(0)
      self.rows[r.id] = (r, ids, toks)
    self.steps += 1
    self.cache_hits += len(self.rows)
    for rid, (r, ids, toks) in list(self.rows.items()):
      toks.append(97)
      self.on_token(rid, 97, "a")
      if len(toks) == r.max_tokens:
        del self.rows[rid]
        n = len(toks)
        self.done.append(
          {
            "id": rid,
            "object": "text_completion",
            "model": r.model,
            "text": "a" * n,
            "token_ids": list(toks),
            "finish_reason": "length",
            "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n},
            "timings": {"queue_s": 0.0, "ttft_s": 0.01, "tpot_s": 0.01, "turnaround_s": 0.01 * n},
            "error": None,
          }
        )
    out, self.done = self.done, []
    return out

  def cancel(self, rid):
    for i, (r, _, _) in enumerate(self.waiting):
      if r.id == rid:
        del self.waiting[i]
        return True
    return self.rows.pop(rid, None) is not None

  def stats(self):
    # Keys the real engine does not have yet: they must reach /metrics with no server change.
    pages = {"used": 2 * len(self.rows), "free": 16 - 2 * len(self.rows)}
    return {
      "running": len(self.rows),
      "decode_steps": self.steps,
      "expert_cache_hits": self.cache_hits,
      "kv_pages": pages,
    }

  def close(self):
    pass


@pytest.fixture(scope="module")
def served():
  store = synthetic_store(config.preset("tiny"), k=3, seed=0)
  cfg = EngineConfig(mode=Mode.SWAP, max_batch=2, max_seq_len=64)
  engines = []

  def make(on_token):
    engines.append(ScriptedEngine(store.tenants, cfg, on_token))
    return engines[0]

  app = create_app(store, cfg, ServerConfig(request_timeout_s=0.5, max_waiting=4), make_engine=make)
  with serve_in_thread(app) as url:
    yield url, app.state.server, engines[0]


def metric(url, name, **labels):
  text = httpx.get(f"{url}/metrics").text
  return sum(
    s.value
    for f in text_string_to_metric_families(text)
    for s in f.samples
    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
  )


def settled(server, engine, timeout_s=10.0):
  start = time.monotonic()
  while server.hub.pending or engine.rows or engine.waiting:
    assert time.monotonic() - start < timeout_s, "requests left behind"
    time.sleep(0.01)


def test_request_timeout_gives_504_and_drops_the_request(served):
  url, server, engine = served
  body = {"model": "tenant0", "prompt": "slow", "max_tokens": 50}  # 50 steps of 20 ms > 0.5 s
  r = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
  assert r.status_code == 504 and "timed out after 0.5 s" in r.json()["error"]["message"]
  with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=10) as s:
    data = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
  assert data[-1] == "[DONE]" and "timed out" in json.loads(data[-2])["error"]["message"]
  assert all(json.loads(d)["choices"][0]["text"] == "a" for d in data[:-2])
  settled(server, engine)
  assert metric(url, "jaxmoe_requests_total", outcome="timeout") == 2


def test_engine_failure_fails_only_what_was_in_flight(served):
  url, server, engine = served
  engine.fail_next_step = True
  r = httpx.post(f"{url}/v1/completions", json={"model": "tenant1", "prompt": "x", "max_tokens": 3}, timeout=10)
  assert r.status_code == 500 and "engine failed" in r.json()["error"]["message"]
  ok = httpx.post(f"{url}/v1/completions", json={"model": "tenant1", "prompt": "x", "max_tokens": 3}, timeout=10)
  assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "aaa"
  health = httpx.get(f"{url}/health").json()
  assert health["status"] == "ok" and health["step_failures"] == 1 and "device lost" in health["last_error"]
  assert metric(url, "jaxmoe_server_engine_step_failures") == 1
  settled(server, engine)


def test_a_bug_in_validation_is_a_500_for_that_request_only(served):
  url, server, engine = served
  r = httpx.post(f"{url}/v1/completions", json={"model": "tenant0", "prompt": "boom"}, timeout=10)
  assert r.status_code == 500 and "KeyError" in r.json()["error"]["message"]
  ok = httpx.post(f"{url}/v1/completions", json={"model": "tenant0", "prompt": "fine", "max_tokens": 2}, timeout=10)
  assert ok.status_code == 200
  settled(server, engine)


def test_every_numeric_engine_stat_is_a_gauge(served):
  url, _, engine = served
  httpx.post(f"{url}/v1/completions", json={"model": "tenant0", "prompt": "x", "max_tokens": 2}, timeout=10)
  assert metric(url, "jaxmoe_engine_expert_cache_hits") == engine.cache_hits > 0
  assert metric(url, "jaxmoe_engine_kv_pages", key="free") == 16
  assert metric(url, "jaxmoe_engine_decode_steps") == engine.steps


def test_swap_mode_reports_the_resident_backbone(served):
  url, _, _ = served
  httpx.post(f"{url}/v1/completions", json={"model": "tenant2", "prompt": "x", "max_tokens": 2}, timeout=10)
  cards = {m["id"]: m["jaxmoe"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
  assert [t for t, c in cards.items() if c["resident"]] == ["tenant2"]
  assert [metric(url, "jaxmoe_tenant_resident", model=t) for t in cards] == [0, 0, 1]
  assert metric(url, "jaxmoe_device_backbone_bytes", model="tenant0") == 0
  assert metric(url, "jaxmoe_device_backbone_bytes", model="tenant2") > 0
  assert all(c["quality_drift"] is None and c["base_tenant"] is None for c in cards.values())


def test_stream_interval_sends_fewer_events_with_the_same_text():
  store = synthetic_store(config.preset("tiny"), k=2, seed=0)
  cfg = EngineConfig(mode=Mode.MIXED, max_batch=2, max_seq_len=64)
  app = create_app(
    store,
    cfg,
    ServerConfig(stream_interval_s=0.1),
    make_engine=lambda on_token: ScriptedEngine(store.tenants, cfg, on_token),
  )
  body = {"model": "tenant1", "prompt": "x", "max_tokens": 30, "stream": True}  # 30 steps of 20 ms
  with serve_in_thread(app) as url, httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as s:
    data = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
  assert "".join(d["choices"][0]["text"] for d in data) == "a" * 30
  assert len(data[0]["choices"][0]["token_ids"]) <= 2  # the first event is not held back
  assert 3 <= len(data) <= 12  # ~0.6 s of steps at one event per 0.1 s (+ the final chunk), not 31


def test_streams_carry_keep_alive_comments_between_tokens():
  store = synthetic_store(config.preset("tiny"), k=2, seed=0)
  cfg = EngineConfig(mode=Mode.MIXED, max_batch=2, max_seq_len=64)
  app = create_app(
    store, cfg, ServerConfig(sse_ping_s=0.05), make_engine=lambda on_token: ScriptedEngine(store.tenants, cfg, on_token)
  )
  body = {"model": "tenant0", "prompt": "x", "max_tokens": 25, "stream": True}  # 25 steps of 20 ms
  with serve_in_thread(app) as url, httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=10) as s:
    lines = [line for line in s.iter_lines() if line]
  data = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
  assert "".join(d["choices"][0]["text"] for d in data) == "a" * 25
  assert sum(line == ": ping" for line in lines) >= 3 and lines[-1] == "data: [DONE]"


def _run_stream(chunks, send, receive, send_timeout_s=0.2):
  import asyncio

  from jaxmoe.server.answer import EventStream

  closed = []

  async def main():
    start = time.monotonic()
    await EventStream(chunks, send_timeout_s, lambda: closed.append(True))({"type": "http"}, receive, send)
    return time.monotonic() - start

  return asyncio.run(main()), closed


def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout():
  import asyncio

  finalized, sent = [], []

  async def chunks():
    try:
      for _ in range(100):
        yield b"data: {}\r\n\r\n"
    finally:
      finalized.append(True)

  async def send(message):  # the client reads the headers, then nothing more
    sent.append(message["type"])
    if message["type"] == "http.response.body":
      await asyncio.Event().wait()

  async def receive():
    await asyncio.Event().wait()

  seconds, closed = _run_stream(chunks(), send, receive)
  assert seconds < 2 and closed == [True] and finalized == [True]
  assert sent == ["http.response.start", "http.response.body"]


def test_a_disconnect_ends_a_stream_that_waits_for_tokens():
  import asyncio

  finalized = []

  async def chunks():
    try:
      yield b"data: {}\r\n\r\n"
      await asyncio.Event().wait()  # no more tokens come
      yield b"never"
    finally:
      finalized.append(True)

  async def send(message):
    pass

  async def receive():
    await asyncio.sleep(0.1)
    return {"type": "http.disconnect"}

  seconds, closed = _run_stream(chunks(), send, receive, send_timeout_s=30)
  assert seconds < 2 and closed == [True] and finalized == [True]
