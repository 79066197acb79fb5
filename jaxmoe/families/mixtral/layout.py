"""The Mixtral parameter layout: shapes, random init, validation, checkpoint parts.

Served (the Flax modules' variables, jaxmoe/families/base.py):

  backbone                     one per tenant, the non-expert weights
    embed        [V, D]
    layers                     every decoder layer, stacked on a leading L axis
      attn_norm  [L, D]
      q          [L, D, N, H]
      k          [L, D, M, H]
      v          [L, D, M, H]
      o          [L, N, H, D]
      mlp_norm   [L, D]
      router     [L, D, E]
    norm         [D]
    lm_head      [D, V]
  experts                      the expert pool over every layer
    w1           [X, D, F]     gate projection
    w3           [X, D, F]     up projection
    w2           [X, F, D]     down projection
  slot_map       [L, E] int32  layer l's logical expert e is pool slot slot_map[l, e]

Checkpoint parts: globals {embed, norm, lm_head}; layer_NNNN {backbone: that
layer's leaves (no L axis), experts: its pool [X_l, ...]}.
"""

from __future__ import annotations

import numpy as np

from jaxmoe import trees
from jaxmoe.families import base
from jaxmoe.families.mixtral.config import MixtralConfig

Params = trees.Params
EXPERT_NAMES = ("w1", "w3", "w2")
GLOBAL_NAMES = ("embed", "norm", "lm_head")
SCANNED = (("layers",),)  # subtrees whose leaves carry a leading layer axis


def layer_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
  """One decoder layer's backbone leaves."""
  d, h = cfg.hidden_size, cfg.head_dim
  return {
    "attn_norm": (d,),
    "q": (d, cfg.num_heads, h),
    "k": (d, cfg.num_kv_heads, h),
    "v": (d, cfg.num_kv_heads, h),
    "o": (cfg.num_heads, h, d),
    "mlp_norm": (d,),
    "router": (d, cfg.num_experts),
  }


def global_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
  return {
    "embed": (cfg.vocab_size, cfg.hidden_size),
    "norm": (cfg.hidden_size,),
    "lm_head": (cfg.hidden_size, cfg.vocab_size),
  }


def expert_shapes(cfg: MixtralConfig, num_slots: int) -> dict[str, tuple[int, ...]]:
  d, f = cfg.hidden_size, cfg.intermediate_size
  return {"w1": (num_slots, d, f), "w3": (num_slots, d, f), "w2": (num_slots, f, d)}


def backbone_shapes(cfg: MixtralConfig) -> dict:
  layers = {k: (cfg.num_layers, *s) for k, s in layer_shapes(cfg).items()}
  return {**global_shapes(cfg), "layers": layers}


def param_shapes(cfg: MixtralConfig, num_slots: int | None = None) -> Params:
  """Served shape tree; the pool has `num_slots` slots (default L * E, a single model)."""
  x = cfg.num_layers * cfg.num_experts if num_slots is None else num_slots
  return {
    "backbone": backbone_shapes(cfg),
    "experts": expert_shapes(cfg, x),
    "slot_map": (cfg.num_layers, cfg.num_experts),
  }


def abstract_params(cfg: MixtralConfig, num_slots: int | None = None) -> Params:
  return base.abstract_served(param_shapes(cfg, num_slots), cfg.dtype)


def check_params(cfg: MixtralConfig, params: Params) -> None:
  """Raises LayoutError naming the first leaf that breaks the served layout."""
  base.check_served(param_shapes, cfg, params)


def identity_slot_map(cfg: MixtralConfig) -> np.ndarray:
  return base.identity_slot_map(cfg.num_moe_layers, cfg.num_experts)


def init_params(cfg: MixtralConfig, seed: int = 0, scale: float = 0.02) -> Params:
  """Random parameters (normal * scale, norms near 1), a single model.

  Leaves are drawn in the order of the per-layer tree (embed, each layer,
  lm_head, norm, then each layer's experts), so a seed gives the same weights
  it gave before layers were stacked.
  """
  rng = np.random.default_rng(seed)
  per_layer = {
    "backbone": {**global_shapes(cfg), "layers": [layer_shapes(cfg)] * cfg.num_layers},
    "experts": [expert_shapes(cfg, cfg.num_experts)] * cfg.num_layers,
  }
  leaves = trees.random_leaves(per_layer, rng, cfg.dtype, scale)
  bb = leaves["backbone"]
  parts = {"globals": {k: bb[k] for k in GLOBAL_NAMES}}
  for i, (layer, pool) in enumerate(zip(bb["layers"], leaves["experts"])):
    parts[part_name(i)] = {"backbone": layer, "experts": pool}
  return join_parts(cfg, parts, base.local_identity_slot_map(cfg.num_moe_layers, cfg.num_experts))


# Checkpoint parts.
def part_name(layer: int) -> str:
  return f"layer_{layer:04d}"


def part_names(cfg: MixtralConfig) -> list[str]:
  return ["globals"] + [part_name(i) for i in range(cfg.num_layers)]


def moe_parts(cfg: MixtralConfig) -> list[str]:
  """The part holding each MoE layer's pool, in slot-map order."""
  return [part_name(i) for i in range(cfg.num_layers)]


def part_shapes(cfg: MixtralConfig, slots_per_layer: list[int]) -> dict[str, dict]:
  """{part: shape tree} of a checkpoint whose MoE layer l's pool has slots_per_layer[l] slots."""
  out = {"globals": global_shapes(cfg)}
  for i, x in enumerate(slots_per_layer):
    out[part_name(i)] = {"backbone": layer_shapes(cfg), "experts": expert_shapes(cfg, x)}
  return out


def join_backbone(cfg: MixtralConfig, parts: dict[str, dict]) -> dict:
  """{part: its backbone tree} (globals whole, each layer's leaves) -> a served backbone."""
  return {**parts["globals"], "layers": trees.stack([parts[name] for name in moe_parts(cfg)])}


def join_parts(cfg: MixtralConfig, parts: dict[str, dict], local_slot_map) -> Params:
  """Checkpoint parts and slot maps local to each layer's pool -> the served tree."""
  pool, slot_map = base.join_pools([parts[name]["experts"] for name in moe_parts(cfg)], local_slot_map)
  bb = {name: tree if name == "globals" else tree["backbone"] for name, tree in parts.items()}
  return {"backbone": join_backbone(cfg, bb), "experts": pool, "slot_map": slot_map}


def split_backbone(cfg: MixtralConfig, backbone: dict) -> dict[str, dict]:
  """A served backbone -> {part: its backbone tree} (globals whole; each layer's leaves)."""
  out = {"globals": {k: backbone[k] for k in GLOBAL_NAMES}}
  for i in range(cfg.num_layers):
    out[part_name(i)] = {k: np.asarray(v)[i] for k, v in backbone["layers"].items()}
  return out


def split_parts(cfg: MixtralConfig, params: Params) -> tuple[dict[str, dict], np.ndarray]:
  """The inverse of `join_parts`: (parts, local slot maps [L, E])."""
  pools, local = base.split_pools(params["experts"], params["slot_map"])
  bb = split_backbone(cfg, params["backbone"])
  parts = {"globals": bb["globals"]}
  for i, pool in enumerate(pools):
    parts[part_name(i)] = {"backbone": bb[part_name(i)], "experts": pool}
  return parts, local
