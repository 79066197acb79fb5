"""The Switch Transformer parameter layout: shapes, random init, validation, checkpoint parts.

Served (the Flax modules' variables, jaxmoe/families/base.py):

  backbone                       one per tenant, the non-expert weights
    embed          [V, D]        tied embeddings only: input of both stacks and the LM head
    lm_head        [D, V]        untied only
    encoder
      embed        [V, D]        untied only: the encoder's own input embedding
      rel_bias     [Z, N]        relative-position bias (HF block 0's), used by every block
      layers                     the blocks in groups of `period` (the sparse pattern's period),
        block_j    leaves [G, ...] of block j of every group, G = blocks / period:
          attn_norm  [D]
          q, k, v    [D, N, H]
          o          [N, H, D]
          mlp_norm   [D]
          wi [D, F], wo [F, D]   dense blocks: relu(x wi) wo
          router     [D, E]      sparse blocks (their experts live in the pool)
      norm         [D]
    decoder
      embed        [V, D]        untied only
      rel_bias     [Z, N]
      layers                     as the encoder's; each block also has cross-attention:
          cross_norm [D]
          cq, ck, cv [D, N, H]
          co         [N, H, D]
      norm         [D]
  experts                        the pool: MoE layer m is the m-th sparse block, encoder first
    wi             [X, D, F]
    wo             [X, F, D]
  slot_map         [L, E] int32  MoE layer m's logical expert e is pool slot slot_map[m, e]

Block i of a stack is block_{i % period} of group i // period. Checkpoint
parts: globals {embed | lm_head, encoder: {[embed], rel_bias, norm}, decoder:
{...}}; encoder_NNNN and decoder_NNNN {backbone: block i, experts: its pool
(sparse blocks only)}.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxmoe import trees
from jaxmoe.families import base
from jaxmoe.families.switch.config import SwitchConfig

Params = trees.Params
EXPERT_NAMES = ("wi", "wo")
STACKS = ("encoder", "decoder")
SCANNED = (("encoder", "layers"), ("decoder", "layers"))


def stack_sparse(cfg: SwitchConfig, stack: str) -> tuple[bool, ...]:
  return cfg.encoder_sparse if stack == "encoder" else cfg.decoder_sparse


def period(cfg: SwitchConfig, stack: str) -> int:
  """Blocks per scanned group: the sparse pattern repeats every `step` blocks (all of them if irregular)."""
  n = len(stack_sparse(cfg, stack))
  step = cfg.encoder_sparse_step if stack == "encoder" else cfg.decoder_sparse_step
  if step <= 1:
    return 1
  return step if n % step == 0 else n


def pattern(cfg: SwitchConfig, stack: str) -> tuple[bool, ...]:
  """Which blocks of one group are sparse."""
  return stack_sparse(cfg, stack)[: period(cfg, stack)]


def num_groups(cfg: SwitchConfig, stack: str) -> int:
  return len(stack_sparse(cfg, stack)) // period(cfg, stack)


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


def global_shapes(cfg: SwitchConfig) -> dict[str, Any]:
  """Tied embeddings: one `embed`; untied: each stack's own `embed` and an `lm_head` (transformers 5)."""
  v, d = cfg.vocab_size, cfg.hidden_size
  out: dict[str, Any] = {"embed": (v, d)} if cfg.tie_word_embeddings else {"lm_head": (d, v)}
  for stack in STACKS:
    out[stack] = {
      **({} if cfg.tie_word_embeddings else {"embed": (v, d)}),
      "rel_bias": (cfg.relative_attention_num_buckets, cfg.num_heads),
      "norm": (d,),
    }
  return out


def stack_layer_shapes(cfg: SwitchConfig, stack: str) -> dict[str, dict]:
  """{block_j: leaves [G, ...]} of one stack's scanned groups."""
  g = num_groups(cfg, stack)
  return {
    f"block_{j}": {k: (g, *s) for k, s in block_shapes(cfg, stack, sparse).items()}
    for j, sparse in enumerate(pattern(cfg, stack))
  }


def backbone_shapes(cfg: SwitchConfig) -> dict[str, Any]:
  out = global_shapes(cfg)
  for stack in STACKS:
    out[stack] = {**out[stack], "layers": stack_layer_shapes(cfg, stack)}
  return out


def param_shapes(cfg: SwitchConfig, num_slots: int | None = None) -> Params:
  """Served shape tree; the pool has `num_slots` slots (default L * E, a single model)."""
  x = cfg.num_moe_layers * cfg.num_experts if num_slots is None else num_slots
  return {
    "backbone": backbone_shapes(cfg),
    "experts": expert_shapes(cfg, x),
    "slot_map": (cfg.num_moe_layers, cfg.num_experts),
  }


def abstract_params(cfg: SwitchConfig, num_slots: int | None = None) -> Params:
  return base.abstract_served(param_shapes(cfg, num_slots), cfg.dtype)


def check_params(cfg: SwitchConfig, params: Params) -> None:
  """Raises LayoutError naming the first leaf that breaks the served layout."""
  base.check_served(param_shapes, cfg, params)


def identity_slot_map(cfg: SwitchConfig) -> np.ndarray:
  return base.identity_slot_map(cfg.num_moe_layers, cfg.num_experts)


def init_params(cfg: SwitchConfig, seed: int = 0, scale: float = 0.02) -> Params:
  """Random parameters (normal * scale, norms near 1), a single model."""
  rng = np.random.default_rng(seed)
  shapes = part_shapes(cfg, [cfg.num_experts] * cfg.num_moe_layers)
  parts = {name: trees.random_leaves(tree, rng, cfg.dtype, scale) for name, tree in shapes.items()}
  return join_parts(cfg, parts, base.local_identity_slot_map(cfg.num_moe_layers, cfg.num_experts))


# Checkpoint parts.
def block_part(stack: str, i: int) -> str:
  return f"{stack}_{i:04d}"


def part_names(cfg: SwitchConfig) -> list[str]:
  return ["globals"] + [block_part(s, i) for s in STACKS for i in range(len(stack_sparse(cfg, s)))]


def moe_parts(cfg: SwitchConfig) -> list[str]:
  """The part holding each MoE layer's pool, in slot-map order."""
  return [block_part(stack, i) for stack, i in cfg.moe_blocks]


def part_shapes(cfg: SwitchConfig, slots_per_layer: list[int]) -> dict[str, dict]:
  """{part: shape tree} of a checkpoint whose MoE layer m's pool has slots_per_layer[m] slots."""
  pools = dict(zip(moe_parts(cfg), slots_per_layer))
  out = {"globals": global_shapes(cfg)}
  for stack in STACKS:
    for i, sparse in enumerate(stack_sparse(cfg, stack)):
      name = block_part(stack, i)
      out[name] = {"backbone": block_shapes(cfg, stack, sparse)}
      if sparse:
        out[name]["experts"] = expert_shapes(cfg, pools[name])
  return out


def _group_blocks(cfg: SwitchConfig, stack: str, blocks: list[dict]) -> dict:
  p = period(cfg, stack)
  return {f"block_{j}": trees.stack(blocks[j::p]) for j in range(p)}


def join_backbone(cfg: SwitchConfig, parts: dict[str, dict]) -> dict:
  """{part: its backbone tree} (globals whole, each block's leaves) -> a served backbone."""
  glob = parts["globals"]
  bb: dict[str, Any] = {k: v for k, v in glob.items() if k not in STACKS}
  for stack in STACKS:
    blocks = [parts[block_part(stack, i)] for i in range(len(stack_sparse(cfg, stack)))]
    bb[stack] = {**glob[stack], "layers": _group_blocks(cfg, stack, blocks)}
  return bb


def join_parts(cfg: SwitchConfig, parts: dict[str, dict], local_slot_map) -> Params:
  """Checkpoint parts and slot maps local to each MoE layer's pool -> the served tree."""
  pool, slot_map = base.join_pools([parts[name]["experts"] for name in moe_parts(cfg)], local_slot_map)
  bb = {name: tree if name == "globals" else tree["backbone"] for name, tree in parts.items()}
  return {"backbone": join_backbone(cfg, bb), "experts": pool, "slot_map": slot_map}


def split_backbone(cfg: SwitchConfig, backbone: dict) -> dict[str, dict]:
  """A served backbone -> {part: its backbone tree} (globals whole; each block's leaves)."""
  glob = {k: v for k, v in backbone.items() if k not in STACKS}
  glob.update({s: {k: v for k, v in backbone[s].items() if k != "layers"} for s in STACKS})
  out = {"globals": glob}
  for stack in STACKS:
    p, layers = period(cfg, stack), backbone[stack]["layers"]
    for i in range(len(stack_sparse(cfg, stack))):
      out[block_part(stack, i)] = {k: np.asarray(v)[i // p] for k, v in layers[f"block_{i % p}"].items()}
  return out


def split_parts(cfg: SwitchConfig, params: Params) -> tuple[dict[str, dict], np.ndarray]:
  """The inverse of `join_parts`: (parts, local slot maps [L, E])."""
  pools, local = base.split_pools(params["experts"], params["slot_map"])
  pools = dict(zip(moe_parts(cfg), pools))
  bb = split_backbone(cfg, params["backbone"])
  parts = {"globals": bb["globals"]}
  for name in part_names(cfg)[1:]:
    parts[name] = {"backbone": bb[name], **({"experts": pools[name]} if name in pools else {})}
  return parts, local
