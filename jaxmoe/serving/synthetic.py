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

from jaxmoe.families import base, registry
from jaxmoe.io.tokenizer import ByteTokenizer
from jaxmoe.trees import Params


@dataclasses.dataclass
class MemoryStore:
  """What the engine reads of a `jaxmoe.io.store.Store`: served backbones over one pool."""

  config: object
  tenants: list[str]
  pool: dict  # {leaf: [X, ...]}
  backbones: dict[str, dict]
  slot_maps: dict[str, np.ndarray]  # global [L, E]
  tokenizer: object = None

  def params(self, name: str) -> Params:
    return {"backbone": self.backbones[name], "experts": self.pool, "slot_map": self.slot_maps[name]}

  def export_params(self, name: str) -> Params:
    """Tenant `name` as a single model (its experts gathered out of the pool)."""
    return base.plain_model(self.params(name))


def single_store(cfg, params: Params, name: str = "model", tokenizer=None) -> MemoryStore:
  """One model as a one-tenant store."""
  return MemoryStore(
    cfg,
    [name],
    params["experts"],
    {name: params["backbone"]},
    {name: np.asarray(params["slot_map"], np.int32)},
    tokenizer,
  )


def synthetic_store(cfg, k: int, seed: int = 0, own_fraction: float = 0.25, noise: float = 0.02) -> MemoryStore:
  """K tenants over one pool; `own_fraction` of positions hold a distinct expert per tenant."""
  rng = np.random.default_rng(seed)
  layout = registry.of(cfg).layout
  model = layout.init_params(cfg, seed=seed, scale=0.1)
  names = [f"tenant{i}" for i in range(k)]

  def jitter(x):
    return (x + noise * rng.standard_normal(x.shape)).astype(x.dtype)

  backbones = {n: jax.tree.map(jitter, model["backbone"]) for n in names}
  num_layers, num_experts = cfg.num_moe_layers, cfg.num_experts
  own = rng.random((num_layers, num_experts)) < own_fraction
  pools, local = [], {n: np.zeros((num_layers, num_experts), np.int32) for n in names}
  for layer in range(num_layers):
    first = layer * num_experts  # the base model's experts of this layer
    slots = {w: list(model["experts"][w][first : first + num_experts]) for w in layout.EXPERT_NAMES}
    for e in range(num_experts):
      for t, n in enumerate(names):
        if own[layer, e] and t > 0:  # tenant 0 keeps the base expert; the others get their own
          for w in slots:
            slots[w].append(jitter(model["experts"][w][first + e]) + 0.05)
          local[n][layer, e] = len(slots[layout.EXPERT_NAMES[0]]) - 1
        else:
          local[n][layer, e] = e
    pools.append({w: np.stack(v) for w, v in slots.items()})
  pool, _ = base.join_pools(pools, local[names[0]])
  sizes = [len(p[layout.EXPERT_NAMES[0]]) for p in pools]
  maps = {n: base.global_slot_map(local[n], sizes) for n in names}
  tok = ByteTokenizer() if cfg.vocab_size == ByteTokenizer.vocab_size else None
  return MemoryStore(cfg, names, pool, backbones, maps, tok)
