"""Serving engine: every mode equals each tenant's own model; batching, scheduling, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe.families.mixtral import MixtralModel as Model
from jaxmoe.families.mixtral import config
from jaxmoe.serving import Engine, EngineConfig, Mode
from jaxmoe.serving.engine import compilations
from jaxmoe.serving.synthetic import synthetic_store

MAX_SEQ = 32


@pytest.fixture(scope="module")
def store():
  return synthetic_store(config.preset("tiny"), k=3, seed=1, own_fraction=0.5, noise=0.05)


@pytest.fixture(scope="module")
def tenant_models(store):
  return {t: Model(store.config, store.params(t)) for t in store.tenants}


def interleaved(store, n, seed=0, max_prompt=8, max_tokens=10):
  rng = np.random.default_rng(seed)
  return [
    {
      "id": f"r{i}",
      "model": store.tenants[i % len(store.tenants)],
      "prompt_ids": rng.integers(0, 256, int(rng.integers(1, max_prompt + 1))).tolist(),
      "max_tokens": int(rng.integers(1, max_tokens + 1)),
    }
    for i in range(n)
  ]


def serve(store, reqs, **kw):
  """Serves `reqs` to the end; pages of 4 positions, so rows cross page boundaries all the time."""
  engine = Engine(store, EngineConfig(max_seq_len=MAX_SEQ, page_size=4, **kw))
  for r in reqs:
    engine.submit(r)
  out = engine.run_until_done()
  assert len(out) == len(reqs) and {o["id"] for o in out} == {r["id"] for r in reqs}
  return {o["id"]: o for o in out}, engine


@pytest.mark.parametrize("mode", list(Mode))
def test_every_mode_equals_each_tenants_own_generate(store, tenant_models, mode):
  reqs = interleaved(store, 14)
  out, engine = serve(store, reqs, mode=mode, max_batch=4)
  for r in reqs:
    want = tenant_models[r["model"]].generate(np.array([r["prompt_ids"]]), r["max_tokens"])
    got = out[r["id"]]
    assert got["error"] is None
    assert got["token_ids"] == want[0, len(r["prompt_ids"]) :].tolist(), (mode, r["id"])
    assert got["usage"]["prompt_tokens"] == len(r["prompt_ids"])
    assert got["finish_reason"] in ("stop", "length")
  summary = engine.summary()
  if mode is Mode.MIXED:
    assert summary["switches"] == 0
  if mode is Mode.SWAP:
    assert summary["switches"] >= 1 and summary["switch_bytes"] > 0
  if mode is Mode.RESIDENT:
    assert summary["switch_bytes"] == 0


def test_continuous_batching_equals_one_at_a_time(store):
  reqs = interleaved(store, 10, seed=3)
  batched, _ = serve(store, reqs, mode=Mode.MIXED, max_batch=4)
  alone, _ = serve(store, reqs, mode=Mode.MIXED, max_batch=1)
  for r in reqs:
    assert batched[r["id"]]["token_ids"] == alone[r["id"]]["token_ids"]


@pytest.mark.parametrize("mode", [Mode.MIXED, Mode.SWAP])
def test_overlapped_steps_serve_what_one_step_at_a_time_serves(store, mode):
  reqs = interleaved(store, 12, seed=6)
  for r in reqs[::3]:
    r.update(temperature=0.8, top_p=0.9, seed=7)
  reqs[1]["max_tokens"] = 10  # still running when cancelled below
  got = {}
  for overlap in (False, True):
    engine = Engine(store, EngineConfig(mode=mode, max_batch=4, max_seq_len=MAX_SEQ, page_size=4, overlap=overlap))
    assert engine.overlap is overlap
    for r in reqs:
      engine.submit(r)
    out = engine.step() + engine.step()
    assert engine.cancel("r1")
    out += engine.run_until_done()
    got[overlap] = {o["id"]: (o["token_ids"], o["finish_reason"], o["error"]) for o in out}
    assert engine.pages.free == engine.pages.usable and not any(engine.rows)
  assert sorted(got[True]) == sorted(r["id"] for r in reqs if r["id"] != "r1")
  assert got[True] == got[False]


def test_sampling_matches_generate_with_the_same_seed(store, tenant_models):
  t = store.tenants[1]
  req = {
    "id": "s",
    "model": t,
    "prompt_ids": [5, 9, 200],
    "max_tokens": 8,
    "temperature": 0.9,
    "top_p": 0.8,
    "seed": 42,
  }
  out, _ = serve(store, [req, *interleaved(store, 3, seed=4)], mode=Mode.MIXED, max_batch=4)
  want = tenant_models[t].generate(np.array([req["prompt_ids"]]), 8, temperature=0.9, top_p=0.8, seed=42)
  assert out["s"]["token_ids"] == want[0, 3:].tolist()


def test_streaming_callback_sees_every_token(store):
  seen = {}
  engine = Engine(
    store,
    EngineConfig(max_seq_len=MAX_SEQ, max_batch=2),
    on_token=lambda rid, tok, delta: seen.setdefault(rid, []).append(tok),
  )
  for r in interleaved(store, 4, seed=5):
    engine.submit(r)
  for o in engine.run_until_done():
    assert seen[o["id"]] == o["token_ids"]


def test_stop_strings_truncate_text(store, tenant_models):
  t = store.tenants[0]
  prompt = [72, 101, 108]
  full = tenant_models[t].generate(np.array([prompt]), 12, stop_at_eos=False)[0, 3:]
  text = tenant_models[t].tokenizer.decode(full) if tenant_models[t].tokenizer else store.tokenizer.decode(full)
  assert len(text) >= 5, text  # the tiny byte model renders its 12 tokens as at least 5 characters
  stop = text[3:5]
  out, _ = serve(store, [{"id": "x", "model": t, "prompt_ids": prompt, "max_tokens": 12, "stop": stop}])
  assert out["x"]["finish_reason"] == "stop" and stop not in out["x"]["text"]
  assert text.startswith(out["x"]["text"]) and len(out["x"]["text"]) == text.find(stop)


def test_bad_requests_get_errors_and_the_rest_are_served(store):
  good = interleaved(store, 3, seed=6)
  bad = [
    {"id": "unknown", "model": "nope", "prompt_ids": [1]},
    {"id": "empty", "model": store.tenants[0], "prompt": ""},
    {"id": "long", "model": store.tenants[0], "prompt_ids": [1] * MAX_SEQ},
    {"id": "zero", "model": store.tenants[0], "prompt_ids": [1], "max_tokens": 0},
    {"id": "huge", "model": store.tenants[0], "prompt_ids": [1], "max_tokens": 10_000},
    {"id": "vocab", "model": store.tenants[0], "prompt_ids": [1, 99_999]},
    {"id": "temp", "model": store.tenants[0], "prompt_ids": [1], "temperature": -1},
  ]
  out, _ = serve(store, good + bad, max_batch=2)
  messages = {
    "unknown": "unknown model 'nope'",
    "empty": "'prompt' is empty",
    "long": "prompt has 32 tokens",
    "zero": "'max_tokens' must be >= 1",
    "huge": "above the limit",
    "vocab": "out of the vocabulary",
    "temp": "'temperature' must be >= 0",
  }
  for rid, text in messages.items():
    assert out[rid]["finish_reason"] == "error" and text in out[rid]["error"]["message"], out[rid]
  for r in good:
    assert out[r["id"]]["error"] is None and out[r["id"]]["token_ids"]


def test_compilations_are_bounded_over_200_requests(store):
  before = compilations()
  reqs = interleaved(store, 200, seed=7, max_prompt=20, max_tokens=6)
  out, engine = serve(store, reqs, mode=Mode.MIXED, max_batch=4)
  assert all(o["error"] is None for o in out.values())
  # prompt buckets {8, 16, 32} x admission sizes {1, 2, 4} for admission, plus decode over page-table
  # widths {1, 2, 4, 8}: a bound that does not grow with the number of requests.
  assert compilations() - before <= 3 * 3 + 4


def test_rare_tenants_wait_is_bounded_under_skew(store):
  """90% of requests for one tenant, one arriving per decode step: the others still get in."""
  rng = np.random.default_rng(8)
  reqs = [
    {
      "id": f"q{i}",
      "model": store.tenants[0] if rng.random() < 0.9 else store.tenants[1 + i % 2],
      "prompt_ids": [3, 4, 5],
      "max_tokens": 6,
    }
    for i in range(80)
  ]
  step_s = 0.01  # a simulated clock: each decode step takes 10 ms

  def run(max_wait_s):
    box = []
    engine = Engine(
      store,
      EngineConfig(mode=Mode.RESIDENT, max_batch=4, max_seq_len=MAX_SEQ, max_wait_s=max_wait_s),
      clock=lambda: box[0].decode_steps * step_s if box else 0.0,
    )
    box.append(engine)
    out, pending = [], list(reqs)
    while pending or engine.has_work:
      if pending:
        engine.submit(pending.pop(0))
      out.extend(engine.step())
    assert len(out) == len(reqs)
    return [o["timings"]["queue_s"] for o in out if o["model"] != store.tenants[0]]

  bounded = max(run(max_wait_s=0.05))
  unbounded = max(run(max_wait_s=1e9))
  # max_wait, then the running batch drains (<= 6 steps), then at worst the other rare tenant's batch.
  assert bounded <= 0.05 + 2 * 6 * step_s + 1e-9, bounded
  assert unbounded > 2 * bounded, (unbounded, bounded)
