"""Switch Transformer configuration: a frozen, hashable dataclass (a jit static arg).

`SwitchConfig.from_hf(dict)` reads a Hugging Face `switch_transformers`
config.json the way transformers 5 `SwitchTransformersConfig` does: missing
optional keys take HF's defaults, an `encoder_sparse_step` /
`decoder_sparse_step` written in the file wins over the one derived from
`num_sparse_*_layers`, and a block is sparse (an MoE layer) iff
`i % step == 1 or step == 1` (never when step is 0). Keys the model cannot do
without, values of the wrong type, or values it does not implement raise
`ConfigError` naming them. Special token ids come from generation_config.json
first, as transformers' `generate` takes them; `eos_token_id` keeps every id
of a list. The decoder starts from decoder_start_token_id, else bos_token_id;
with neither, the config is refused, as transformers refuses to generate.

`routing` is not HF's: DROPLESS (the serving default) runs every token through
its expert; HF_CAPACITY drops tokens over `expert_capacity` per sequence
exactly as transformers' SwitchTransformersTop1Router, for parity.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

from jaxmoe.errors import ConfigError
from jaxmoe.families import fields
from jaxmoe.families.base import JsonConfig

ARCHITECTURE = "switch"
_REQUIRED_HF_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "num_experts")
_POSITIVE = (
  "vocab_size",
  "hidden_size",
  "intermediate_size",
  "num_heads",
  "head_dim",
  "num_encoder_layers",
  "num_decoder_layers",
  "num_experts",
  "expert_capacity",
)


class Routing(enum.Enum):
  DROPLESS = "dropless"  # every token reaches its expert (serving default)
  HF_CAPACITY = "hf_capacity"  # tokens over expert_capacity per sequence pass through (transformers)


def sparse_step(num_layers: int, num_sparse: int) -> int:
  """transformers' SwitchTransformersConfig: every how many blocks an MoE block sits."""
  return num_layers // num_sparse if num_sparse > 0 else num_layers


def sparse_blocks(num_layers: int, step: int) -> tuple[bool, ...]:
  """transformers' SwitchTransformersStack: which blocks hold a sparse MLP."""
  return tuple((i % step == 1 or step == 1) if step > 0 else False for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class SwitchConfig(JsonConfig):
  """Shapes and constants of a Switch Transformer (T5-style encoder-decoder with top-1 MoE)."""

  vocab_size: int  # V
  hidden_size: int  # D (HF d_model)
  intermediate_size: int  # F (HF d_ff), dense MLPs and experts alike
  num_heads: int  # N
  head_dim: int  # H (HF d_kv)
  num_encoder_layers: int  # HF num_layers
  num_decoder_layers: int
  num_experts: int  # E
  encoder_sparse_step: int
  decoder_sparse_step: int
  expert_capacity: int = 64  # tokens per expert and sequence (Routing.HF_CAPACITY)
  relative_attention_num_buckets: int = 32  # Z
  relative_attention_max_distance: int = 128
  layer_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True  # LM head = embed.T on outputs scaled by D**-0.5
  pad_token_id: int | None = 0
  eos_token_id: int | tuple[int, ...] | None = 1  # every id that ends a sequence; see eos_ids
  bos_token_id: int | None = None
  decoder_start_token_id: int = 0
  routing: Routing = Routing.DROPLESS
  dtype: str = "float32"
  architecture: str = ARCHITECTURE

  def __post_init__(self):
    if isinstance(self.routing, str) and self.routing in {r.value for r in Routing}:  # from JSON
      object.__setattr__(self, "routing", Routing(self.routing))
    if not isinstance(self.routing, Routing):
      raise ConfigError(f"routing={self.routing!r} must be one of {[r.value for r in Routing]}")
    if self.architecture != ARCHITECTURE:
      raise ConfigError(f"architecture={self.architecture!r}, expected {ARCHITECTURE!r}")
    fields.check_fields(self, _POSITIVE)
    for name in ("encoder_sparse_step", "decoder_sparse_step", "relative_attention_max_distance"):
      if getattr(self, name) < 0:
        raise ConfigError(f"{name}={getattr(self, name)} must be >= 0")
    if self.relative_attention_num_buckets < 4:  # the encoder's half would have no exact bucket
      raise ConfigError(f"relative_attention_num_buckets={self.relative_attention_num_buckets} must be >= 4")

  @property
  def encoder_sparse(self) -> tuple[bool, ...]:
    return sparse_blocks(self.num_encoder_layers, self.encoder_sparse_step)

  @property
  def decoder_sparse(self) -> tuple[bool, ...]:
    return sparse_blocks(self.num_decoder_layers, self.decoder_sparse_step)

  @property
  def moe_blocks(self) -> tuple[tuple[str, int], ...]:
    """(stack, block) of each MoE layer, in slot-map order: encoder blocks first."""
    enc = [("encoder", i) for i, s in enumerate(self.encoder_sparse) if s]
    return tuple(enc + [("decoder", i) for i, s in enumerate(self.decoder_sparse) if s])

  @property
  def num_moe_layers(self) -> int:
    """L of the slot map [L, E]."""
    return len(self.moe_blocks)

  @property
  def eos_ids(self) -> tuple[int, ...]:
    """Every token id that ends a sequence (empty: none)."""
    eos = self.eos_token_id
    if eos is None:
      return ()
    return tuple(eos) if isinstance(eos, (tuple, list)) else (eos,)

  @property
  def max_positions(self) -> None:
    """Relative position buckets: no limit on sequence length."""
    return None

  @classmethod
  def from_hf(cls, hf: dict[str, Any], dtype: str = "float32", generation: dict | None = None) -> SwitchConfig:
    """Builds a config from a HF `switch_transformers` config.json dict (and generation_config.json's)."""
    model_type = hf.get("model_type")
    if model_type != "switch_transformers":
      raise ConfigError(f"config.json: model_type={model_type!r}, expected 'switch_transformers'")
    for key in _REQUIRED_HF_KEYS:
      fields.hf_int(hf, key)
    unsupported = {
      "dense_act_fn": ("relu",),
      "router_dtype": ("float32",),
      "router_bias": (False,),
      "is_encoder_decoder": (True,),
    }
    for key, allowed in unsupported.items():
      if key in hf and hf[key] not in allowed:
        raise ConfigError(f"config.json: {key}={hf[key]!r} unsupported (only {allowed[0]!r})")
    enc_layers = hf["num_layers"]
    dec_layers = fields.hf_int(hf, "num_decoder_layers", enc_layers)
    enc_step = fields.hf_int(hf, "encoder_sparse_step", None, minimum=0)
    if enc_step is None:
      enc_step = sparse_step(enc_layers, fields.hf_int(hf, "num_sparse_encoder_layers", 3, minimum=0))
    dec_step = fields.hf_int(hf, "decoder_sparse_step", None, minimum=0)
    if dec_step is None:
      dec_step = sparse_step(dec_layers, fields.hf_int(hf, "num_sparse_decoder_layers", 3, minimum=0))
    bos = fields.hf_token(hf, generation, "bos_token_id")
    start = fields.hf_token(hf, generation, "decoder_start_token_id", bos)  # transformers falls back to bos
    if start is None:
      raise ConfigError(
        "config.json: no decoder_start_token_id nor bos_token_id (here or in generation_config.json); "
        "transformers refuses to generate from such a model: set decoder_start_token_id (T5 models use 0, the pad id)"
      )
    return cls(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["d_model"],
      intermediate_size=hf["d_ff"],
      num_heads=hf["num_heads"],
      head_dim=hf["d_kv"],
      num_encoder_layers=enc_layers,
      num_decoder_layers=dec_layers,
      num_experts=hf["num_experts"],
      encoder_sparse_step=enc_step,
      decoder_sparse_step=dec_step,
      expert_capacity=fields.hf_int(hf, "expert_capacity", 64),
      relative_attention_num_buckets=fields.hf_int(hf, "relative_attention_num_buckets", 32),
      relative_attention_max_distance=fields.hf_int(hf, "relative_attention_max_distance", 128, minimum=0),
      layer_norm_eps=fields.hf_number(hf, "layer_norm_epsilon", 1e-6),
      tie_word_embeddings=fields.hf_bool(hf, "tie_word_embeddings", True),
      pad_token_id=fields.hf_token(hf, generation, "pad_token_id", 0),
      eos_token_id=fields.hf_token(hf, generation, "eos_token_id", 1, many=True),
      bos_token_id=bos,
      decoder_start_token_id=start,
      dtype=dtype,
    )

  def json_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "routing": self.routing.value}


PRESETS: dict[str, SwitchConfig] = {
  # Small enough to build and run in seconds on a CPU; byte vocabulary.
  "tiny-switch": SwitchConfig(
    vocab_size=259,
    hidden_size=32,
    intermediate_size=48,
    num_heads=4,
    head_dim=8,
    num_encoder_layers=2,
    num_decoder_layers=2,
    num_experts=4,
    encoder_sparse_step=2,
    decoder_sparse_step=1,
    expert_capacity=8,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    pad_token_id=258,
    eos_token_id=257,
    bos_token_id=256,
    decoder_start_token_id=258,
  ),
  "switch-base-8": SwitchConfig(
    vocab_size=32128,
    hidden_size=768,
    intermediate_size=3072,
    num_heads=12,
    head_dim=64,
    num_encoder_layers=12,
    num_decoder_layers=12,
    num_experts=8,
    encoder_sparse_step=2,
    decoder_sparse_step=2,
    expert_capacity=64,
    dtype="bfloat16",
  ),
}


def preset(name: str) -> SwitchConfig:
  """Exact-name lookup in the preset registry."""
  if name not in PRESETS:
    raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]
