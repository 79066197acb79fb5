"""Mixtral configuration: a frozen, hashable dataclass usable as a jit static arg.

`MixtralConfig.from_hf(dict, generation=dict)` reads a Hugging Face
`config.json` (and `generation_config.json`, whose special token ids win, as in
transformers' `generate`); every key the model needs must be present and of
its type, and a missing, mistyped or unsupported one raises `ConfigError`
naming it. `eos_token_id` keeps every id of a list (`eos_ids`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxmoe.errors import ConfigError
from jaxmoe.families import fields
from jaxmoe.families.base import JsonConfig

# HF keys the Mixtral model cannot do without (no silent defaults for these).
_REQUIRED_HF_KEYS = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_hidden_layers",
  "num_attention_heads",
  "num_local_experts",
  "num_experts_per_tok",
)
# transformers' ACT2FN maps both to SiLU.
SILU_NAMES = ("silu", "swish")
_POSITIVE = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_layers",
  "num_heads",
  "num_kv_heads",
  "num_experts",
  "top_k",
  "head_dim",
  "max_position_embeddings",
)


@dataclasses.dataclass(frozen=True)
class MixtralConfig(JsonConfig):
  """Shapes and constants of a Mixtral-architecture model."""

  vocab_size: int  # V
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N query heads
  num_kv_heads: int  # M key/value heads
  num_experts: int  # E
  top_k: int  # K
  head_dim: int  # H
  rope_theta: float = 1e6
  rms_norm_eps: float = 1e-5
  sliding_window: int | None = None
  max_position_embeddings: int = 32768
  bos_token_id: int | None = 1
  eos_token_id: int | tuple[int, ...] | None = 2  # every id that ends a sequence; see eos_ids
  pad_token_id: int | None = None
  dtype: str = "float32"
  architecture: str = "mixtral"

  def __post_init__(self):
    fields.check_fields(self, _POSITIVE)
    if self.sliding_window is not None and self.sliding_window < 1:
      raise ConfigError(f"sliding_window={self.sliding_window} must be >= 1 or null")
    if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
      raise ConfigError(f"rope_theta={self.rope_theta} and rms_norm_eps={self.rms_norm_eps} must be > 0")
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(
        f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
      )
    if not 1 <= self.top_k <= self.num_experts:
      raise ConfigError(f"num_experts_per_tok={self.top_k} must be in [1, num_local_experts={self.num_experts}]")
    if self.head_dim % 2:
      raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")

  @property
  def group_size(self) -> int:
    """G: query heads per key/value head."""
    return self.num_heads // self.num_kv_heads

  @property
  def num_moe_layers(self) -> int:
    """L of the slot map [L, E]: every Mixtral layer is an MoE layer."""
    return self.num_layers

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every token id that ends a sequence (empty: none)."""
    eos = self.eos_token_id
    if eos is None:
      return ()
    return tuple(eos) if isinstance(eos, (tuple, list)) else (eos,)

  @property
  def max_positions(self) -> int:
    """Longest sequence (prompt and generated tokens) the model can attend over."""
    return self.max_position_embeddings

  @classmethod
  def from_hf(cls, hf: dict[str, Any], dtype: str = "float32", generation: dict | None = None) -> MixtralConfig:
    """Builds a config from a HF Mixtral `config.json` dict (and `generation_config.json`'s, if any)."""
    model_type = hf.get("model_type")
    if model_type != "mixtral":
      raise ConfigError(f"config.json: model_type={model_type!r}, expected 'mixtral'")
    for key in _REQUIRED_HF_KEYS:
      fields.hf_int(hf, key)
    act = hf.get("hidden_act", "silu")
    if act not in SILU_NAMES:
      raise ConfigError(f"config.json: hidden_act={act!r} unsupported (only 'silu', also spelled 'swish')")
    if fields.hf_bool(hf, "tie_word_embeddings", False):
      raise ConfigError("config.json: tie_word_embeddings=true unsupported (Mixtral unties the LM head)")
    rope = fields.hf_dict(hf, "rope_parameters") or fields.hf_dict(hf, "rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ConfigError(f"config.json: rope_type={rope_type!r} unsupported (only 'default')")
    theta = fields.hf_number(rope, "rope_theta", fields.hf_number(hf, "rope_theta", 1e6))
    heads = hf["num_attention_heads"]
    window = hf.get("sliding_window")
    return cls(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=fields.hf_int(hf, "num_key_value_heads", heads),
      num_experts=hf["num_local_experts"],
      top_k=hf["num_experts_per_tok"],
      head_dim=fields.hf_int(hf, "head_dim", hf["hidden_size"] // heads),
      rope_theta=theta,
      rms_norm_eps=fields.hf_number(hf, "rms_norm_eps", 1e-5),
      sliding_window=None if window is None else fields.hf_int(hf, "sliding_window"),
      max_position_embeddings=fields.hf_int(hf, "max_position_embeddings", 32768),
      bos_token_id=fields.hf_token(hf, generation, "bos_token_id"),
      eos_token_id=fields.hf_token(hf, generation, "eos_token_id", many=True),
      pad_token_id=fields.hf_token(hf, generation, "pad_token_id"),
      dtype=dtype,
    )


PRESETS: dict[str, MixtralConfig] = {
  # Small enough to build, convert and run in seconds on a CPU.
  "tiny": MixtralConfig(
    vocab_size=259,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    num_experts=4,
    top_k=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=512,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
  ),
  "mixtral-8x7b": MixtralConfig(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    num_experts=8,
    top_k=2,
    head_dim=128,
    rope_theta=1e6,
    max_position_embeddings=32768,
    dtype="bfloat16",
  ),
}


def preset(name: str) -> MixtralConfig:
  """Exact-name lookup in the preset registry."""
  if name not in PRESETS:
    raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]
