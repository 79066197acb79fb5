"""Regenerates the HF Mixtral fixtures under tests/fixtures/ (needs torch + transformers).

Each fixture folder holds what `save_pretrained` writes (config.json,
model.safetensors) and golden.npz with HF's outputs on random tokens:
  tokens [B, T], logits [B, T, V] float32, generated [1, T + 20] (greedy, HF
  generate with the model's own generation config).

Run: python tests/make_fixtures.py
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

CONFIGS = {
  # 4 query / 2 kv heads, with a character tokenizer.json.
  "gqa4x2": dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    rope_theta=10000.0,
  ),
  # 4 query / 1 kv head, head_dim != D / N, 8 experts, sliding window.
  "mqa4x1_window": dict(
    vocab_size=80,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=12,
    num_local_experts=8,
    num_experts_per_tok=2,
    rope_theta=1e6,
    sliding_window=6,
  ),
}
NEW_TOKENS = 20


def char_tokenizer(vocab_size: int):
  """A tokenizers WordLevel model over characters, ids 3.. for printable ASCII."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  chars = [chr(c) for c in range(32, 32 + vocab_size - 3)]
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
  return tok


def build(name: str, kwargs: dict, seed: int) -> None:
  import torch
  from transformers import MixtralConfig, MixtralForCausalLM

  torch.manual_seed(seed)
  model = MixtralForCausalLM(MixtralConfig(**kwargs)).eval()
  with torch.no_grad():  # larger than HF's init so greedy choices are far from ties
    for pname, p in model.named_parameters():
      if "norm" in pname:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  out = FIXTURES / name
  shutil.rmtree(out, ignore_errors=True)
  model.save_pretrained(out)
  if name == "gqa4x2":
    char_tokenizer(kwargs["vocab_size"]).save(str(out / "tokenizer.json"))
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, kwargs["vocab_size"], size=(2, 9))
  with torch.no_grad():
    logits = model(torch.tensor(tokens)).logits.float().numpy()
    prompt = torch.tensor(tokens[:1])
    generated = model.generate(
      prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS, do_sample=False
    ).numpy()
  np.savez(out / "golden.npz", tokens=tokens, logits=logits, generated=generated)


def main() -> None:
  for i, (name, kwargs) in enumerate(CONFIGS.items()):
    build(name, kwargs, seed=i)
    print("wrote", FIXTURES / name)


if __name__ == "__main__":
  main()
