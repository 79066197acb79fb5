"""The families jaxmoe serves, keyed by config `architecture` and by HF config.json `model_type`.

The only place that knows which families exist: everything else asks here for
a config's family and uses what the `Family` entry provides. Adding a family is
adding its package and one line to FAMILIES.
"""

from __future__ import annotations

import json
from typing import Any

from jaxmoe.errors import ConfigError
from jaxmoe.families import mixtral, switch
from jaxmoe.families.base import Family

FAMILIES: tuple[Family, ...] = (mixtral.FAMILY, switch.FAMILY)
_BY_NAME = {f.name: f for f in FAMILIES}
_BY_HF_TYPE = {t: f for f in FAMILIES for t in f.hf_model_types}


def family(name: str) -> Family:
  """Exact-name lookup by `architecture`."""
  if name not in _BY_NAME:
    raise ConfigError(f"architecture {name!r} unknown; known: {sorted(_BY_NAME)}")
  return _BY_NAME[name]


def of(cfg) -> Family:
  """The family of a jaxmoe config object."""
  return family(cfg.architecture)


def for_hf_model_type(model_type) -> Family:
  if model_type not in _BY_HF_TYPE:
    raise ConfigError(
      f"config.json: model_type={model_type!r} unsupported; jaxmoe converts "
      f"{' and '.join(repr(k) for k in _BY_HF_TYPE)}"
    )
  return _BY_HF_TYPE[model_type]


def config_from_dict(data: Any):
  """A jaxmoe config from its JSON dict (a checkpoint or store header); `architecture` picks the class.

  Headers written before `architecture` existed are Mixtral's.
  """
  if not isinstance(data, dict):
    raise ConfigError(f"jaxmoe config: expected a JSON object, got {type(data).__name__}")
  return family(data.get("architecture", "mixtral")).config.from_json(json.dumps(data))
