"""Requests and responses as JSON lines, with OpenAI completion field names.

The one validation path of every front end (the batch CLI, an HTTP server):
whatever arrives, a line of bytes, a decoded JSON value or a `Request` built
in code, either becomes a valid Request or raises RequestError with a
one-line message for its error response. Nothing else escapes: bad UTF-8,
lone UTF-16 surrogates, numbers too long for Python's parser, nesting too deep
for it, NaN or Infinity where a number is due are all RequestErrors.

Request: id, model (the tenant), prompt or prompt_ids, max_tokens,
temperature, top_p, stop, seed. Response: id, model, text, token_ids,
finish_reason (stop | length | error), usage, timings, error.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from jaxmoe.errors import RequestError

DEFAULT_MAX_TOKENS = 16
SEED_RANGE = (0, 2**31)  # the sampler's seeds are int32
MAX_TEMPERATURE = 3.4028234663852886e38  # float32's largest finite value: the sampler holds temperatures as float32
BOM = b"\xef\xbb\xbf"
# OpenAI completion fields a request may carry; anything else is refused by name (a typo such as
# "max_new_tokens" must not silently mean the default).
KNOWN_FIELDS = {
  "id",
  "model",
  "prompt",
  "prompt_ids",
  "max_tokens",
  "temperature",
  "top_p",
  "stop",
  "seed",
  "stream",
  "n",
  "user",
}


@dataclasses.dataclass(frozen=True)
class Request:
  id: str
  model: str
  prompt: str | None = None
  prompt_ids: tuple[int, ...] | None = None
  max_tokens: int = DEFAULT_MAX_TOKENS
  temperature: float = 0.0
  top_p: float = 1.0
  stop: tuple[str, ...] = ()
  seed: int = 0


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _number(obj: dict, name: str, kind, default):
  value = obj.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
    raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
  if isinstance(value, float) and not math.isfinite(value):
    raise RequestError(f"'{name}' must be a finite number, got {value!r}")
  return kind(value)


def _text(value: str, name: str) -> str:
  """`value` unless it holds a lone UTF-16 surrogate (JSON "\\ud800"), which no tokenizer can encode."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise RequestError(
      f"'{name}' holds a lone UTF-16 surrogate ({value[e.start]!r} at character {e.start}): not valid Unicode"
    ) from None
  return value


def _stop(obj: dict) -> tuple[str, ...]:
  stop = obj.get("stop")
  if stop is None:
    return ()
  if isinstance(stop, str):
    stop = [stop]
  if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
    raise RequestError(f"'stop' must be a non-empty string or a list of them (or null for none), got {stop!r}")
  return tuple(_text(s, "stop") for s in stop)


def _prompt(obj: dict) -> tuple[str | None, tuple[int, ...] | None]:
  prompt, prompt_ids = obj.get("prompt"), obj.get("prompt_ids")
  if (prompt is None) == (prompt_ids is None):
    raise RequestError("give exactly one of 'prompt' (text) and 'prompt_ids' (token ids)")
  if prompt is not None:
    if not isinstance(prompt, str):
      raise RequestError(f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt:
      raise RequestError("'prompt' is empty")
    return _text(prompt, "prompt"), None
  if not isinstance(prompt_ids, (list, tuple)) or not all(_is_int(i) for i in prompt_ids):
    raise RequestError("'prompt_ids' must be a list of integers")
  if not prompt_ids:
    raise RequestError("'prompt_ids' is empty")
  return None, tuple(prompt_ids)


def parse_request(obj: Any, default_id: str) -> Request:
  """Validates the fields of one decoded JSON request (tenant and length checks come later)."""
  if not isinstance(obj, dict):
    raise RequestError(f"a request must be a JSON object, got {type(obj).__name__}")
  unknown = sorted(str(k) for k in obj if k not in KNOWN_FIELDS)
  if unknown:
    raise RequestError(f"unknown field(s) {unknown}; known: {sorted(KNOWN_FIELDS)}")
  rid = obj.get("id", default_id)
  if not isinstance(rid, (str, int)) or isinstance(rid, bool) or rid == "":
    raise RequestError(f"'id' must be a non-empty string, got {rid!r}")
  rid = _text(str(rid), "id")
  model = obj.get("model")
  if not isinstance(model, str) or not model:
    raise RequestError("'model' (the tenant name) is required")
  prompt, prompt_ids = _prompt(obj)
  max_tokens = _number(obj, "max_tokens", int, DEFAULT_MAX_TOKENS)
  if max_tokens <= 0:
    raise RequestError(f"'max_tokens' must be >= 1, got {max_tokens}")
  temperature = _number(obj, "temperature", float, 0.0)
  if temperature < 0:
    raise RequestError(f"'temperature' must be >= 0, got {temperature}")
  if temperature > MAX_TEMPERATURE:  # the device holds it as float32: beyond this it would be inf
    raise RequestError(f"'temperature' must be at most {MAX_TEMPERATURE:.4g}, got {temperature}")
  top_p = _number(obj, "top_p", float, 1.0)
  if not 0 < top_p <= 1:
    raise RequestError(f"'top_p' must be in (0, 1], got {top_p}")
  seed = _number(obj, "seed", int, 0)
  if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
    raise RequestError(f"'seed' must be in [0, 2^31), got {seed}")
  n = obj.get("n", 1)
  if not _is_int(n) or n != 1:
    raise RequestError(f"'n' other than 1 is not supported, got {n!r}")
  if not isinstance(obj.get("stream", False), bool):
    raise RequestError(f"'stream' must be true or false, got {obj['stream']!r}")
  if not isinstance(obj.get("user", ""), str):
    raise RequestError(f"'user' must be a string, got {obj['user']!r}")
  return Request(rid, model, prompt, prompt_ids, max_tokens, temperature, top_p, _stop(obj), seed)


def check_request(request: Request) -> Request:
  """A `Request` built in code, validated exactly as the same request sent as JSON."""
  if not isinstance(request, Request):
    raise RequestError(f"a request must be a dict or a Request, got {type(request).__name__}")
  fields = {k: v for k, v in dataclasses.asdict(request).items() if v is not None}
  if isinstance(fields.get("stop"), tuple) and not fields["stop"]:
    del fields["stop"]  # the default: no stop sequences
  return parse_request(fields, str(request.id))


def prompt_ids(r: Request, tenants, tokenizer, vocab_size: int) -> list[int]:
  """A request's prompt as token ids, checked against the store: its tenant among `tenants`, a text prompt
  only with a tokenizer, ids within [0, vocab_size), at least one token. Raises RequestError."""
  if r.model not in tenants:
    raise RequestError(f"unknown model {r.model!r}; this store serves {list(tenants)}")
  if r.prompt is not None:
    if tokenizer is None:
      raise RequestError("this store has no tokenizer: send 'prompt_ids' instead of 'prompt'")
    ids = list(tokenizer.encode(r.prompt))
  else:
    ids = list(r.prompt_ids)
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
      raise RequestError(f"'prompt_ids' out of the vocabulary [0, {vocab_size}): {bad[:5]}")
  if not ids:
    raise RequestError("the prompt encodes to no tokens")
  return ids


def _loads(line: str):
  try:
    return json.loads(line)
  except json.JSONDecodeError as e:
    raise RequestError(f"not valid JSON: {e.msg} (column {e.colno})") from None
  except ValueError as e:  # an integer literal beyond Python's digit limit
    raise RequestError(f"not usable JSON: {str(e).split(';')[0]}") from None
  except RecursionError:
    raise RequestError("not usable JSON: nested too deep") from None


def parse_line(line: bytes | str, line_no: int) -> Request:
  """One JSON line -> Request; the default id is `line-<n>` (1-based)."""
  default_id = f"line-{line_no}"
  if isinstance(line, bytes):
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise RequestError(f"line {line_no} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
  try:
    obj = _loads(line)
  except RequestError as e:
    raise RequestError(f"line {line_no} is {e}") from None
  return parse_request(obj, default_id)


def line_id(line: bytes | str, line_no: int) -> str:
  """The id to answer a line with even when it does not parse as a request; never raises."""
  try:
    obj = json.loads(line)
    rid = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(rid, (str, int)) and not isinstance(rid, bool) and rid != "":
      return str(rid)
  except Exception:  # whatever the line is, the answer falls back to its number
    pass
  return f"line-{line_no}"


def request_lines(data: bytes) -> list[bytes]:
  """A JSONL file's lines; a UTF-8 byte order mark at the start of the file is skipped."""
  return data.removeprefix(BOM).splitlines()


class UniqueIds:
  """Refuses a request id already used in this batch: responses are matched to requests by id."""

  def __init__(self):
    self._first: dict[str, int] = {}

  def record(self, rid: str, line_no: int) -> int:
    """Notes `rid` as used (by a refused line too); returns the line that used it first."""
    return self._first.setdefault(rid, line_no)

  def claim(self, rid: str, line_no: int) -> None:
    """Records `rid`; RequestError if an earlier line used it."""
    first = self.record(rid, line_no)
    if first != line_no:
      raise RequestError(f"duplicate id {rid!r}: line {first} already used it (ids must be unique in a batch)")


def error_response(rid: str, model: str | None, message: str) -> dict:
  return {
    "id": rid,
    "object": "text_completion",
    "model": model,
    "text": "",
    "token_ids": [],
    "finish_reason": "error",
    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    "timings": {"queue_s": 0.0, "ttft_s": None, "tpot_s": None, "turnaround_s": 0.0},
    "error": {"message": message, "type": "invalid_request_error"},
  }


def as_dict(r: Request) -> dict:
  """A Request as the dict `parse_request` takes (so a Request is validated exactly as a dict is)."""
  out = {k: v for k, v in dataclasses.asdict(r).items() if v is not None}
  for key in ("prompt_ids", "stop"):
    if isinstance(out.get(key), tuple):
      out[key] = list(out[key])
  return out


def id_and_model(request, default_id: str) -> tuple[str, str | None]:
  """The id and model a response to `request` (a Request, a dict or anything) should carry."""
  if isinstance(request, Request):
    return request.id, request.model
  if isinstance(request, dict):
    rid, model = request.get("id", default_id), request.get("model")
    return str(rid) if isinstance(rid, (str, int)) else default_id, model if isinstance(model, str) else None
  return default_id, None
