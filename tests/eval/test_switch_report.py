"""The Switch sweep's goals, tables and plot on a hand-made result (no model runs)."""

from __future__ import annotations

import pytest

from jaxmoe.eval import switch_report

TENANTS = ["a", "b"]


def _scores(rl: float, em: float, ppl: float) -> dict:
  return {"rouge_l": rl, "exact_match": em, "perplexity": ppl}


def _entry(kind, label, k, a, b, **extra) -> dict:
  return {"kind": kind, "label": label, "k": k, "memory_fraction": 0.5, **extra, "scores": {"a": a, "b": b}}


def _result() -> dict:
  cons = dict(share=0.5, metric="l2", owner="average", distinct_experts=0.75)
  label = "consolidated share 0.5 l2/average"
  entries = [
    _entry("original", "original fine-tunes", 0, _scores(0.5, 0.2, 2.0), _scores(0.4, 0.1, 3.0)),
    _entry("base", "base", 0, _scores(0.0, 0.0, 90.0), _scores(0.0, 0.0, 80.0)),
    _entry("merge", "average", 2, _scores(0.1, 0.0, 9.0), _scores(0.1, 0.0, 9.0)),
    _entry("merge", "ties(density=0.2,lam=1)", 2, _scores(0.2, 0.0, 8.0), _scores(0.3, 0.0, 7.0)),
    # Within 3% on ROUGE-L and perplexity for both tenants, exact match of b down 10%.
    _entry("consolidated", label, 2, _scores(0.495, 0.2, 2.04), _scores(0.4, 0.09, 3.0), **cons),
    _entry("ablation", f"{label}, averaged non-expert", 2, _scores(0.3, 0.1, 5.0), _scores(0.4, 0.0, 6.0), **cons),
  ]
  return {
    "recipe": {"name": "hand-made"},
    "recipe_key": "hand-made-0",
    "tenants": TENANTS,
    "rows": {"a": 8, "b": 8},
    "routing": "dropless",
    "trained": [],
    "plot_setting": "l2/average",
    "entries": entries,
    "versions": {k: "-" for k in ("python", "jax", "numpy", "optax", "platform", "backend")},
    "date": "today",
    "command": "python bench/quality_switch.py",
    "seconds": 1.0,
  }


def test_goals():
  result = _result()
  g = switch_report.goals(result["entries"], TENANTS, goal_k=2, goal_drop=0.03)
  assert g["all_specialised"]
  (setting,) = g["settings"]
  assert setting["rouge_l"]["worst_drop"] == pytest.approx(0.01) and setting["rouge_l"]["within_goal"]
  assert setting["perplexity"]["worst_drop"] == pytest.approx(0.02) and setting["perplexity"]["beats_merges"]
  assert not setting["exact_match"]["within_goal"] and setting["exact_match"]["drop"]["b"] == pytest.approx(0.1)
  assert g["met_by"] == {"rouge_l": [setting["label"]], "exact_match": [], "perplexity": [setting["label"]]}
  (ablation,) = g["ablation"]
  assert ablation["own_better"]["rouge_l"] == {"a": True, "b": False}  # a tie is not better
  assert ablation["own_better"]["perplexity"] == {"a": True, "b": True}


def test_markdown_and_plot(tmp_path):
  result = _result()
  result["goals"] = switch_report.goals(result["entries"], TENANTS, goal_k=2, goal_drop=0.03)
  md = switch_report.markdown(result)
  assert "ROUGE-L, K = 2: every tenant within 3%" in md and "exact match, K = 2" in md and "MISSED" in md
  assert "Reconfiguration ablation, perplexity" in md and "K = 2: 1 of 1" in md
  assert "| ties (best setting per tenant) | 0.575 |" in md  # ROUGE-L (0.2 / 0.5 + 0.3 / 0.4) / 2
  switch_report.plot(result, tmp_path / "plot.png")
  assert (tmp_path / "plot.png").stat().st_size > 1000
  assert "python bench/quality_switch.py" in switch_report.readme(result)
