"""jaxmoe -> Hugging Face Mixtral safetensors (the inverse of `convert`).

Writes the `per_expert` names `save_pretrained` uses, following the slot map,
so a consolidated tenant exports as the plain model it serves. Used to build
checkpoints without torch (the quickstart, tests) and to hand models back to
transformers.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator

import numpy as np
from safetensors.numpy import save_file

from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.families.mixtral.layout import Params, check_params


def hf_config(cfg: MixtralConfig) -> dict:
  """A transformers-loadable Mixtral config.json dict."""
  return {
    "architectures": ["MixtralForCausalLM"],
    "model_type": "mixtral",
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.hidden_size,
    "intermediate_size": cfg.intermediate_size,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "num_local_experts": cfg.num_experts,
    "num_experts_per_tok": cfg.top_k,
    "hidden_act": "silu",
    "rms_norm_eps": cfg.rms_norm_eps,
    "rope_theta": cfg.rope_theta,
    "sliding_window": cfg.sliding_window,
    "max_position_embeddings": cfg.max_position_embeddings,
    "bos_token_id": cfg.bos_token_id,
    "eos_token_id": cfg.eos_token_id,
    "pad_token_id": cfg.pad_token_id,
    "tie_word_embeddings": False,
    "torch_dtype": cfg.dtype,
  }


def hf_tensors(cfg: MixtralConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array in HF's [out, in] convention) for every tensor."""
  bb, d = params["backbone"], cfg.hidden_size
  yield "model.embed_tokens.weight", bb["embed"]
  yield "model.norm.weight", bb["norm"]
  yield "lm_head.weight", bb["lm_head"].T
  pool, slot_map = params["experts"], np.asarray(params["slot_map"])
  for i in range(cfg.num_layers):
    layer = {k: np.asarray(v)[i] for k, v in bb["layers"].items()}
    pre = f"model.layers.{i}."
    yield pre + "input_layernorm.weight", layer["attn_norm"]
    yield pre + "post_attention_layernorm.weight", layer["mlp_norm"]
    for name in ("q", "k", "v"):
      yield pre + f"self_attn.{name}_proj.weight", layer[name].reshape(d, -1).T
    yield pre + "self_attn.o_proj.weight", layer["o"].reshape(-1, d).T
    yield pre + "block_sparse_moe.gate.weight", layer["router"].T
    for e, slot in enumerate(slot_map[i]):
      for name in ("w1", "w3", "w2"):
        yield pre + f"block_sparse_moe.experts.{e}.{name}.weight", pool[name][slot].T


def write_hf(cfg: MixtralConfig, params: Params, out: str | os.PathLike) -> pathlib.Path:
  """Writes `out/config.json` and `out/model.safetensors`."""
  check_params(cfg, params)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  tensors = {name: np.ascontiguousarray(np.asarray(a)) for name, a in hf_tensors(cfg, params)}
  save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
  (out / "config.json").write_text(json.dumps(hf_config(cfg), indent=2))
  return out
