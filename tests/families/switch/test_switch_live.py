"""Live Switch parity against transformers (PyTorch): runs where torch imports, skipped elsewhere.

Fresh random configs end to end: save_pretrained -> jaxmoe-convert ->
jaxmoe.load, logits within 1e-4 and 20 greedy tokens equal; and the T5
relative-position buckets equal transformers' over many bucket settings.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CASES = {
  # Every encoder block sparse (step 1), a shallower and fully dense decoder (transformers' generate
  # cannot run a decoder deeper than the encoder); default buckets; untied; binding capacity.
  "dense_decoder_capacity": (
    dict(
      vocab_size=60,
      d_model=20,
      d_kv=5,
      d_ff=28,
      num_heads=4,
      num_layers=2,
      num_sparse_encoder_layers=2,
      num_decoder_layers=1,
      num_sparse_decoder_layers=0,
      num_experts=3,
      expert_capacity=3,
      tie_word_embeddings=False,
      decoder_start_token_id=0,
    ),
    "hf_capacity",
  ),
  # One sparse decoder block, two heads, many buckets over a short distance, tied; capacity never binds.
  "tied_short_buckets": (
    dict(
      vocab_size=50,
      d_model=16,
      d_kv=12,
      d_ff=20,
      num_heads=2,
      num_layers=2,
      num_sparse_encoder_layers=1,
      num_decoder_layers=1,
      num_sparse_decoder_layers=1,
      num_experts=5,
      relative_attention_num_buckets=24,
      relative_attention_max_distance=30,
      decoder_start_token_id=0,
    ),
    "dropless",
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_live_switch_parity_with_transformers(tmp_path, name):
  import jaxmoe
  from jaxmoe.io.convert import convert

  kwargs, routing = CASES[name]
  torch.manual_seed(sum(map(ord, name)))
  config = transformers.SwitchTransformersConfig(**kwargs)
  model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
  with torch.no_grad():
    for pname, p in model.named_parameters():
      p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.25 * torch.randn_like(p))
  model.save_pretrained(tmp_path / "hf")
  convert(tmp_path / "hf", tmp_path / "ours", progress=False)
  ours = jaxmoe.load(tmp_path / "ours", routing=routing)

  rng = np.random.default_rng(0)
  enc = rng.integers(2, kwargs["vocab_size"], size=(2, 14))
  lengths = np.array([14, 10])
  mask = torch.tensor(np.arange(14)[None] < lengths[:, None], dtype=torch.long)
  dec = rng.integers(2, kwargs["vocab_size"], size=(2, 6))
  dec[:, 0] = 0
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(enc), attention_mask=mask, decoder_input_ids=torch.tensor(dec)).logits.numpy()
    gen = model.generate(torch.tensor(enc), attention_mask=mask, max_new_tokens=20, do_sample=False).numpy()
  got = ours.logits(enc, dec, lengths)
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"max-abs {np.abs(got - ref).max():.3g}")
  np.testing.assert_array_equal(ours.generate(enc, 20, lengths=lengths), gen)


def test_relative_buckets_equal_transformers():
  """Our bucket table against transformers' at every distance of many configs.

  transformers takes a vectorised float32 log whose result is not always the
  correctly rounded one our table uses (SLEEF, within 1 ulp; which values
  differ depends on the torch build and CPU). A distance may disagree only
  where that log differs; everywhere else the buckets are equal.
  """
  from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersAttention

  from jaxmoe.families.switch import position
  from jaxmoe.families.switch.config import preset

  rel = np.arange(-400, 401)
  for num_buckets in (4, 8, 17, 19, 32, 34, 38, 64):
    for max_distance in (9, 20, 25, 27, 50, 128, 196):
      if max_distance <= num_buckets // 2:
        continue  # no logarithmic decoder buckets: transformers divides by log(1) = 0
      cfg = preset("tiny-switch").replace(
        relative_attention_num_buckets=num_buckets, relative_attention_max_distance=max_distance
      )
      for bidirectional in (True, False):
        want = SwitchTransformersAttention._relative_position_bucket(
          torch.tensor(rel), bidirectional, num_buckets, max_distance
        ).numpy()
        got = np.asarray(position.relative_buckets(rel, cfg, bidirectional))
        exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
        dist = np.maximum(np.abs(rel) if bidirectional else np.maximum(-rel, 0), exact)
        ratio = torch.tensor(dist, dtype=torch.float32) / exact
        torch_log_differs = torch.log(ratio).numpy() != np.log(ratio.numpy().astype(np.float64)).astype(np.float32)
        bad = (got != want) & ~torch_log_differs
        assert not bad.any(), f"{num_buckets=} {max_distance=} {bidirectional=}: rel {rel[bad][:5]}"
