"""The parameter layout every part of jaxmoe shares (DESIGN.md).

A served model is `{"backbone": ..., "experts": [...], "slot_map": ...}`:

  backbone                     one per tenant, the non-expert weights
    embed        [V, D]
    layers[l]    one dict per layer, l < L
      attn_norm  [D]
      q          [D, N, H]
      k          [D, M, H]
      v          [D, M, H]
      o          [N, H, D]
      mlp_norm   [D]
      router     [D, E]
    norm         [D]
    lm_head      [D, V]
  experts[l]                   the expert pool of MoE layer l (S_l slots)
    w1           [S, D, F]     gate projection
    w3           [S, D, F]     up projection
    w2           [S, F, D]     down projection
  slot_map       [L, E] int32  logical expert e of layer l lives in slot
                               slot_map[l, e] of experts[l]

Axis legend used throughout jaxmoe: B batch, T tokens (queries), S key
positions or pool slots, D model dim, F ffn dim, E experts, K top-k, N query
heads, M key/value heads, G query heads per kv head, H head dim, L layers,
V vocab.
A single model is the case S = E with slot_map[l] = arange(E).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.config import MixtralConfig

Params = dict[str, Any]

EXPERT_NAMES = ("w1", "w3", "w2")


class LayoutError(ValueError):
  """Parameters that do not match the layout for their config."""


def layer_shapes(cfg: MixtralConfig) -> dict[str, tuple[int, ...]]:
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


def expert_shapes(cfg: MixtralConfig, num_slots: int) -> dict[str, tuple[int, ...]]:
  d, f = cfg.hidden_size, cfg.intermediate_size
  return {"w1": (num_slots, d, f), "w3": (num_slots, d, f), "w2": (num_slots, f, d)}


def backbone_shapes(cfg: MixtralConfig) -> dict[str, Any]:
  return {
      "embed": (cfg.vocab_size, cfg.hidden_size),
      "layers": [layer_shapes(cfg) for _ in range(cfg.num_layers)],
      "norm": (cfg.hidden_size,),
      "lm_head": (cfg.hidden_size, cfg.vocab_size),
  }


def param_shapes(cfg: MixtralConfig, slots_per_layer: list[int] | None = None) -> Params:
  """Shape tree of a full model; `slots_per_layer` defaults to E everywhere."""
  slots = slots_per_layer or [cfg.num_experts] * cfg.num_layers
  return {
      "backbone": backbone_shapes(cfg),
      "experts": [expert_shapes(cfg, s) for s in slots],
      "slot_map": (cfg.num_layers, cfg.num_experts),
  }


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def abstract_params(cfg: MixtralConfig, slots_per_layer: list[int] | None = None) -> Params:
  """ShapeDtypeStructs for restoring a checkpoint without reading it first."""
  return abstract_tree(param_shapes(cfg, slots_per_layer), cfg.dtype)


def abstract_tree(shapes: Params, dtype: str) -> Params:
  """A param_shapes tree (any family) as ShapeDtypeStructs; the slot map is int32."""
  out = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), shapes, is_leaf=_is_shape)
  out["slot_map"] = jax.ShapeDtypeStruct(shapes["slot_map"], jnp.int32)
  return out


def identity_slot_map(cfg) -> np.ndarray:
  """[L_moe, E]: expert e of every MoE layer in slot e (a single model, S = E)."""
  return np.tile(np.arange(cfg.num_experts, dtype=np.int32), (cfg.num_moe_layers, 1))


def init_params(cfg: MixtralConfig, seed: int = 0, scale: float = 0.02) -> Params:
  """Random parameters (normal * scale, norms at 1), S = E, identity slot map."""
  return random_tree(cfg, param_shapes(cfg), seed, scale)


def random_tree(cfg, shapes: Params, seed: int, scale: float) -> Params:
  """Random leaves for a param_shapes tree of `cfg`'s family: normal * scale, norms near 1."""
  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(cfg.dtype)

  def make(path, shape):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
    return (scale * rng.standard_normal(shape)).astype(dtype)

  tree = {k: v for k, v in shapes.items() if k != "slot_map"}
  out = jax.tree_util.tree_map_with_path(make, tree, is_leaf=_is_shape)
  out["slot_map"] = identity_slot_map(cfg)
  assert out["slot_map"].shape == shapes["slot_map"]
  return out


def check_params(cfg: MixtralConfig, params: Params) -> None:
  """Raises LayoutError naming the first leaf whose shape breaks the layout."""
  slots = [int(p["w1"].shape[0]) for p in params["experts"]]
  if len(slots) != cfg.num_layers:
    raise LayoutError(f"experts: {len(slots)} layers, config says {cfg.num_layers}")
  want = jax.tree_util.tree_flatten_with_path(param_shapes(cfg, slots), is_leaf=_is_shape)[0]
  got = jax.tree_util.tree_flatten_with_path(params)[0]
  got_paths = {jax.tree_util.keystr(p): x for p, x in got}
  for path, shape in want:
    key = jax.tree_util.keystr(path)
    if key not in got_paths:
      raise LayoutError(f"missing parameter {key}")
    if tuple(got_paths[key].shape) != shape:
      raise LayoutError(f"parameter {key}: shape {tuple(got_paths[key].shape)}, expected {shape}")
  smap = np.asarray(params["slot_map"])
  if smap.min() < 0 or np.any(smap >= np.asarray(slots)[:, None]):
    raise LayoutError("slot_map points outside its layer's expert pool")


# Checkpoint parts: globals {embed, norm, lm_head}; layer_NNNN {backbone: layer, experts: pool}.
def part_names(cfg: MixtralConfig) -> list[str]:
  return ["globals"] + [f"layer_{i:04d}" for i in range(cfg.num_layers)]


def moe_parts(cfg: MixtralConfig) -> list[str]:
  """The part holding each MoE layer's pool, in slot-map order."""
  return [f"layer_{i:04d}" for i in range(cfg.num_layers)]


def split_parts(cfg: MixtralConfig, params: Params) -> dict[str, dict]:
  """params (or a tree of the same structure) -> {part name: tree}."""
  bb = params["backbone"]
  parts = {"globals": {k: bb[k] for k in ("embed", "norm", "lm_head")}}
  for i, (layer, pool) in enumerate(zip(bb["layers"], params["experts"])):
    parts[f"layer_{i:04d}"] = {"backbone": layer, "experts": pool}
  return parts


def join_parts(cfg: MixtralConfig, parts: dict[str, dict], slot_map) -> Params:
  """The inverse of `split_parts`."""
  layers = [parts[name] for name in moe_parts(cfg)]
  return {
      "backbone": {**parts["globals"], "layers": [p["backbone"] for p in layers]},
      "experts": [p["experts"] for p in layers],
      "slot_map": slot_map,
  }
