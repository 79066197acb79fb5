"""jaxmoe-server end to end: the official openai client against a server on a free loopback port.

One server per module (mixed mode, 2 rows, an API key). Each tenant's greedy
output through the server must equal its own model's `generate`, streamed or
not, for completions and chat. Prompts stay within 8 tokens (one prompt
bucket) and prompt + max_tokens within 64 (one `generate` cache length), so
the module compiles few programs.
"""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import jaxmoe
from jaxmoe.server import ServerConfig, create_app
from jaxmoe.server.run import serve_in_thread
from jaxmoe.serving import EngineConfig, Mode
from tests.server.conftest import QUALITY

KEY = "sk-test-key"
MAX_SEQ = 256


@pytest.fixture(scope="module")
def store(store_dir):
  return jaxmoe.load_store(store_dir)


@pytest.fixture(scope="module")
def served(store):
  app = create_app(
    store, EngineConfig(mode=Mode.MIXED, max_batch=2, max_seq_len=MAX_SEQ), ServerConfig(api_key=KEY, max_waiting=6)
  )
  with serve_in_thread(app) as url:
    yield url, app.state.server


@pytest.fixture(scope="module")
def client(served):
  return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def want(store, tenant: str, ids: list[int], n: int) -> list[int]:
  """The tenant's own greedy continuation, cut after EOS like the engine."""
  model = store.model(tenant)
  new = model.new_tokens(model.generate(np.array([ids]), n)[0], len(ids)).tolist()
  eos = store.config.eos_token_id
  return new[: new.index(eos) + 1] if eos in new else new


def test_completions_equal_each_tenants_generate(store, client):
  jobs = [(t, f"hi {t[-1]}") for t in store.tenants] + [(t, [256, 40 + i, 41]) for i, t in enumerate(store.tenants)]

  def ask(job):
    return client.completions.create(model=job[0], prompt=job[1], max_tokens=12, temperature=0)

  with cf.ThreadPoolExecutor(len(jobs)) as pool:  # concurrently: the batch mixes tenants
    results = list(pool.map(ask, jobs))
  for (tenant, prompt), r in zip(jobs, results):
    ids = store.model(tenant).encode(prompt) if isinstance(prompt, str) else prompt
    expected = want(store, tenant, ids, 12)
    choice = r.choices[0]
    assert r.model == tenant and r.object == "text_completion"
    assert choice.model_extra["token_ids"] == expected, (tenant, prompt)
    assert choice.text == store.model(tenant).decode(expected)
    assert choice.finish_reason == ("stop" if len(expected) < 12 else "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(expected)


def test_streaming_equals_generate_with_usage_last(store, client):
  for tenant in store.tenants:
    ids = store.model(tenant).encode("stream")
    expected = want(store, tenant, ids, 20)
    chunks = list(
      client.completions.create(
        model=tenant, prompt="stream", max_tokens=20, stream=True, stream_options={"include_usage": True}
      )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]]
    assert tokens == expected and text == store.model(tenant).decode(expected)
    # Events as the engine steps, not one at the end (a client that reads late gets several steps'
    # tokens in one event, so how many depends on the machine's load).
    assert sum(bool(c.choices and c.choices[0].model_extra["token_ids"]) for c in chunks) > 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)
    assert [c.choices[0].finish_reason for c in chunks[-2:-1]] == ["stop" if len(expected) < 20 else "length"]


def test_stop_string_cuts_streamed_and_plain_text_alike(store, client):
  tenant = store.tenants[1]
  ids = store.model(tenant).encode("stop it")
  full = store.model(tenant).decode(want(store, tenant, ids, 24))
  starts = [k for k in range(2, len(full) - 2) if "\ufffd" not in full[k : k + 2]]
  assert starts, full
  stop = full[starts[0] : starts[0] + 2]
  plain = client.completions.create(model=tenant, prompt="stop it", max_tokens=24, stop=[stop])
  streamed = client.completions.create(model=tenant, prompt="stop it", max_tokens=24, stop=stop, stream=True)
  text = "".join(c.choices[0].text for c in streamed)
  assert plain.choices[0].text == text == full[: full.find(stop)]
  assert plain.choices[0].finish_reason == "stop"


def test_chat_renders_each_tenants_template(store, client):
  messages = [{"role": "user", "content": "h"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "o"}]
  rendered = {"tenant0": "uhayuo>", "tenant1": "H1Y2O3?"}
  for tenant, text in rendered.items():
    expected = want(store, tenant, store.model(tenant).encode(text), 10)
    r = client.chat.completions.create(model=tenant, messages=messages, max_tokens=10)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].model_extra["token_ids"] == expected, tenant
    assert r.choices[0].message.content == store.model(tenant).decode(expected)
    parts = list(client.chat.completions.create(model=tenant, messages=messages, max_tokens=10, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == r.choices[0].message.content


def test_chat_without_max_tokens_fills_the_context(store, client):
  r = client.chat.completions.create(model="tenant0", messages=[{"role": "user", "content": "l"}])
  assert r.usage.total_tokens == MAX_SEQ or r.choices[0].finish_reason == "stop"


def test_chat_errors_are_400s(client):
  with pytest.raises(openai.BadRequestError, match="has no chat template"):
    client.chat.completions.create(model="tenant2", messages=[{"role": "user", "content": "x"}])
  with pytest.raises(openai.BadRequestError, match="system messages are not allowed"):
    client.chat.completions.create(
      model="tenant1", messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]
    )
  with pytest.raises(openai.NotFoundError, match="unknown model 'ghost'"):
    client.chat.completions.create(model="ghost", messages=[{"role": "user", "content": "x"}])


def test_models_list_every_tenant_with_its_lineage(store, client):
  cards = {m.id: m.model_extra["jaxmoe"] for m in client.models.list()}
  assert list(cards) == store.tenants
  maps = {t: np.asarray(store.slot_maps[t]) for t in store.tenants}
  for t, card in cards.items():
    others = [maps[u] for u in store.tenants if u != t]
    shared = np.mean(
      [
        [any(m[l, e] == maps[t][l, e] for m in others) for e in range(maps[t].shape[1])]
        for l in range(maps[t].shape[0])
      ]
    )
    assert card["shared_expert_fraction"] == pytest.approx(shared)
    assert card["architecture"] == "mixtral" and card["resident"] is True and card["mode"] == "mixed"
    assert card["consolidated_with"] == [u for u in store.tenants if u != t]
    assert card["quality_drift"] == QUALITY.get(t)
  assert 0 < max(c["shared_expert_fraction"] for c in cards.values()) < 1
  assert client.models.retrieve("tenant1").id == "tenant1"
  with pytest.raises(openai.NotFoundError):
    client.models.retrieve("ghost")


def raw(body: str) -> dict:
  """httpx kwargs posting `body` as it is (JSON that json= would refuse or rewrite)."""
  return {"content": body.encode(), "headers": {"content-type": "application/json"}}


def bad_requests(url: str) -> list[tuple]:
  """(method, path, kwargs for httpx, expected status, a piece of the expected message)."""
  c, chat = f"{url}/v1/completions", f"{url}/v1/chat/completions"
  ok = {"model": "tenant0", "prompt": "x"}
  long = "y" * MAX_SEQ
  return [
    ("POST", c, {"json": {"model": "nobody", "prompt": "x"}}, 404, "unknown model 'nobody'"),
    ("POST", c, {"json": {**ok, "max_tokens": -1}}, 400, "'max_tokens' must be >= 1"),
    ("POST", c, {"json": {**ok, "max_tokens": 1000}}, 400, "is above the limit"),
    ("POST", c, {"json": {**ok, "prompt": long}}, 400, "the maximum is"),
    ("POST", c, {"json": {**ok, "temperature": "hot"}}, 400, "'temperature' must be a number"),
    ("POST", c, {"json": {**ok, "top_p": 2}}, 400, "'top_p' must be in (0, 1]"),
    ("POST", c, {"json": {**ok, "stop": 5}}, 400, "'stop' must be"),
    ("POST", c, {"json": {**ok, "seed": -1}}, 400, "'seed' must be in"),
    ("POST", c, {"json": {**ok, "n": 2}}, 400, "'n' other than 1"),
    ("POST", c, {"json": {**ok, "logprobs": 2}}, 400, "'logprobs'"),
    ("POST", c, {"json": {**ok, "echo": True}}, 400, "'echo' true is not supported"),
    ("POST", c, {"json": {**ok, "best_of": 3}}, 400, "'best_of'"),
    ("POST", c, {"json": {**ok, "presence_penalty": 0.5}}, 400, "'presence_penalty'"),
    ("POST", c, {"json": {**ok, "stream_options": {"include_usage": True}}}, 400, "only allowed when 'stream'"),
    ("POST", c, {"json": {**ok, "stream": "often"}}, 400, "'stream'"),
    ("POST", c, {"json": {**ok, "max_new_tokens": 4}}, 400, "unknown field 'max_new_tokens'"),
    ("POST", c, {"json": {"model": "tenant0"}}, 400, "'prompt' is required"),
    ("POST", c, {"json": {**ok, "prompt": ["a", "b"]}}, 400, "batched prompts are not supported"),
    ("POST", c, {"json": {**ok, "prompt": [1, 9999]}}, 400, "out of the vocabulary"),
    ("POST", c, {"json": {**ok, "prompt": ""}}, 400, "'prompt' is empty"),
    ("POST", c, {"json": {**ok, "prompt": 7}}, 400, "'prompt' must be a string"),
    ("POST", c, {"json": {"prompt": "x"}}, 400, "'model' (the tenant name) is required"),
    (
      "POST",
      c,
      {"content": b'{"model": "tenant0", "prompt": ', "headers": {"content-type": "application/json"}},
      400,
      "not valid JSON",
    ),
    ("POST", c, {"content": b"[1, 2]", "headers": {"content-type": "application/json"}}, 400, "must be a JSON object"),
    (
      "POST",
      c,
      {"content": b'{"model": "tenant0", "prompt": "caf\xe9"}', "headers": {"content-type": "application/json"}},
      400,
      "not valid UTF-8",
    ),
    ("POST", c, raw('{"model": "tenant0", "prompt": "x", "temperature": NaN}'), 400, "must be a finite number"),
    ("POST", c, raw('{"model": "tenant0", "prompt": "x", "top_p": Infinity}'), 400, "must be a finite number"),
    ("POST", c, raw('{"model": "tenant0", "prompt": "ab\\ud800cd"}'), 400, "lone UTF-16 surrogate"),
    ("POST", c, raw('{"model": "tenant0", "prompt": "x", "max_tokens": ' + "9" * 5000 + "}"), 400, "not usable JSON"),
    ("POST", c, raw("[" * 100_000 + "]" * 100_000), 400, "nested too deep"),
    ("POST", c, {"json": {**ok, "stop": False}}, 400, "'stop' must be"),
    ("POST", c, {"json": {**ok, "stop": ""}}, 400, "'stop' must be"),
    ("POST", c, {"json": {**ok, "seed": 2**40}}, 400, "'seed' must be in"),
    ("POST", c, {"json": {**ok, "prompt": "z" * (1 << 20)}}, 413, "over the limit"),
    (
      "POST",
      c,
      {"content": iter([b'{"prompt": "', b"z" * (1 << 20), b'"}']), "headers": {"content-type": "application/json"}},
      413,
      "over the limit",
    ),
    ("POST", chat, {"json": {"model": "tenant0", "messages": []}}, 400, "at least one message"),
    (
      "POST",
      chat,
      {"json": {"model": "tenant0", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}},
      400,
      "only text content",
    ),
    (
      "POST",
      chat,
      {"json": {"model": "tenant0", "messages": [{"role": "user", "content": "x"}], "tools": [{}]}},
      400,
      "'tools'",
    ),
    (
      "POST",
      chat,
      {"json": {"model": "tenant0", "messages": [{"content": "x"}]}},
      400,
      "'messages.0.role' is required",
    ),
    ("POST", chat, {"json": {"model": "tenant0", "messages": [{"role": "user"}]}}, 400, "'content' is required"),
    ("POST", c, {"json": {**ok, "temperature": 1e39}}, 400, "'temperature' must be at most"),
    ("GET", f"{url}/v1/nothing", {}, 404, "no route"),
    ("GET", c, {}, 405, "Method Not Allowed"),
    ("POST", c, {"json": ok, "headers": {"authorization": ""}}, 401, "API key"),
    ("POST", c, {"json": ok, "headers": {"authorization": "Bearer wrong"}}, 401, "API key"),
  ]


def test_bad_requests_get_openai_errors_while_good_ones_are_served(store, served, client):
  url = served[0]
  cases = bad_requests(url)
  good = [(t, f"good {i}") for i, t in enumerate(store.tenants * 2)]

  def bad(case):
    method, path, kwargs, _, _ = case
    headers = {"authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
    return httpx.request(method, path, headers=headers, timeout=60, **kwargs)

  with cf.ThreadPoolExecutor(8) as pool:
    good_futures = [pool.submit(client.completions.create, model=t, prompt=p, max_tokens=8) for t, p in good]
    answers = list(pool.map(bad, [(m, p, dict(k), s, e) for m, p, k, s, e in cases]))
    good_results = [f.result() for f in good_futures]
  for (_, path, _, status, piece), r in zip(cases, answers):
    assert r.status_code == status, (path, piece, r.status_code, r.text)
    error = r.json()["error"]
    assert piece in error["message"] and error["type"], (piece, error)
  for (tenant, prompt), r in zip(good, good_results):
    assert r.choices[0].model_extra["token_ids"] == want(store, tenant, store.model(tenant).encode(prompt), 8)


def metric(url: str, name: str, **labels) -> float:
  """The sum of the /metrics samples `name` with these labels (0 when none), parsed with prometheus_client."""
  text = httpx.get(f"{url}/metrics").text
  return sum(
    s.value
    for family in text_string_to_metric_families(text)
    for s in family.samples
    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
  )


def wait_until(predicate, timeout_s: float = 30.0) -> None:
  start = time.monotonic()
  while not predicate():
    assert time.monotonic() - start < timeout_s, "timed out waiting"
    time.sleep(0.01)


def test_disconnect_frees_the_row_within_one_decode_step(store, served):
  url, server = served
  headers = {"authorization": f"Bearer {KEY}"}
  before = metric(url, "jaxmoe_generated_tokens_total", model="tenant2")
  body = {"model": "tenant2", "prompt": "go on", "max_tokens": MAX_SEQ - 16, "stream": True}
  with httpx.Client(timeout=60) as h, h.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
    assert r.status_code == 200
    events = 0
    for line in r.iter_lines():
      events += line.startswith("data: {")
      if events == 3:
        break  # leaving the block closes the connection mid-stream
  wait_until(lambda: not server.hub.pending and server.loop.stats["running"] == 0)
  assert metric(url, "jaxmoe_cancel_decode_steps_count") == 1
  assert metric(url, "jaxmoe_cancel_decode_steps_bucket", le="1.0") == 1  # freed at the next step
  assert metric(url, "jaxmoe_requests_total", model="tenant2", outcome="cancelled") == 1
  generated = metric(url, "jaxmoe_generated_tokens_total", model="tenant2") - before
  assert 3 <= generated < MAX_SEQ - 16
  # A plain (non-streamed) request whose client gives up is dropped as well. With its programs compiled
  # the request's 240 steps take some 0.1-0.3 s here: the client gives up well before.
  with pytest.raises(httpx.TimeoutException):
    httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, headers=headers, timeout=0.03)
  wait_until(lambda: metric(url, "jaxmoe_requests_total", model="tenant2", outcome="cancelled") == 2)
  wait_until(lambda: not server.hub.pending and server.loop.stats["running"] == 0)
  assert metric(url, "jaxmoe_cancel_decode_steps_bucket", le="1.0") == 2


def test_queue_full_answers_429_and_serves_the_rest(store, served):
  url, server = served
  headers = {"authorization": f"Bearer {KEY}"}
  body = {"model": "tenant1", "prompt": "queue", "max_tokens": 40}
  with cf.ThreadPoolExecutor(24) as pool:
    answers = list(
      pool.map(lambda _: httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120), range(24))
    )
  codes = [r.status_code for r in answers]
  assert set(codes) == {200, 429} and codes.count(200) >= server.config.max_waiting, codes
  assert all("waiting queue is full" in r.json()["error"]["message"] for r in answers if r.status_code == 429)
  expected = want(store, "tenant1", store.model("tenant1").encode("queue"), 40)
  assert all(r.json()["choices"][0]["token_ids"] == expected for r in answers if r.status_code == 200)
  assert metric(url, "jaxmoe_requests_total", model="tenant1", outcome="rejected") == codes.count(429)


def test_metrics_parse_with_counts_histograms_and_every_engine_stat(store, served, client):
  url, server = served
  for t in store.tenants:
    client.completions.create(model=t, prompt="metrics", max_tokens=4)
  families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
  for key, value in server.loop.stats.items():
    if isinstance(value, (int, float)):
      assert f"jaxmoe_engine_{key}" in families, key
  for t in store.tenants:
    served = sum(
      metric(url, "jaxmoe_requests_total", model=t, endpoint="completions", outcome=o) for o in ("stop", "length")
    )
    assert served >= 1
    assert metric(url, "jaxmoe_time_to_first_token_seconds_count", model=t) >= 1
    assert metric(url, "jaxmoe_time_to_first_token_seconds_bucket", model=t, le="+Inf") >= 1
    assert metric(url, "jaxmoe_time_per_output_token_seconds_count", model=t) >= 1
    assert metric(url, "jaxmoe_request_turnaround_seconds_count", model=t) >= 1
    assert metric(url, "jaxmoe_tenant_resident", model=t) == 1
  assert metric(url, "jaxmoe_requests_total", model="unknown", outcome="not_found") >= 1
  assert metric(url, "jaxmoe_http_errors_total", status="413") >= 2
  assert metric(url, "jaxmoe_engine_device_weight_bytes") > metric(url, "jaxmoe_device_pool_bytes") > 0
  assert metric(url, "jaxmoe_server_engine_alive") == 1


def test_health_is_open_and_reports_the_engine(served):
  r = httpx.get(f"{served[0]}/health")
  assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["mode"] == "mixed"
