"""Training recipes: a base pretraining and K fine-tunes, as frozen configs.

`Recipe` (Mixtral): a decoder-only base trained on the mix of the corpora,
one full fine-tune per domain. `SwitchRecipe`: an encoder-decoder base
pretrained with span corruption on the same corpora, one full fine-tune per
text-to-text task (tasks.py). A recipe fixes everything that decides the
trained weights (model shape, data, optimizer, seeds), so its hash keys the
cache of trained checkpoints (`key`). Presets live in one exact-name registry
(`recipe(name)`); `family` says which kind a recipe is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys

from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.families.switch.config import Routing, SwitchConfig
from jaxmoe.train import tasks
from jaxmoe.train.corpus import DOMAINS

# Bump when training or corpus code changes what a recipe produces: it is part of the cache key.
CODE_VERSION = 1
SWITCH_CODE_VERSION = 1  # the same for Switch recipes (tasks.py, seq2seq.py)


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
  def family(self) -> str:
    return "mixtral"

  @property
  def tenants(self) -> tuple[str, ...]:
    return self.domains

  @property
  def key(self) -> str:
    """Cache key: the recipe, the code version and the Python version (the corpus comes from its stdlib)."""
    return _key(self.name, self.to_json())


def _key(name: str, recipe_json: str, version: int | None = None) -> str:
  version = CODE_VERSION if version is None else version
  text = f"{recipe_json}|code={version}|py={sys.version_info[0]}.{sys.version_info[1]}"
  return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


@dataclasses.dataclass(frozen=True)
class SwitchRecipe:
  """A Switch base pretrained with span corruption on the mix of `domains`, then one full fine-tune per task."""

  name: str
  model: SwitchConfig
  base: Phase
  finetune: Phase
  tasks: tuple[str, ...] = tasks.DEFAULT_TASKS  # one tenant per task, named after it
  batch_size: int = 16
  span_len: int = 64  # bytes of text per pretraining row
  noise_density: float = 0.15  # T5's span corruption: fraction of the bytes masked
  mean_span: float = 3.0  # and the mean length of a masked span
  balance_coef: float = 0.01
  init_seed: int = 0
  init_scale: float = 1.0  # T5's initializer factor (seq2seq.init_params)
  domains: tuple[str, ...] = DOMAINS  # pretraining text

  def __post_init__(self):
    for name in self.tasks:
      tasks.task(name)
    if len(set(self.tasks)) != len(self.tasks) or any(d not in DOMAINS for d in self.domains):
      raise ValueError(f"tasks {self.tasks} must be distinct and domains {self.domains} from {DOMAINS}")
    if self.model.routing is not Routing.DROPLESS:
      raise ValueError("Switch tenants train and serve dropless: model.routing must be 'dropless'")

  @property
  def family(self) -> str:
    return "switch"

  @property
  def tenants(self) -> tuple[str, ...]:
    return self.tasks

  def to_json(self) -> str:
    data = dataclasses.asdict(self)
    data["model"] = self.model.json_dict()
    return json.dumps(data, sort_keys=True)

  @property
  def key(self) -> str:
    """Cache key, as `Recipe.key`, with the Switch training code's version."""
    return _key(self.name, self.to_json(), SWITCH_CODE_VERSION)


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


def byte_switch(hidden: int, ffn: int, layers: int, experts: int, heads: int = 4, sparse_step: int = 1) -> SwitchConfig:
  """A Switch config over the byte vocabulary (ByteTokenizer), tied embeddings, dropless routing."""
  return SwitchConfig(
    vocab_size=259,
    hidden_size=hidden,
    intermediate_size=ffn,
    num_heads=heads,
    head_dim=hidden // heads,
    num_encoder_layers=layers,
    num_decoder_layers=layers,
    num_experts=experts,
    encoder_sparse_step=sparse_step,
    decoder_sparse_step=sparse_step,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    pad_token_id=258,
    eos_token_id=257,
    bos_token_id=256,
    decoder_start_token_id=258,
    routing=Routing.DROPLESS,
  )


RECIPES: dict[str, Recipe | SwitchRecipe] = {
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
  # The Switch tenants of bench/quality_switch.py and jaxmoe-demo --family=switch.
  "switch-demo": SwitchRecipe(
    name="switch-demo",
    model=byte_switch(hidden=64, ffn=64, layers=2, experts=8),
    base=Phase(steps=600, peak_lr=3e-3, warmup_steps=50, weight_decay=0.01, seed=0),
    finetune=Phase(steps=2000, peak_lr=3e-3, warmup_steps=30, weight_decay=0.0, seed=1),
    batch_size=16,
    span_len=64,
  ),
  # CI: a few steps of a tiny Switch; checks plumbing, not quality. Two tasks of one shape: one
  # compiled fine-tuning step.
  "switch-test": SwitchRecipe(
    name="switch-test",
    model=byte_switch(hidden=16, ffn=16, layers=1, experts=4, heads=2),
    tasks=("code-params", "prose-lower"),
    base=Phase(steps=3, peak_lr=3e-3, warmup_steps=1, seed=0),
    finetune=Phase(steps=2, peak_lr=1e-3, warmup_steps=1, seed=1),
    batch_size=4,
    span_len=24,
  ),
}


def recipe(name: str) -> Recipe | SwitchRecipe:
  """Exact-name lookup in the recipe registry."""
  if name not in RECIPES:
    raise KeyError(f"unknown recipe {name!r}; known: {sorted(RECIPES)}")
  return RECIPES[name]
