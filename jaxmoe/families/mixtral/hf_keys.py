"""The Hugging Face Mixtral -> jaxmoe key map: one table, `{}` templates.

Keys are HF tensor names; the first `{}` is the layer, a second `{}` the
expert. Each maps to a `Rule`: the jaxmoe leaf(s) it fills (see the layout in
layout.py), the HF shape the config implies, and the transform from
the HF tensor to our layout. HF `nn.Linear` weights are [out, in]; ours are
[in, out], so most transforms are a transpose, with the head axis split out.

Two HF expert layouts exist (`EXPERT_LAYOUTS`), verified against
transformers 5.24 `MixtralForCausalLM`:
  per_expert  what `save_pretrained` writes (and transformers 4.x used in
              memory): `block_sparse_moe.experts.{e}.w1/w2/w3.weight`, each
              [F, D] / [D, F] / [F, D], and `block_sparse_moe.gate.weight`.
  fused       transformers 5 in-memory `state_dict()` names:
              `mlp.experts.gate_up_proj` [E, 2F, D] (rows :F are the gate w1,
              F: the up projection w3), `mlp.experts.down_proj` [E, D, F] and
              `mlp.gate.weight`.

Axis names (jaxmoe/axes.py): V vocab, D model dim, F ffn dim, E experts, N
query heads, M key/value heads, H head dim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.families.mixtral.layout import EXPERT_NAMES

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one HF tensor becomes jaxmoe leaves.

  `targets` are leaf names: backbone globals (embed, norm, lm_head), layer
  leaves (q, router, ...) or expert leaves (w1, w3, w2). `transform` returns
  one array per target, possibly a view; the converter casts and copies.
  """

  targets: tuple[str, ...]
  hf_shape: Callable[[MixtralConfig], Shape]
  transform: Callable[[np.ndarray, MixtralConfig], tuple[np.ndarray, ...]]


# HF shapes implied by the config.
def _vd(c: MixtralConfig) -> Shape:
  return (c.vocab_size, c.hidden_size)


def _d(c: MixtralConfig) -> Shape:
  return (c.hidden_size,)


def _q_shape(c: MixtralConfig) -> Shape:
  return (c.num_heads * c.head_dim, c.hidden_size)


def _kv_shape(c: MixtralConfig) -> Shape:
  return (c.num_kv_heads * c.head_dim, c.hidden_size)


def _o_shape(c: MixtralConfig) -> Shape:
  return (c.hidden_size, c.num_heads * c.head_dim)


def _ed(c: MixtralConfig) -> Shape:
  return (c.num_experts, c.hidden_size)


def _fd(c: MixtralConfig) -> Shape:
  return (c.intermediate_size, c.hidden_size)


def _df(c: MixtralConfig) -> Shape:
  return (c.hidden_size, c.intermediate_size)


def _e2fd(c: MixtralConfig) -> Shape:
  return (c.num_experts, 2 * c.intermediate_size, c.hidden_size)


def _edf(c: MixtralConfig) -> Shape:
  return (c.num_experts, c.hidden_size, c.intermediate_size)


# Transforms. HF projects with x @ W.T and views the output as [..., heads, H],
# so the head axis is the outer factor of W's row index.
def _same(x, c):
  return (x,)


def _t(x, c):  # [out, in] -> [in, out]
  return (x.T,)


def _q(x, c):  # [N*H, D] -> [D, N, H]
  return (x.T.reshape(c.hidden_size, c.num_heads, c.head_dim),)


def _kv(x, c):  # [M*H, D] -> [D, M, H]
  return (x.T.reshape(c.hidden_size, c.num_kv_heads, c.head_dim),)


def _o(x, c):  # [D, N*H] -> [N, H, D]
  return (x.T.reshape(c.num_heads, c.head_dim, c.hidden_size),)


def _experts_t(x, c):  # [E, out, in] -> [E, in, out]
  return (x.transpose(0, 2, 1),)


def _gate_up(x, c):  # [E, 2F, D] -> w1 [E, D, F], w3 [E, D, F]
  f = c.intermediate_size
  return x[:, :f].transpose(0, 2, 1), x[:, f:].transpose(0, 2, 1)


def _rule(targets: str | tuple[str, ...], hf_shape, transform) -> Rule:
  targets = (targets,) if isinstance(targets, str) else targets
  return Rule(targets, hf_shape, transform)


GLOBAL_KEYS: dict[str, Rule] = {
  "model.embed_tokens.weight": _rule("embed", _vd, _same),
  "model.norm.weight": _rule("norm", _d, _same),
  "lm_head.weight": _rule("lm_head", _vd, _t),
}

# `{}` = layer.
LAYER_KEYS: dict[str, Rule] = {
  "model.layers.{}.input_layernorm.weight": _rule("attn_norm", _d, _same),
  "model.layers.{}.self_attn.q_proj.weight": _rule("q", _q_shape, _q),
  "model.layers.{}.self_attn.k_proj.weight": _rule("k", _kv_shape, _kv),
  "model.layers.{}.self_attn.v_proj.weight": _rule("v", _kv_shape, _kv),
  "model.layers.{}.self_attn.o_proj.weight": _rule("o", _o_shape, _o),
  "model.layers.{}.post_attention_layernorm.weight": _rule("mlp_norm", _d, _same),
}

# `{}` = layer, then expert where a key has two. A per-expert rule fills one
# slot [D, F] / [F, D] of the [E, ...] pool leaf; a fused rule fills it whole.
EXPERT_LAYOUTS: dict[str, dict[str, Rule]] = {
  "per_expert": {
    "model.layers.{}.block_sparse_moe.gate.weight": _rule("router", _ed, _t),
    "model.layers.{}.block_sparse_moe.experts.{}.w1.weight": _rule("w1", _fd, _t),
    "model.layers.{}.block_sparse_moe.experts.{}.w3.weight": _rule("w3", _fd, _t),
    "model.layers.{}.block_sparse_moe.experts.{}.w2.weight": _rule("w2", _df, _t),
  },
  "fused": {
    "model.layers.{}.mlp.gate.weight": _rule("router", _ed, _t),
    "model.layers.{}.mlp.experts.gate_up_proj": _rule(("w1", "w3"), _e2fd, _gate_up),
    "model.layers.{}.mlp.experts.down_proj": _rule("w2", _edf, _experts_t),
  },
}

# Non-persistent buffers some exporters still write; they carry no weights.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class Source:
  """One expected HF tensor: its rule and, for a per-expert key, the expert."""

  rule: Rule
  expert: int | None = None


def is_expert_leaf(name: str) -> bool:
  return name in EXPERT_NAMES


def detect_layout(keys) -> str:
  """'fused' if any transformers-5 fused expert name is present, else 'per_expert'."""
  markers = (".mlp.experts.", ".mlp.gate.")
  return "fused" if any(m in k for k in keys for m in markers) else "per_expert"


def global_sources() -> dict[str, Source]:
  return {key: Source(rule) for key, rule in GLOBAL_KEYS.items()}


def layer_sources(layer: int, cfg: MixtralConfig, layout: str) -> dict[str, Source]:
  """Every HF tensor name layer `layer` needs, in `layout`, with its rule."""
  out = {key.format(layer): Source(rule) for key, rule in LAYER_KEYS.items()}
  for key, rule in EXPERT_LAYOUTS[layout].items():
    if key.count("{}") == 2:
      out.update({key.format(layer, e): Source(rule, e) for e in range(cfg.num_experts)})
    else:
      out[key.format(layer)] = Source(rule)
  return out


def is_ignored(key: str) -> bool:
  return key.endswith(IGNORED_SUFFIXES)
