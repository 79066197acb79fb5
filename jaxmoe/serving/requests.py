"""Requests and responses as JSON lines, with OpenAI completion field names.

Request: id, model (the tenant), prompt or prompt_ids, max_tokens,
temperature, top_p, stop, seed. Response: id, model, text, token_ids,
finish_reason (stop | length | error), usage, timings, error.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jaxmoe.errors import RequestError

DEFAULT_MAX_TOKENS = 16
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


def _number(obj: dict, name: str, kind, default):
  value = obj.get(name, default)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
    raise RequestError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {value!r}")
  return kind(value)


def parse_request(obj: Any, default_id: str) -> Request:
  """Validates the fields of one decoded JSON request (tenant and length checks come later)."""
  if not isinstance(obj, dict):
    raise RequestError(f"a request must be a JSON object, got {type(obj).__name__}")
  unknown = sorted(str(k) for k in obj if k not in KNOWN_FIELDS)
  if unknown:
    raise RequestError(f"unknown field(s) {unknown}; known: {sorted(KNOWN_FIELDS)}")
  rid = obj.get("id", default_id)
  if not isinstance(rid, (str, int)) or isinstance(rid, bool):
    raise RequestError(f"'id' must be a string, got {rid!r}")
  rid = str(rid)
  model = obj.get("model")
  if not isinstance(model, str) or not model:
    raise RequestError("'model' (the tenant name) is required")
  prompt, prompt_ids = obj.get("prompt"), obj.get("prompt_ids")
  if (prompt is None) == (prompt_ids is None):
    raise RequestError("give exactly one of 'prompt' (text) and 'prompt_ids' (token ids)")
  if prompt is not None:
    if not isinstance(prompt, str):
      raise RequestError(f"'prompt' must be a string, got {type(prompt).__name__}")
    if not prompt:
      raise RequestError("'prompt' is empty")
  else:
    if not isinstance(prompt_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in prompt_ids):
      raise RequestError("'prompt_ids' must be a list of integers")
    if not prompt_ids:
      raise RequestError("'prompt_ids' is empty")
    prompt_ids = tuple(prompt_ids)
  max_tokens = _number(obj, "max_tokens", int, DEFAULT_MAX_TOKENS)
  if max_tokens <= 0:
    raise RequestError(f"'max_tokens' must be >= 1, got {max_tokens}")
  temperature = _number(obj, "temperature", float, 0.0)
  if temperature < 0:
    raise RequestError(f"'temperature' must be >= 0, got {temperature}")
  top_p = _number(obj, "top_p", float, 1.0)
  if not 0 < top_p <= 1:
    raise RequestError(f"'top_p' must be in (0, 1], got {top_p}")
  stop = obj.get("stop") or ()
  if isinstance(stop, str):
    stop = (stop,)
  if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
    raise RequestError("'stop' must be a non-empty string or a list of them")
  seed = _number(obj, "seed", int, 0)
  if not 0 <= seed < 2**31:
    raise RequestError(f"'seed' must be in [0, 2^31), got {seed}")
  if obj.get("n", 1) != 1:
    raise RequestError("'n' other than 1 is not supported")
  return Request(rid, model, prompt, prompt_ids, max_tokens, temperature, top_p, tuple(stop), seed)


def parse_line(line: bytes | str, line_no: int) -> Request:
  """One JSON line -> Request; the default id is `line-<n>` (1-based)."""
  default_id = f"line-{line_no}"
  if isinstance(line, bytes):
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise RequestError(f"line {line_no} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise RequestError(f"line {line_no} is not valid JSON: {e.msg} (column {e.colno})") from None
  return parse_request(obj, default_id)


def line_id(line: bytes | str, line_no: int) -> str:
  """The id to answer a line with even when it does not parse as a request."""
  try:
    obj = json.loads(line)
    if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)) and not isinstance(obj.get("id"), bool):
      return str(obj["id"])
  except (ValueError, UnicodeDecodeError):
    pass
  return f"line-{line_no}"


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
