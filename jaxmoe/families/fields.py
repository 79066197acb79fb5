"""Typed reading of config values, shared by every family's config: one clear ConfigError per bad key.

`hf_*` read a Hugging Face config.json dict (and generation_config.json for
the special token ids, which transformers' `generate` takes from that file
first). `check_fields` validates a config dataclass built from a jaxmoe
header, so a damaged header fails with the field named instead of deep inside
a model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxmoe.errors import ConfigError

CONFIG = "config.json"
GENERATION = "generation_config.json"
DTYPES = ("float32", "bfloat16", "float16")
_REQUIRED = object()


def is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def hf_int(hf: dict, key: str, default: Any = _REQUIRED, minimum: int | None = 1) -> int | Any:
  """`hf[key]` as an int >= `minimum`; `default` when absent or null (required if not given)."""
  value = hf.get(key)
  if value is None:
    if default is _REQUIRED:
      raise ConfigError(f"{CONFIG}: missing required key {key!r}")
    return default
  if not is_int(value):
    raise ConfigError(f"{CONFIG}: {key}={value!r} must be an integer")
  if minimum is not None and value < minimum:
    raise ConfigError(f"{CONFIG}: {key}={value} must be >= {minimum}")
  return value


def hf_number(hf: dict, key: str, default: float, positive: bool = True) -> float:
  """`hf[key]` as a finite float (> 0 when `positive`); `default` when absent or null."""
  value = hf.get(key)
  if value is None:
    return float(default)
  if not is_number(value):
    raise ConfigError(f"{CONFIG}: {key}={value!r} must be a finite number")
  if positive and value <= 0:
    raise ConfigError(f"{CONFIG}: {key}={value} must be > 0")
  return float(value)


def hf_bool(hf: dict, key: str, default: bool) -> bool:
  value = hf.get(key)
  if value is None:
    return default
  if not isinstance(value, bool):
    raise ConfigError(f"{CONFIG}: {key}={value!r} must be true or false")
  return value


def hf_dict(hf: dict, key: str) -> dict:
  value = hf.get(key)
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise ConfigError(f"{CONFIG}: {key}={value!r} must be an object")
  return value


def _token_ids(value, key: str, source: str, many: bool):
  if is_int(value):
    return value
  if many and isinstance(value, (list, tuple)) and all(is_int(i) for i in value):
    return tuple(value) if value else None
  kind = "an integer or a list of integers" if many else "an integer"
  raise ConfigError(f"{source}: {key}={value!r} must be {kind}")


def hf_token(hf: dict, generation: dict | None, key: str, default=None, many: bool = False):
  """A special token id: generation_config.json's when it sets it, else config.json's, else `default`.

  An explicit null in config.json means no such token (transformers' configs say so).

  `many` (eos_token_id): a list is kept whole, as a tuple; an empty one means none.
  """
  if (generation or {}).get(key) is not None:
    return _token_ids(generation[key], key, GENERATION, many)
  if key not in hf:
    return default
  return None if hf[key] is None else _token_ids(hf[key], key, CONFIG, many)  # an explicit null means none


def _check_value(name: str, kind: str, value):
  """(ok, normalised value) for one field annotated `kind` (a string: annotations are postponed)."""
  options = [k.strip() for k in kind.split("|")]
  if value is None:
    return "None" in options, value
  for option in options:
    if option == "int" and is_int(value):
      return True, value
    if option == "float" and is_number(value):
      return True, float(value)
    if option == "bool" and isinstance(value, bool):
      return True, value
    if option == "str" and isinstance(value, str):
      return True, value
    if option == "tuple[int, ...]" and isinstance(value, (list, tuple)) and all(is_int(i) for i in value):
      return True, tuple(value)
  if not any(o in ("int", "float", "bool", "str", "None", "tuple[int, ...]") for o in options):
    return True, value  # a type this checker does not know (an enum): the class checks it
  return False, value


def check_fields(cfg, positive: tuple[str, ...] = ()) -> None:
  """Raises ConfigError naming the first field whose value does not match its annotation.

  Lists become tuples (a config must stay hashable: it is a jit static
  argument); ints in float fields become floats. `positive` fields must be >= 1.
  """
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    ok, normal = _check_value(field.name, str(field.type), value)
    if not ok:
      raise ConfigError(f"jaxmoe config: {field.name}={value!r} must be {field.type}")
    if normal is not value:
      object.__setattr__(cfg, field.name, normal)
  for name in positive:
    if getattr(cfg, name) < 1:
      raise ConfigError(f"jaxmoe config: {name}={getattr(cfg, name)} must be >= 1")
  if getattr(cfg, "dtype", DTYPES[0]) not in DTYPES:
    raise ConfigError(f"jaxmoe config: dtype={cfg.dtype!r} unsupported; choose one of {list(DTYPES)}")
