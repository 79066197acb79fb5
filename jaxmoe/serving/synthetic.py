"""In-memory multi-tenant stores for tests and benchmarks (no consolidation run).

`synthetic_store(cfg, k)` derives K tenants from one random base the way
fine-tunes relate: every backbone (attention, norms, router, embeddings)
differs a little, and at a chosen share of (layer, expert) positions each
tenant has its own expert while the others share the base's.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxmoe import layouts
from jaxmoe.config import MixtralConfig
from jaxmoe.params import Params
from jaxmoe.tokenizer import ByteTokenizer


@dataclasses.dataclass
class MemoryStore:
  """The attributes the engine reads from `jaxmoe.store.Store`."""

  config: MixtralConfig
  tenants: list[str]
  pool: list[dict]
  backbones: dict[str, dict]
  slot_maps: dict[str, np.ndarray]
  tokenizer: object = None

  def params(self, name: str) -> Params:
    return {"backbone": self.backbones[name], "experts": self.pool, "slot_map": self.slot_maps[name]}


def synthetic_store(cfg: MixtralConfig, k: int, seed: int = 0, own_fraction: float = 0.25,
                    noise: float = 0.02) -> MemoryStore:
  """K tenants over one pool; `own_fraction` of positions hold a distinct expert per tenant."""
  rng = np.random.default_rng(seed)
  layout = layouts.layout(cfg)  # Mixtral or Switch
  base = layout.init_params(cfg, seed=seed, scale=0.1)
  names = [f"tenant{i}" for i in range(k)]

  def jitter(x):
    return (x + noise * rng.standard_normal(x.shape)).astype(x.dtype)

  backbones = {n: jax.tree.map(jitter, base["backbone"]) for n in names}
  num_layers = cfg.num_moe_layers
  own = rng.random((num_layers, cfg.num_experts)) < own_fraction
  pool, maps = [], {n: np.zeros((num_layers, cfg.num_experts), np.int32) for n in names}
  for layer in range(num_layers):
    slots = {w: list(base["experts"][layer][w]) for w in layout.EXPERT_NAMES}
    for e in range(cfg.num_experts):
      for t, n in enumerate(names):
        if own[layer, e] and t > 0:  # tenant 0 keeps the base expert; the others get their own
          for w in slots:
            slots[w].append(jitter(base["experts"][layer][w][e]) + 0.05)
          maps[n][layer, e] = len(slots[layout.EXPERT_NAMES[0]]) - 1
        else:
          maps[n][layer, e] = e
    pool.append({w: np.stack(v) for w, v in slots.items()})
  tok = ByteTokenizer() if cfg.vocab_size == ByteTokenizer.vocab_size else None
  return MemoryStore(cfg, names, pool, backbones, maps, tok)
