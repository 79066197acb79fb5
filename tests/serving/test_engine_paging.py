"""The engine's paged KV cache and its failure handling: outputs stay each tenant's own, nothing leaks.

Every case compares with the tenants' own `generate` (a different code path over the same pages)
or with the same workload served without the fault.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe.families.mixtral import MixtralModel, config
from jaxmoe.serving import Engine, EngineConfig, Mode, Request
from jaxmoe.serving.synthetic import synthetic_store

MAX_SEQ = 32


@pytest.fixture(scope="module")
def store():
  return synthetic_store(config.preset("tiny"), k=3, seed=1, own_fraction=0.5, noise=0.05)


@pytest.fixture(scope="module")
def want(store):
  """id -> token ids each request gets from its tenant's own model."""
  models = {t: MixtralModel(store.config, store.params(t)) for t in store.tenants}
  out = {}
  for r in workload(store):
    row = models[r["model"]].generate(np.array([r["prompt_ids"]]), r["max_tokens"])
    out[r["id"]] = row[0, len(r["prompt_ids"]) :].tolist()
  return out


def workload(store, n: int = 8):
  """Rows of very different lengths: prompts 1..25 tokens, outputs 1..7."""
  rng = np.random.default_rng(11)
  lengths = [1, 25, 3, 17, 2, 9, 24, 5][:n]
  return [
    {
      "id": f"w{i}",
      "model": store.tenants[i % 3],
      "prompt_ids": rng.integers(0, 256, m).tolist(),
      "max_tokens": int(rng.integers(1, 8)),
    }
    for i, m in enumerate(lengths)
  ]


def run(store, reqs, on_token=None, **kw):
  engine = Engine(store, EngineConfig(max_seq_len=MAX_SEQ, page_size=4, **kw), on_token=on_token)
  for r in reqs:
    engine.submit(r)
  out = engine.run_until_done()
  assert sorted(o["id"] for o in out) == sorted(r["id"] if isinstance(r, dict) else r.id for r in reqs)
  return {o["id"]: o for o in out}, engine


def test_when_pages_run_out_requests_wait_and_nothing_is_corrupted(store, want):
  page_bytes = Engine(store, EngineConfig(max_seq_len=MAX_SEQ, page_size=4)).page_bytes
  out, engine = run(store, workload(store), mode=Mode.MIXED, max_batch=4, kv_cache_gb=10 * page_bytes / 1e9)
  assert engine.stats()["kv_pages"] == 9  # 10 pages, one the scratch page: about two requests at a time
  for rid, tokens in want.items():
    assert out[rid]["error"] is None and out[rid]["token_ids"] == tokens, rid
  assert engine.stats()["kv_pages_free"] == 9  # every page came back


def test_a_request_larger_than_the_cache_is_refused(store):
  page_bytes = Engine(store, EngineConfig(max_seq_len=MAX_SEQ, page_size=4)).page_bytes
  big = {"id": "big", "model": store.tenants[0], "prompt_ids": [1] * 20, "max_tokens": 10}
  out, _ = run(store, [big, *workload(store, 1)], kv_cache_gb=5 * page_bytes / 1e9)
  assert "needs 8 KV-cache pages" in out["big"]["error"]["message"]
  assert out["w0"]["error"] is None


def test_a_raising_callback_fails_only_its_request(store, want):
  calls = {"n": 0}

  def flaky(rid, token, delta):
    if rid == "w3":
      calls["n"] += 1
      if calls["n"] == 2:
        raise RuntimeError("client went away")

  out, engine = run(store, workload(store), on_token=flaky, max_batch=4)
  assert out["w3"]["finish_reason"] == "error" and "client went away" in out["w3"]["error"]["message"]
  for rid, tokens in want.items():
    if rid != "w3":
      assert out[rid]["token_ids"] == tokens, rid
  assert engine.num_running == 0 and engine.stats()["kv_pages_free"] == engine.stats()["kv_pages"]


def test_a_callback_that_always_raises_for_one_id_does_not_wedge_the_engine(store, want):
  def hostile(rid, token, delta):
    if rid == "w0":
      raise ValueError("boom")

  out, _ = run(store, workload(store), on_token=hostile, mode=Mode.SWAP, max_batch=2)
  assert out["w0"]["finish_reason"] == "error"
  assert all(out[rid]["token_ids"] == tokens for rid, tokens in want.items() if rid != "w0")


def test_request_objects_and_other_inputs_are_validated_like_dicts(store, want):
  reqs = [
    *workload(store),
    Request("seed", store.tenants[0], prompt_ids=(1, 2), seed=2**40),
    Request("neg", store.tenants[0], prompt_ids=(1,), max_tokens=-3),
    ["not", "a", "request"],
  ]
  engine = Engine(store, EngineConfig(max_seq_len=MAX_SEQ, page_size=4))
  for r in reqs:
    engine.submit(r, default_id="odd")
  out = {o["id"]: o for o in engine.run_until_done()}
  assert "'seed' must be in [0, 2^31)" in out["seed"]["error"]["message"]
  assert "'max_tokens' must be >= 1" in out["neg"]["error"]["message"]
  assert "must be a dict or a Request" in out["odd"]["error"]["message"]
  assert all(out[rid]["token_ids"] == tokens for rid, tokens in want.items())


def test_cancel_frees_the_row_and_the_rest_are_unchanged(store, want):
  engine = Engine(store, EngineConfig(max_seq_len=MAX_SEQ, page_size=4, max_batch=4))
  reqs = workload(store)
  for r in reqs:
    engine.submit(r)
  finished = {o["id"] for o in engine.step()}
  running = next(s.request.id for s in engine.rows if s is not None)
  waiting = engine.waiting[-1].request.id
  assert engine.cancel(running) and not engine.cancel(running) and engine.cancel(waiting)
  out = {o["id"]: o for o in engine.run_until_done()}
  assert set(out) | finished == {r["id"] for r in reqs} - {running, waiting}
  assert all(out[rid]["token_ids"] == want[rid] for rid in out)
  assert engine.stats()["kv_pages_free"] == engine.stats()["kv_pages"] and engine.num_running == 0


def test_duplicate_ids_in_flight_are_refused(store):
  engine = Engine(store, EngineConfig(max_seq_len=MAX_SEQ, page_size=4))
  first = workload(store, 1)[0]
  engine.submit(first)
  engine.submit(dict(first))
  out = engine.run_until_done()
  assert [o["error"] is None for o in out].count(True) == 1
  assert any(o["error"] and "already in the engine" in o["error"]["message"] for o in out)


def test_any_eos_id_stops_a_sequence(store, want):
  """Every request's second token declared an EOS id: each stops at the first EOS id it produces."""
  eos = {tokens[1] for tokens in want.values() if len(tokens) > 1}
  assert len(eos) > 1
  cfg = store.config.replace(eos_token_id=tuple(sorted(eos)))
  eos_store = synthetic_store(cfg, k=3, seed=1, own_fraction=0.5, noise=0.05)
  out, _ = run(eos_store, workload(store))
  for rid, tokens in want.items():
    stop = next((i for i, t in enumerate(tokens) if t in eos), None)
    assert out[rid]["token_ids"] == (tokens if stop is None else tokens[: stop + 1]), rid
    assert out[rid]["finish_reason"] == ("length" if stop is None else "stop")


def test_streamed_text_adds_up_and_memory_is_bounded(store):
  pieces = {}
  reqs = [{"id": f"s{i}", "model": store.tenants[i % 3], "prompt": f"abc {i}", "max_tokens": 5} for i in range(40)]
  out, engine = run(store, reqs, on_token=lambda rid, tok, delta: pieces.setdefault(rid, []).append(delta), history=16)
  for rid, o in out.items():
    assert "".join(pieces[rid]) == o["text"]
  assert len(engine.served.recent["ttft_s"]) == 16 and engine.summary()["requests"] == 40
