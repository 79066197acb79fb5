"""Architecture dispatch: each model family's config class and parameter layout module.

A layout module (jaxmoe.params for Mixtral, jaxmoe.switch_params for Switch)
provides abstract_params, check_params, identity_slot_map, expert_shapes,
EXPERT_NAMES and the checkpoint parts (part_names, moe_parts, split_parts,
join_parts). Checkpoints and stores record `config.architecture` and read
through this table, so they never branch on the family themselves.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

from jaxmoe.config import ConfigError, MixtralConfig
from jaxmoe.switch_config import SwitchConfig

Config = MixtralConfig | SwitchConfig
CONFIGS = {"mixtral": MixtralConfig, "switch": SwitchConfig}


def config_from_dict(data: dict[str, Any]) -> Config:
  """A jaxmoe config from its JSON dict; `architecture` picks the class (default mixtral)."""
  arch = data.get("architecture", "mixtral")
  if arch not in CONFIGS:
    raise ConfigError(f"jaxmoe config: architecture {arch!r} unknown; known: {sorted(CONFIGS)}")
  return CONFIGS[arch].from_json(json.dumps(data))


def layout(cfg: Config) -> ModuleType:
  """The parameter layout module of `cfg`'s architecture."""
  if cfg.architecture == "switch":
    from jaxmoe import switch_params

    return switch_params
  from jaxmoe import params

  return params
