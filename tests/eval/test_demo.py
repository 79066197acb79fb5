"""jaxmoe-demo end to end on the tiny "test" recipe, and the evaluation metrics against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe.eval import evaluate, quality
from jaxmoe.families.mixtral import model as mixtral
from jaxmoe.families.mixtral.config import preset
from jaxmoe.families.mixtral.layout import init_params
from jaxmoe.train import recipes


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_metrics_match_a_numpy_reference():
  cfg = preset("tiny")
  ref_params, params = init_params(cfg, seed=1, scale=0.2), init_params(cfg, seed=2, scale=0.2)
  rows = np.random.default_rng(0).integers(0, 256, (5, 13)).astype(np.int32)  # 5 rows: a padded last batch
  want_ref = _log_softmax(np.asarray(mixtral.forward(ref_params, rows[:, :-1], cfg), np.float64))
  want = _log_softmax(np.asarray(mixtral.forward(params, rows[:, :-1], cfg), np.float64))
  nll = -np.take_along_axis(want, rows[:, 1:, None], -1).mean()
  kl = (np.exp(want_ref) * (want_ref - want)).sum(-1).mean()
  top1 = (want.argmax(-1) == want_ref.argmax(-1)).mean()
  reference = evaluate.reference_log_probs(ref_params, rows, cfg, batch=2)
  np.testing.assert_allclose(reference, want_ref, atol=1e-4)
  got = evaluate.evaluate(params, rows, cfg, reference, batch=2)
  assert got.perplexity == pytest.approx(np.exp(nll), rel=1e-4)
  assert got.kl == pytest.approx(kl, rel=1e-3, abs=1e-6)
  assert got.top1 == pytest.approx(top1)
  assert got.tokens == rows.size - rows.shape[0]
  same = evaluate.evaluate(ref_params, rows, cfg, reference, batch=4)
  assert same.kl == pytest.approx(0.0, abs=1e-5) and same.top1 == 1.0
  assert evaluate.evaluate(params, rows, cfg).kl is None


def test_pool_budget_keeps_the_asked_fraction():
  from jaxmoe.io.store import expert_bytes

  cfg = preset("tiny")  # L=2, E=4: 8 experts per tenant
  for distinct, keep in ((1.0, 32), (0.75, 24), (0.5, 16), (0.25, 8), (0.1, 8)):
    assert round(quality.pool_budget_gb(cfg, 4, distinct) * 1e9) // expert_bytes(cfg) == keep


def test_demo_end_to_end(tmp_path, capsys):
  from jaxmoe.cli import demo

  args = ["jaxmoe-demo", "--recipe=test", f"--workdir={tmp_path}", "--noprogress", "--max_tokens=6", "--eval_rows=2"]
  demo.FLAGS(args)
  assert demo.main(args[:1]) == 0
  first = capsys.readouterr().out
  assert "trained base, code, prose, arithmetic, records" in first
  for tenant in recipes.recipe("test").domains:
    assert f"  [{tenant}] " in first  # its generations
    assert any(line.split()[:1] == [tenant] for line in first.splitlines())  # its quality row
  assert "Memory: 4 full copies" in first and "saving" in first
  assert "original" in first and "best merge" in first
  # The second run loads everything from the cache and prints the same generations.
  assert demo.main(args[:1]) == 0
  second = capsys.readouterr().out
  assert "loaded from the cache" in second
  generations = lambda out: [line for line in out.splitlines() if line.startswith("  [")]
  assert generations(second) == generations(first)


def test_switch_demo_end_to_end(tmp_path, capsys):
  from jaxmoe.cli import demo

  args = ["jaxmoe-demo", "--family=switch", "--recipe=switch-test", f"--workdir={tmp_path}", "--noprogress"]
  args += ["--max_tokens=4", "--eval_rows=2"]
  demo.FLAGS(args)
  assert demo.main(args[:1]) == 0
  out = capsys.readouterr().out
  tenants = recipes.recipe("switch-test").tasks
  assert f"trained base, {', '.join(tenants)}" in out
  for tenant in tenants:
    assert f"  [{tenant}] " in out  # its generations, served from the store
    assert any(line.split()[:1] == [tenant] for line in out.splitlines())  # its quality row
  assert "Memory: 2 full copies" in out and "ROUGE-L / exact match" in out


def test_demo_rejects_a_recipe_of_the_other_family(tmp_path, capsys):
  from jaxmoe.cli import demo

  args = ["jaxmoe-demo", "--family=switch", "--recipe=test", f"--workdir={tmp_path}", "--noprogress"]
  demo.FLAGS(args)
  assert demo.main(args[:1]) == 1
  assert "trains mixtral tenants, not --family=switch" in capsys.readouterr().err
