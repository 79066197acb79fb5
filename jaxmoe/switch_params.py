"""The Switch Transformer parameter layout (documented in jaxmoe/models/switch.py).

Shapes, random init, validation, and the checkpoint parts of a Switch model:
  globals        {embed | lm_head, encoder: {[embed], rel_bias, norm}, decoder: {[embed], rel_bias, norm}}
  encoder_NNNN   {backbone: encoder block n, experts: its pool (sparse blocks only)}
  decoder_NNNN   {backbone: decoder block n, experts: its pool (sparse blocks only)}
so a converter or a reader holds one block at a time, as for Mixtral.

Axis legend: V vocab, D model dim, F ffn dim, E experts, S pool slots, N heads,
H head dim, R relative-position buckets, L MoE layers.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxmoe.params import LayoutError, Params, abstract_tree, random_tree
from jaxmoe.params import identity_slot_map  # noqa: F401  (part of every layout module's interface)
from jaxmoe.switch_config import SwitchConfig

EXPERT_NAMES = ("wi", "wo")
STACKS = ("encoder", "decoder")


def _is_shape(x) -> bool:
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def block_shapes(cfg: SwitchConfig, stack: str, sparse: bool) -> dict[str, tuple[int, ...]]:
  d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  out = {"attn_norm": (d,), "q": (d, n, h), "k": (d, n, h), "v": (d, n, h), "o": (n, h, d)}
  if stack == "decoder":
    out.update({"cross_norm": (d,), "cq": (d, n, h), "ck": (d, n, h), "cv": (d, n, h), "co": (n, h, d)})
  out["mlp_norm"] = (d,)
  if sparse:
    out["router"] = (d, cfg.num_experts)
  else:
    out.update({"wi": (d, f), "wo": (f, d)})
  return out


def expert_shapes(cfg: SwitchConfig, num_slots: int) -> dict[str, tuple[int, ...]]:
  d, f = cfg.hidden_size, cfg.intermediate_size
  return {"wi": (num_slots, d, f), "wo": (num_slots, f, d)}


def stack_sparse(cfg: SwitchConfig, stack: str) -> tuple[bool, ...]:
  return cfg.encoder_sparse if stack == "encoder" else cfg.decoder_sparse


def backbone_shapes(cfg: SwitchConfig) -> dict[str, Any]:
  """Tied embeddings: one `embed`; untied: each stack's own `embed` and an `lm_head` (transformers 5)."""
  v, d = cfg.vocab_size, cfg.hidden_size
  out: dict[str, Any] = {"embed": (v, d)} if cfg.tie_word_embeddings else {"lm_head": (d, v)}
  for stack in STACKS:
    out[stack] = {
        **({} if cfg.tie_word_embeddings else {"embed": (v, d)}),
        "rel_bias": (cfg.relative_attention_num_buckets, cfg.num_heads),
        "layers": [block_shapes(cfg, stack, s) for s in stack_sparse(cfg, stack)],
        "norm": (d,),
    }
  return out


def param_shapes(cfg: SwitchConfig, slots_per_layer: list[int] | None = None) -> Params:
  """Shape tree of a full model; `slots_per_layer` (one per MoE layer) defaults to E."""
  slots = slots_per_layer or [cfg.num_experts] * cfg.num_moe_layers
  return {
      "backbone": backbone_shapes(cfg),
      "experts": [expert_shapes(cfg, s) for s in slots],
      "slot_map": (cfg.num_moe_layers, cfg.num_experts),
  }


def abstract_params(cfg: SwitchConfig, slots_per_layer: list[int] | None = None) -> Params:
  return abstract_tree(param_shapes(cfg, slots_per_layer), cfg.dtype)


def init_params(cfg: SwitchConfig, seed: int = 0, scale: float = 0.02) -> Params:
  """Random parameters (normal * scale, norms near 1), S = E, identity slot map."""
  return random_tree(cfg, param_shapes(cfg), seed, scale)


def check_params(cfg: SwitchConfig, params: Params) -> None:
  """Raises LayoutError naming the first leaf whose shape breaks the layout."""
  experts = params["experts"]
  if len(experts) != cfg.num_moe_layers:
    raise LayoutError(f"experts: {len(experts)} MoE layers, config says {cfg.num_moe_layers}")
  slots = [int(p["wi"].shape[0]) for p in experts]
  flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg, slots), is_leaf=_is_shape)[0]
  want = {jax.tree_util.keystr(p): s for p, s in flat}
  got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for key, shape in want.items():
    if key not in got:
      raise LayoutError(f"missing parameter {key}")
    if tuple(got[key].shape) != shape:
      raise LayoutError(f"parameter {key}: shape {tuple(got[key].shape)}, expected {shape}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise LayoutError(f"unexpected parameter {extra[0]}")
  smap = np.asarray(params["slot_map"])
  if smap.size and (smap.min() < 0 or np.any(smap >= np.asarray(slots)[:, None])):
    raise LayoutError("slot_map points outside its layer's expert pool")


# Checkpoint parts.
def part_names(cfg: SwitchConfig) -> list[str]:
  return (["globals"] + [f"encoder_{i:04d}" for i in range(cfg.num_encoder_layers)]
          + [f"decoder_{i:04d}" for i in range(cfg.num_decoder_layers)])


def moe_parts(cfg: SwitchConfig) -> list[str]:
  """The part holding each MoE layer's pool, in slot-map order."""
  return [f"{stack}_{i:04d}" for stack, i in cfg.moe_blocks]


def globals_part(backbone: dict) -> dict:
  """Everything of a backbone but the blocks."""
  out = {k: v for k, v in backbone.items() if k not in STACKS}
  out.update({s: {k: v for k, v in backbone[s].items() if k != "layers"} for s in STACKS})
  return out


def split_parts(cfg: SwitchConfig, params: Params) -> dict[str, dict]:
  """params (or a tree of the same structure) -> {part name: tree}."""
  bb = params["backbone"]
  parts = {"globals": globals_part(bb)}
  pools = dict(zip(moe_parts(cfg), params["experts"]))
  for stack in STACKS:
    for i, block in enumerate(bb[stack]["layers"]):
      name = f"{stack}_{i:04d}"
      parts[name] = {"backbone": block, **({"experts": pools[name]} if name in pools else {})}
  return parts


def join_parts(cfg: SwitchConfig, parts: dict[str, dict], slot_map) -> Params:
  """The inverse of `split_parts`."""
  glob = parts["globals"]
  bb: dict[str, Any] = {k: v for k, v in glob.items() if k not in STACKS}
  for stack in STACKS:
    n = cfg.num_encoder_layers if stack == "encoder" else cfg.num_decoder_layers
    bb[stack] = {**glob[stack], "layers": [parts[f"{stack}_{i:04d}"]["backbone"] for i in range(n)]}
  experts = [parts[name]["experts"] for name in moe_parts(cfg)]
  return {"backbone": bb, "experts": experts, "slot_map": slot_map}
