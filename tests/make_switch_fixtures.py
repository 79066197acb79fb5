"""Regenerates the HF Switch Transformers fixtures under tests/fixtures/switch_* (needs torch).

Each folder holds what `save_pretrained` writes (config.json,
generation_config.json, model.safetensors) and golden.npz with HF's outputs:
  enc_tokens [B, U] right-padded to enc_lengths [B] (attention_mask = position < length)
  dec_tokens [B, T] decoder_input_ids (decoder_start_token_id first)
  logits [B, T, V] float32, HF `model(input_ids, attention_mask, decoder_input_ids)`
  generated [B, 1 + n] greedy HF `generate` of the masked batch, n <= NEW_TOKENS
Configs differ in experts, sparse steps, heads (N * H != D), buckets, layer
counts and tied embeddings; switch_e8_capacity has an expert capacity that
binds, so its goldens need Routing.HF_CAPACITY.

Run: python tests/make_switch_fixtures.py
"""

from __future__ import annotations

import pathlib
import shutil

import numpy as np

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

CONFIGS = {
  # Tied embeddings, 4 experts, one sparse encoder block (step 3), every decoder block sparse,
  # a character tokenizer.json.
  "switch_e4_tied": dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_heads=4,
    num_layers=3,
    num_sparse_encoder_layers=1,
    num_decoder_layers=2,
    num_sparse_decoder_layers=2,
    num_experts=4,
    expert_capacity=64,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    tie_word_embeddings=True,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
  ),
  # Untied embeddings, 8 experts, 3 heads of 6 (N * H = 18 != D = 24), sparse steps 2 and 3,
  # expert capacity 2: tokens are dropped on 13-token prompts.
  "switch_e8_capacity": dict(
    vocab_size=80,
    d_model=24,
    d_kv=6,
    d_ff=40,
    num_heads=3,
    num_layers=4,
    num_sparse_encoder_layers=2,
    num_decoder_layers=3,
    num_sparse_decoder_layers=1,
    num_experts=8,
    expert_capacity=2,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=32,
    tie_word_embeddings=False,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
  ),
}
NEW_TOKENS = 20
ENC_LENGTHS = (13, 9)
DEC_LEN = 8


def char_tokenizer(vocab_size: int):
  """A tokenizers WordLevel model over characters: <pad> 0, </s> 1, <unk> 2, printable ASCII from 3."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  chars = [chr(c) for c in range(32, 32 + vocab_size - 3)]
  vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
  tok.add_special_tokens(["<pad>", "</s>", "<unk>"])  # decode(skip_special_tokens) drops them
  return tok


def random_model(kwargs: dict, seed: int):
  """A SwitchTransformersForConditionalGeneration with weights far from ties (greedy is stable)."""
  import torch
  from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

  torch.manual_seed(seed)
  model = SwitchTransformersForConditionalGeneration(SwitchTransformersConfig(**kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif "relative_attention_bias" in name:
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))
  return model


def hf_outputs(model, enc_tokens, enc_lengths, dec_tokens, new_tokens: int) -> dict:
  """HF logits on (enc, dec) and greedy generation of the masked encoder batch."""
  import torch

  valid = np.arange(enc_tokens.shape[1])[None, :] < np.asarray(enc_lengths)[:, None]
  mask = torch.tensor(valid, dtype=torch.long)
  with torch.no_grad():
    logits = (
      model(input_ids=torch.tensor(enc_tokens), attention_mask=mask, decoder_input_ids=torch.tensor(dec_tokens))
      .logits.float()
      .numpy()
    )
    generated = model.generate(
      torch.tensor(enc_tokens), attention_mask=mask, max_new_tokens=new_tokens, do_sample=False
    ).numpy()
  return {"logits": logits, "generated": generated}


def inputs(vocab_size: int, start: int, seed: int):
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, vocab_size, size=(len(ENC_LENGTHS), max(ENC_LENGTHS)))
  for row, n in enumerate(ENC_LENGTHS):
    enc[row, n:] = 0  # HF pads with pad_token_id; masked out either way
  dec = rng.integers(3, vocab_size, size=(len(ENC_LENGTHS), DEC_LEN))
  dec[:, 0] = start
  return enc, np.asarray(ENC_LENGTHS), dec


def build(name: str, kwargs: dict, seed: int) -> None:
  model = random_model(kwargs, seed)
  out = FIXTURES / name
  shutil.rmtree(out, ignore_errors=True)
  model.save_pretrained(out)
  if name == "switch_e4_tied":
    char_tokenizer(kwargs["vocab_size"]).save(str(out / "tokenizer.json"))
  enc, lengths, dec = inputs(kwargs["vocab_size"], kwargs["decoder_start_token_id"], seed)
  ref = hf_outputs(model, enc, lengths, dec, NEW_TOKENS)
  np.savez(out / "golden.npz", enc_tokens=enc, enc_lengths=lengths, dec_tokens=dec, **ref)
  print("wrote", out, "generated", ref["generated"].shape)


def main() -> None:
  for i, (name, kwargs) in enumerate(CONFIGS.items()):
    build(name, kwargs, seed=i)


if __name__ == "__main__":
  main()
