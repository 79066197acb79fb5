"""Training recipes: a base pretraining and K single-domain fine-tunes, as frozen configs.

A recipe fixes everything that decides the trained weights (model shape, data,
optimizer, seeds), so its hash keys the cache of trained checkpoints
(`Recipe.key`). Presets live in an exact-name registry (`recipe(name)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys

from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.train.corpus import DOMAINS

# Bump when training or corpus code changes what a recipe produces: it is part of the cache key.
CODE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Phase:
  """One training run: AdamW with linear warmup then cosine decay, global-norm clipping."""

  steps: int
  peak_lr: float
  warmup_steps: int
  end_lr_ratio: float = 0.1  # final learning rate = peak_lr * end_lr_ratio
  weight_decay: float = 0.0  # decoupled (AdamW), on matrices only
  clip_norm: float = 1.0
  b1: float = 0.9
  b2: float = 0.95
  seed: int = 0  # data order

  def __post_init__(self):
    if self.steps < 1 or not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f"need steps >= 1 and 0 <= warmup_steps < steps, got {self}")


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A base model pretrained on the mix of `domains`, then one full fine-tune per domain."""

  name: str
  model: MixtralConfig
  base: Phase
  finetune: Phase
  batch_size: int = 16
  seq_len: int = 128
  balance_coef: float = 0.01  # router load-balancing loss weight (Switch/Mixtral use 0.01-0.02)
  init_seed: int = 0
  init_scale: float = 0.02
  domains: tuple[str, ...] = DOMAINS  # one tenant per domain, named after it

  def __post_init__(self):
    unknown = [d for d in self.domains if d not in DOMAINS]
    if unknown or len(set(self.domains)) != len(self.domains):
      raise ValueError(f"domains {self.domains} must be distinct names from {DOMAINS}")
    if self.seq_len + 1 > self.model.max_position_embeddings:
      raise ValueError(f"seq_len={self.seq_len} does not fit max_position_embeddings")

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @property
  def key(self) -> str:
    """Cache key: the recipe, the code version and the Python version (the corpus comes from its stdlib)."""
    text = f"{self.to_json()}|code={CODE_VERSION}|py={sys.version_info[0]}.{sys.version_info[1]}"
    return f"{self.name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def byte_model(
  hidden: int, ffn: int, layers: int, experts: int, top_k: int = 2, heads: int = 4, kv_heads: int = 2
) -> MixtralConfig:
  """A Mixtral-architecture config over the byte vocabulary (ByteTokenizer: 259 ids)."""
  return MixtralConfig(
    vocab_size=259,
    hidden_size=hidden,
    intermediate_size=ffn,
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    num_experts=experts,
    top_k=top_k,
    head_dim=hidden // heads,
    rope_theta=10000.0,
    max_position_embeddings=512,
    bos_token_id=256,
    eos_token_id=257,
    pad_token_id=258,
  )


RECIPES: dict[str, Recipe] = {
  # The demo's tenants: base + 4 fine-tunes in 2-4 minutes on 2 CPU cores (bench/results/quality).
  "demo": Recipe(
    name="demo",
    model=byte_model(hidden=64, ffn=64, layers=2, experts=8),
    base=Phase(steps=700, peak_lr=4e-3, warmup_steps=50, weight_decay=0.01, seed=0),
    finetune=Phase(steps=100, peak_lr=3e-4, warmup_steps=10, weight_decay=0.0, seed=1),
  ),
  # CI: a few steps of a tiny model; checks plumbing, not quality.
  "test": Recipe(
    name="test",
    model=byte_model(hidden=32, ffn=32, layers=1, experts=4, heads=2, kv_heads=1),
    base=Phase(steps=4, peak_lr=3e-3, warmup_steps=1, seed=0),
    finetune=Phase(steps=2, peak_lr=1e-3, warmup_steps=1, seed=1),
    batch_size=4,
    seq_len=32,
  ),
}


def recipe(name: str) -> Recipe:
  """Exact-name lookup in the recipe registry."""
  if name not in RECIPES:
    raise KeyError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
  return RECIPES[name]
