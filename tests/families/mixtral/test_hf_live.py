"""Live parity against transformers (PyTorch): runs where torch imports, skipped elsewhere.

The committed goldens (test_model.py) cover CI machines without torch; this
checks fresh random configs end to end: save_pretrained -> jaxmoe-convert ->
jaxmoe.load, logits within 1e-4 and 20 greedy tokens equal.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {
  "heads6x3_hd10_theta500": dict(
    vocab_size=70,
    hidden_size=24,
    intermediate_size=20,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=3,
    head_dim=10,
    num_local_experts=6,
    num_experts_per_tok=3,
    rope_theta=500.0,
  ),
  "heads2x2_1layer_e3": dict(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=36,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    num_local_experts=3,
    num_experts_per_tok=2,
    rope_theta=1e6,
    max_position_embeddings=64,
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_live_parity_with_transformers(tmp_path, name):
  import jaxmoe
  from jaxmoe.io.convert import convert

  torch.manual_seed(hash(name) % 1000)
  model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**CASES[name])).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.2 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "hf")
  convert(tmp_path / "hf", tmp_path / "ours", progress=False)
  ours = jaxmoe.load(tmp_path / "ours")

  tokens = np.random.default_rng(0).integers(0, CASES[name]["vocab_size"], size=(2, 12))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
    prompt = torch.tensor(tokens[:1])
    gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
  got = ours.logits(tokens)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"max-abs {np.abs(got - ref).max():.3g}")
  np.testing.assert_array_equal(ours.generate(tokens[:1], 20), gen.numpy())
