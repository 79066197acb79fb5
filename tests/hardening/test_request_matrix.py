"""The bad-request matrix: every bad line gets its own one-line error, and no good request changes.

In-process, through `jaxmoe.serving.batch` (what `jaxmoe-serve` runs) on a
tiny in-memory store, in all three modes: each case alone is answered with
exactly one error response naming the problem; then all cases interleaved with
good requests give one response per line and the good requests' tokens equal
a batch of the good requests alone.
"""

from __future__ import annotations

import json
import re

import pytest

from jaxmoe.errors import RequestError
from jaxmoe.families.mixtral import config
from jaxmoe.serving import Engine, EngineConfig, Mode, Request
from jaxmoe.serving import requests as req_lib
from jaxmoe.serving.batch import serve_lines, submit_lines
from jaxmoe.serving.synthetic import synthetic_store

MAX_SEQ = 32
TENANTS = ("tenant0", "tenant1", "tenant2")  # synthetic_store's names


def j(**fields) -> bytes:
  return json.dumps({"model": "tenant0", "prompt_ids": [5, 6, 7], **fields}).encode()


def raw(text: str) -> bytes:
  return text.encode()


# name -> (line, a fragment its error message must contain)
BAD_LINES = {
  "malformed_json": (b'{"id": "x", "model": ', "not valid JSON"),
  "invalid_utf8": (b'{"id": "x", "prompt": "caf\xe9"}', "not valid UTF-8"),
  "empty_line": (b"", "is empty"),
  "blank_line": (b"   \t", "is empty"),
  "lone_surrogate_prompt": (raw('{"model": "tenant0", "prompt": "ab\\ud800cd"}'), "lone UTF-16 surrogate"),
  "lone_surrogate_stop": (raw('{"model": "tenant0", "prompt": "ab", "stop": "\\udfff"}'), "lone UTF-16 surrogate"),
  "lone_surrogate_id": (raw('{"id": "\\ud800", "model": "tenant0", "prompt": "ab"}'), "lone UTF-16 surrogate"),
  "int_5000_digits": (raw('{"model": "tenant0", "prompt": "a", "max_tokens": ' + "9" * 5000 + "}"), "not usable JSON"),
  "nested_100000": (b"[" * 100_000 + b"]" * 100_000, "not usable JSON"),
  "nested_object_100000": (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "not usable JSON"),
  "json_array": (b"[1, 2]", "must be a JSON object"),
  "json_string": (b'"hello"', "must be a JSON object"),
  "json_null": (b"null", "must be a JSON object"),
  "temperature_nan": (raw('{"model": "tenant0", "prompt_ids": [1], "temperature": NaN}'), "finite"),
  "temperature_inf": (raw('{"model": "tenant0", "prompt_ids": [1], "temperature": Infinity}'), "finite"),
  "temperature_minus_inf": (raw('{"model": "tenant0", "prompt_ids": [1], "temperature": -Infinity}'), "finite"),
  "temperature_huge_float": (raw('{"model": "tenant0", "prompt_ids": [1], "temperature": 1e999}'), "finite"),
  "temperature_string": (j(temperature="0.5"), "'temperature' must be a number"),
  "temperature_bool": (j(temperature=True), "'temperature' must be a number"),
  "temperature_negative": (j(temperature=-0.1), "'temperature' must be >= 0"),
  "temperature_beyond_float32": (j(temperature=1e39), "'temperature' must be at most"),
  "top_p_zero": (j(top_p=0), "'top_p' must be in (0, 1]"),
  "top_p_above_one": (j(top_p=1.5), "'top_p' must be in (0, 1]"),
  "top_p_nan": (raw('{"model": "tenant0", "prompt_ids": [1], "top_p": NaN}'), "finite"),
  "stop_zero": (j(stop=0), "'stop' must be a non-empty string"),
  "stop_false": (j(stop=False), "'stop' must be a non-empty string"),
  "stop_empty_string": (j(stop=""), "'stop' must be a non-empty string"),
  "stop_list_with_empty": (j(stop=["a", ""]), "'stop' must be a non-empty string"),
  "stop_list_of_ints": (j(stop=[1]), "'stop' must be a non-empty string"),
  "seed_2_31": (j(seed=2**31), "'seed' must be in [0, 2^31)"),
  "seed_2_40": (j(seed=2**40), "'seed' must be in [0, 2^31)"),
  "seed_negative": (j(seed=-1), "'seed' must be in [0, 2^31)"),
  "seed_float": (j(seed=1.5), "'seed' must be an integer"),
  "max_tokens_zero": (j(max_tokens=0), "'max_tokens' must be >= 1"),
  "max_tokens_float": (j(max_tokens=2.0), "'max_tokens' must be an integer"),
  "max_tokens_too_many": (j(max_tokens=10**30), "above the limit"),
  "prompt_too_long": (j(prompt_ids=[1] * MAX_SEQ), "the maximum is"),
  "prompt_empty": (j(prompt_ids=None, prompt=""), "'prompt' is empty"),
  "prompt_not_string": (j(prompt_ids=None, prompt=["a"]), "'prompt' must be a string"),
  "prompt_ids_empty": (j(prompt_ids=[]), "'prompt_ids' is empty"),
  "prompt_ids_negative": (j(prompt_ids=[-1]), "out of the vocabulary"),
  "prompt_ids_out_of_vocab": (j(prompt_ids=[259]), "out of the vocabulary"),
  "prompt_ids_huge": (j(prompt_ids=[10**40]), "out of the vocabulary"),
  "prompt_ids_strings": (j(prompt_ids=["1"]), "'prompt_ids' must be a list of integers"),
  "prompt_ids_bools": (j(prompt_ids=[True]), "'prompt_ids' must be a list of integers"),
  "both_prompts": (j(prompt="a"), "exactly one of"),
  "no_prompt": (j(prompt_ids=None), "exactly one of"),
  "unknown_field": (j(max_new_tokens=3), "unknown field(s) ['max_new_tokens']"),
  "model_missing": (raw('{"prompt": "a"}'), "'model' (the tenant name) is required"),
  "model_unknown": (j(model="nobody"), "unknown model 'nobody'"),
  "model_not_string": (j(model=5), "'model' (the tenant name) is required"),
  "id_bool": (j(id=True), "'id' must be a non-empty string"),
  "id_list": (j(id=["a"]), "'id' must be a non-empty string"),
  "id_empty": (j(id=""), "'id' must be a non-empty string"),
  "n_two": (j(n=2), "'n' other than 1"),
  "n_true": (j(n=True), "'n' other than 1"),
  "stream_string": (j(stream="yes"), "'stream' must be true or false"),
  "user_number": (j(user=5), "'user' must be a string"),
}


@pytest.fixture(scope="module")
def store():
  # tests/serving/test_engine.py's store and batch shape: in one pytest run the programs compile once.
  mem = synthetic_store(config.preset("tiny"), k=3, seed=1, own_fraction=0.5, noise=0.05)
  assert tuple(mem.tenants) == TENANTS
  return mem


@pytest.fixture(scope="module")
def engines(store):
  return {mode: Engine(store, EngineConfig(mode=mode, max_batch=4, max_seq_len=MAX_SEQ)) for mode in Mode}


def good_requests() -> list[bytes]:
  out = []
  for i in range(6):
    fields = {"id": f"good-{i}", "model": TENANTS[i % 3], "prompt_ids": [10 + i, 20, 30 + 2 * i], "max_tokens": 4}
    if i % 3 == 1:
      fields.update(temperature=0.9, top_p=0.8, seed=100 + i)
    if i == 4:
      fields.update(prompt="hi!", prompt_ids=None, stop=["\n\n"])
    out.append(json.dumps({k: v for k, v in fields.items() if v is not None}).encode())
  return out


def run(lines: list[bytes], engine) -> list[dict]:
  out: list[dict] = []
  serve_lines(lines, engine, out.append)
  assert not engine.has_work
  return out


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_each_bad_line_gets_one_clear_error(name, engines):
  line, fragment = BAD_LINES[name]
  engine = engines[Mode.MIXED]
  out: list[dict] = []
  queued, refused = submit_lines([line], engine, out.append)
  assert (queued, refused, len(out)) == ({}, 1, 1)
  assert not engine.has_work  # nothing reached the engine's queue
  response = out[0]
  message = response["error"]["message"]
  assert response["finish_reason"] == "error" and response["line"] == 1
  assert fragment in message, message
  assert "\n" not in message and len(message) < 400 and "Traceback" not in message
  json.dumps(response, allow_nan=False)  # a response is strict JSON, whatever the line held


@pytest.mark.parametrize("mode", list(Mode))
def test_bad_lines_lose_nothing_and_change_no_good_output(mode, engines):
  engine = engines[mode]
  good = good_requests()
  alone = {r["id"]: r for r in run(good, engine)}
  assert all(r["error"] is None for r in alone.values()), alone
  bad = [BAD_LINES[name][0] for name in sorted(BAD_LINES)]
  lines = [x for pair in zip(bad, good + [None] * len(bad)) for x in pair if x is not None]
  out = run(lines, engine)
  assert sorted(r["line"] for r in out) == list(range(1, len(lines) + 1))  # each line answered once
  good_lines = {lines.index(g) + 1: json.loads(g)["id"] for g in good}
  for r in out:
    if r["line"] in good_lines:
      want = alone[good_lines[r["line"]]]
      assert (r["id"], r["token_ids"], r["text"], r["finish_reason"]) == (
        want["id"],
        want["token_ids"],
        want["text"],
        want["finish_reason"],
      )
    else:
      assert r["finish_reason"] == "error" and r["error"]["message"]


def test_bom_at_the_start_of_the_file_is_skipped(engines):
  data = req_lib.BOM + b"\n".join(good_requests()[:2]) + b"\n"
  out = run(req_lib.request_lines(data), engines[Mode.MIXED])
  assert [r["error"] for r in out] == [None, None]


def test_duplicate_ids_are_refused_and_matchable(engines):
  first = j(id="same", max_tokens=2)
  lines = [first, j(id="same", max_tokens=3), b'{"broken', j(id="line-3", max_tokens=2), j(max_tokens=2)]
  out = sorted(run(lines, engines[Mode.SWAP]), key=lambda r: r["line"])
  assert [r["line"] for r in out] == [1, 2, 3, 4, 5]
  assert out[0]["error"] is None and out[0]["id"] == "same"
  assert "duplicate id 'same': line 1 already used it" in out[1]["error"]["message"]
  assert out[2]["id"] == "line-3" and "not valid JSON" in out[2]["error"]["message"]
  assert "duplicate id 'line-3': line 3" in out[3]["error"]["message"]  # an explicit id may not take a default one
  assert out[4]["error"] is None and out[4]["id"] == "line-5"


@pytest.mark.parametrize(
  "request_, fragment",
  [
    (Request("a", "tenant0", prompt_ids=(1,), seed=2**40), "'seed' must be in [0, 2^31)"),
    (Request("a", "tenant0", prompt_ids=(1,), temperature=float("nan")), "finite"),
    (Request("a", "tenant0", prompt_ids=(1,), stop=("",)), "'stop' must be a non-empty string"),
    (Request("a", "tenant0", prompt_ids=(1,), max_tokens=0), "'max_tokens' must be >= 1"),
    (Request("a", "tenant0", prompt_ids=("x",)), "'prompt_ids' must be a list of integers"),
    (Request("a", "tenant0"), "exactly one of"),
    ({"model": "tenant0"}, "a request must be a dict or a Request"),
  ],
)
def test_request_objects_are_validated_like_json(request_, fragment):
  with pytest.raises(RequestError, match=re.escape(fragment)):
    req_lib.check_request(request_)


def test_a_valid_request_object_is_unchanged():
  r = Request("a", "tenant0", prompt_ids=(1, 2), max_tokens=3, temperature=0.5, top_p=0.9, stop=("x",), seed=7)
  assert req_lib.check_request(r) == r
