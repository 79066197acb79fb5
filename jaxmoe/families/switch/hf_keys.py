"""The Hugging Face Switch Transformers -> jaxmoe key map: one table per block kind, `{}` templates.

Keys are HF tensor names (transformers 5.24 `SwitchTransformersForConditionalGeneration`
state dict, which `save_pretrained` writes); the first `{}` is the block, a
second `{}` the expert. Each maps to a `Rule`: the path of the leaf it fills
inside its checkpoint part (layout.py: "embed",
"encoder/rel_bias", "backbone/q", "experts/wi", ...), the HF shape the config
implies, and the transform to our layout. HF `nn.Linear` weights are
[out, in]; ours are [in, out], with the head axis split out.

Embeddings, as transformers 5 ties them:
  tied     `shared.weight` feeds both stacks and the LM head. Copies under
           encoder/decoder.embed_tokens or lm_head may be present; they must
           equal it (transformers would untie differing copies).
  untied   encoder.embed_tokens, decoder.embed_tokens and lm_head are separate
           weights and `shared.weight` is unused. A stack embedding that is
           absent is read from `shared.weight` (transformers 4 saved only that).

Axis names (jaxmoe/axes.py): V vocab, D model dim, F ffn dim, E experts, N
heads, H head dim, Z relative-position buckets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from jaxmoe.families.switch.config import SwitchConfig

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
  """How one HF tensor becomes one jaxmoe leaf at `target` ("a/b" path inside its part)."""

  target: str
  hf_shape: Callable[[SwitchConfig], Shape]
  transform: Callable[[np.ndarray, SwitchConfig], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Source:
  """One HF tensor to read (`name`) for a rule; `expert` for a per-expert key."""

  name: str
  rule: Rule
  expert: int | None = None


# HF shapes implied by the config.
def _vd(c: SwitchConfig) -> Shape:
  return (c.vocab_size, c.hidden_size)


def _d(c: SwitchConfig) -> Shape:
  return (c.hidden_size,)


def _rn(c: SwitchConfig) -> Shape:
  return (c.relative_attention_num_buckets, c.num_heads)


def _nhd(c: SwitchConfig) -> Shape:
  return (c.num_heads * c.head_dim, c.hidden_size)


def _dnh(c: SwitchConfig) -> Shape:
  return (c.hidden_size, c.num_heads * c.head_dim)


def _fd(c: SwitchConfig) -> Shape:
  return (c.intermediate_size, c.hidden_size)


def _df(c: SwitchConfig) -> Shape:
  return (c.hidden_size, c.intermediate_size)


def _ed(c: SwitchConfig) -> Shape:
  return (c.num_experts, c.hidden_size)


# Transforms (HF views a projection's output as [..., heads, H]: heads are the outer factor).
def _same(x, c):
  return x


def _t(x, c):  # [out, in] -> [in, out]
  return x.T


def _qkv(x, c):  # [N*H, D] -> [D, N, H]
  return x.T.reshape(c.hidden_size, c.num_heads, c.head_dim)


def _o(x, c):  # [D, N*H] -> [N, H, D]
  return x.T.reshape(c.num_heads, c.head_dim, c.hidden_size)


def _attention(prefix: str, module: str, ours: tuple[str, str, str, str]) -> dict[str, Rule]:
  q, k, v, o = ours
  return {
    f"{prefix}.{module}.q.weight": Rule(f"backbone/{q}", _nhd, _qkv),
    f"{prefix}.{module}.k.weight": Rule(f"backbone/{k}", _nhd, _qkv),
    f"{prefix}.{module}.v.weight": Rule(f"backbone/{v}", _nhd, _qkv),
    f"{prefix}.{module}.o.weight": Rule(f"backbone/{o}", _dnh, _o),
  }


TIED_GLOBAL_KEYS: dict[str, Rule] = {"shared.weight": Rule("embed", _vd, _same)}
UNTIED_GLOBAL_KEYS: dict[str, Rule] = {
  "encoder.embed_tokens.weight": Rule("encoder/embed", _vd, _same),
  "decoder.embed_tokens.weight": Rule("decoder/embed", _vd, _same),
  "lm_head.weight": Rule("lm_head", _vd, _t),
}
_BIAS = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"  # block 0's, shared by all blocks
GLOBAL_KEYS: dict[str, Rule] = {
  f"encoder.{_BIAS}": Rule("encoder/rel_bias", _rn, _same),
  "encoder.final_layer_norm.weight": Rule("encoder/norm", _d, _same),
  f"decoder.{_BIAS}": Rule("decoder/rel_bias", _rn, _same),
  "decoder.final_layer_norm.weight": Rule("decoder/norm", _d, _same),
}

# `{}` = block. The encoder's feed-forward is layer.1, the decoder's layer.2 (after cross-attention).
ENCODER_ATTENTION: dict[str, Rule] = {
  "encoder.block.{}.layer.0.layer_norm.weight": Rule("backbone/attn_norm", _d, _same),
  **_attention("encoder.block.{}.layer.0", "SelfAttention", ("q", "k", "v", "o")),
}
DECODER_ATTENTION: dict[str, Rule] = {
  "decoder.block.{}.layer.0.layer_norm.weight": Rule("backbone/attn_norm", _d, _same),
  **_attention("decoder.block.{}.layer.0", "SelfAttention", ("q", "k", "v", "o")),
  "decoder.block.{}.layer.1.layer_norm.weight": Rule("backbone/cross_norm", _d, _same),
  **_attention("decoder.block.{}.layer.1", "EncDecAttention", ("cq", "ck", "cv", "co")),
}
# (stack, sparse) -> feed-forward keys; `{}` = block, then expert.
FEED_FORWARD: dict[tuple[str, bool], dict[str, Rule]] = {}
for _stack, _ff in (("encoder", 1), ("decoder", 2)):
  _p = f"{_stack}.block.{{}}.layer.{_ff}"
  FEED_FORWARD[(_stack, False)] = {
    f"{_p}.layer_norm.weight": Rule("backbone/mlp_norm", _d, _same),
    f"{_p}.mlp.wi.weight": Rule("backbone/wi", _fd, _t),
    f"{_p}.mlp.wo.weight": Rule("backbone/wo", _df, _t),
  }
  FEED_FORWARD[(_stack, True)] = {
    f"{_p}.layer_norm.weight": Rule("backbone/mlp_norm", _d, _same),
    f"{_p}.mlp.router.classifier.weight": Rule("backbone/router", _ed, _t),
    f"{_p}.mlp.experts.expert_{{}}.wi.weight": Rule("experts/wi", _fd, _t),
    f"{_p}.mlp.experts.expert_{{}}.wo.weight": Rule("experts/wo", _df, _t),
  }

# Tied embeddings: copies of shared.weight that may sit next to it (and must equal it).
TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
# Untied embeddings: read shared.weight for a stack embedding the checkpoint lacks.
UNTIED_FALLBACK = {f"{stack}.embed_tokens.weight": "shared.weight" for stack in ("encoder", "decoder")}


def _sources(table: dict[str, Rule], cfg: SwitchConfig, block: int | None = None) -> dict[str, Source]:
  out = {}
  for key, rule in table.items():
    if key.count("{}") == 2:
      names = [key.format(block, e) for e in range(cfg.num_experts)]
      out.update({name: Source(name, rule, e) for e, name in enumerate(names)})
    else:
      name = key.format(block) if block is not None else key
      out[name] = Source(name, rule)
  return out


def part_sources(cfg: SwitchConfig, present) -> dict[str, dict[str, Source]]:
  """{part name: {HF key: Source}} of every tensor the checkpoint must provide.

  `present` (the checkpoint's tensor names) only decides the untied fallback:
  a missing stack embedding is read from shared.weight.
  """
  glob = dict(TIED_GLOBAL_KEYS if cfg.tie_word_embeddings else UNTIED_GLOBAL_KEYS)
  glob.update(GLOBAL_KEYS)
  parts = {"globals": _sources(glob, cfg)}
  if not cfg.tie_word_embeddings:
    for key, fallback in UNTIED_FALLBACK.items():
      if key not in present and fallback in present:
        parts["globals"][key] = dataclasses.replace(parts["globals"][key], name=fallback)
  for stack, sparse in (("encoder", cfg.encoder_sparse), ("decoder", cfg.decoder_sparse)):
    attention = ENCODER_ATTENTION if stack == "encoder" else DECODER_ATTENTION
    for i, is_sparse in enumerate(sparse):
      ff = FEED_FORWARD[(stack, is_sparse)]
      parts[f"{stack}_{i:04d}"] = {**_sources(attention, cfg, i), **_sources(ff, cfg, i)}
  return parts


def optional_keys(cfg: SwitchConfig) -> tuple[str, ...]:
  """Tensors allowed beside the expected ones: tied copies, or the unused shared table."""
  return TIED_COPIES if cfg.tie_word_embeddings else ("shared.weight",)
