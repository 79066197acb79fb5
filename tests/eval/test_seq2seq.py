"""Switch task scores against the public model API and numpy; the ablation's averaged backbones."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe.eval import quality, seq2seq
from jaxmoe.families.switch import layout
from jaxmoe.families.switch import model as switch
from jaxmoe.families.switch.api import SwitchModel
from jaxmoe.io.tokenizer import ByteTokenizer
from jaxmoe.train import recipes, tasks

CFG = recipes.recipe("switch-test").model  # byte vocabulary, dropless


def test_greedy_is_the_models_generate():
  params = layout.init_params(CFG, seed=1, scale=0.5)
  rows = seq2seq.TaskRows("arithmetic", 5, batch=4)  # 5 rows: a padded last batch
  got = seq2seq.generate(params, rows, CFG)
  model = SwitchModel(CFG, params, ByteTokenizer())
  prompts = [np.asarray([tasks.BOS, *x], np.int32) for x, _ in rows.pairs]
  out = model.generate(prompts, max_new_tokens=rows.steps)
  want = [seq2seq.output_text(r[1:], CFG.eos_token_id) for r in out]
  assert got == want


def test_target_nll_matches_numpy():
  params = layout.init_params(CFG, seed=2, scale=0.5)
  rows = seq2seq.TaskRows("arithmetic", 3, batch=4)  # the shapes of the test above: one greedy compile
  _, c = next(rows.chunks())
  logits = np.asarray(switch.forward(params, c["enc"], c["enc_len"], c["dec"], CFG), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  target = np.asarray(c["target"])
  mask = target != CFG.pad_token_id
  want = -(np.take_along_axis(logp, target[..., None], -1)[..., 0] * mask).sum(1)
  s, n = seq2seq.target_nll(params, c["enc"], c["enc_len"], c["dec"], c["target"], CFG)
  np.testing.assert_allclose(np.asarray(s), want, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(n), mask.sum(1))
  scores = seq2seq.score(params, rows, CFG)
  assert scores.perplexity == pytest.approx(np.exp(want[:3].sum() / mask[:3].sum()), rel=1e-4)  # not the pad row
  assert scores.rows == 3 and 0.0 <= scores.exact_match <= scores.rouge_l <= 1.0  # an exact match has ROUGE-L 1


def test_output_text_and_rouge():
  eos = CFG.eos_token_id
  ids = [tasks.SENTINELS[0], *b"get_value", eos, *b"junk"]
  assert seq2seq.output_text(ids, eos) == "get_value"
  assert seq2seq.rouge_l("get_value", "get_value") == 1.0
  # rouge-score's tokenizer: lowercased letter/digit runs, so "get_value" is [get, value].
  assert seq2seq.rouge_l("get_item", "get_value") == pytest.approx(0.5)
  assert seq2seq.rouge_l("Sunday 25 July", "Sunday 25 July 1993") == pytest.approx(2 * 0.75 / 1.75)
  assert seq2seq.rouge_l("", "SPACE (Zs)") == 0.0


def test_averaged_backbones_keep_each_tenants_experts():
  a, b = layout.init_params(CFG, seed=3), layout.init_params(CFG, seed=4)
  out = quality.averaged_backbones({"a": a, "b": b})
  want = (a["backbone"]["embed"] + b["backbone"]["embed"]) / 2
  np.testing.assert_allclose(out["a"]["backbone"]["embed"], want, rtol=1e-6)
  assert out["a"]["backbone"] is out["b"]["backbone"]
  np.testing.assert_array_equal(out["b"]["experts"]["wi"], b["experts"]["wi"])
  np.testing.assert_array_equal(out["a"]["slot_map"], a["slot_map"])
