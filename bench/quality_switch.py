"""Switch quality: consolidation vs merging baselines over 2 to 4 fine-tuned variants, and the ablation.

  python bench/quality_switch.py                # writes bench/results/quality-switch/
  python bench/quality_switch.py --rows=32 --ks=4 --shares=0.5 --metrics=l2 --owners=average --out=/tmp/qs  # a minute or two
  python bench/quality_switch.py --report_only   # rewrites the tables and plot from quality.json

Builds (or loads from the cache jaxmoe-demo --family=switch / jaxmoe-train
fill) the recipe's Switch base and its fine-tuned tenants, one per
text-to-text task. For K = 2, 3, 4 distinct variants (the first K tenants in
the recipe's order, the way the paper added variants) it scores every tenant
of the K on held-out rows of its own task (exact match, ROUGE-L, perplexity
of the reference; jaxmoe/eval/seq2seq.py) for:
  original      each tenant's own fine-tune (the upper bound)
  base          the span-corruption base, for every tenant
  merges        weight averaging, task arithmetic, TIES, DARE of the K: one model for all
  consolidated  one store per (share, metric, owner): each tenant keeps its
                non-expert layers, experts shared by similarity
  ablation      each store's experts with ONE set of non-expert layers, the
                mean of the K backbones (no reconfiguration)
Routing is dropless (what serving runs). Writes quality.json (every score),
quality.md (tables, goals), score_vs_variants.png and README.md (command,
date, versions) under --out.
"""

from __future__ import annotations

import datetime
import itertools
import json
import pathlib
import shlex
import sys
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "switch-demo", "Training recipe of the Switch tenants.")
flags.DEFINE_string("workdir", None, "Cache of trained tenants (default: the demo's).")
flags.DEFINE_string("out", "bench/results/quality-switch", "Output folder.")
flags.DEFINE_integer("rows", 128, "Held-out rows per task (all of a task's held-out rows when it has fewer).")
flags.DEFINE_list("ks", ["2", "3", "4"], "Numbers of distinct variants.")
flags.DEFINE_list("shares", ["0.25", "0.5", "1.0"], "Fractions of the L*E*(K-1) possible expert joins.")
flags.DEFINE_list("metrics", ["l2", "cosine"], "Expert distance metrics (output is Mixtral-only).")
flags.DEFINE_list("owners", ["round_robin", "average"], "Owner policies (also: base, medoid).")
flags.DEFINE_string("plot_setting", "l2/average", "metric/owner of the consolidation lines in the plot.")
flags.DEFINE_integer("goal_k", 4, "Where the goals are checked.")
flags.DEFINE_float("goal_drop", 0.03, "Goal: consolidated score within this fraction of the original.")
flags.DEFINE_bool(
  "report_only", False, "Rewrite the tables, plot and README from --out's quality.json (no model runs)."
)


def entry(kind: str, label: str, k: int, scores: dict, memory_fraction: float, **extra) -> dict:
  return {
    "kind": kind,
    "label": label,
    "k": k,
    "memory_fraction": memory_fraction,
    **extra,
    "scores": {t: s.as_dict() for t, s in scores.items()},
  }


def _line(e: dict) -> str:
  return "  ".join(f"{t} RL {s['rouge_l']:.3f} EM {s['exact_match']:.3f}" for t, s in e["scores"].items())


def merge_entries(k: int, base, originals: dict, suite) -> list[dict]:
  from jaxmoe.eval import quality

  out = []
  for label, model in quality.merged_models(base, originals).items():
    out.append(entry("merge", label, k, suite.score_shared(model, list(originals)), 1.0 / k))
    print(f"K={k} {label}: {_line(out[-1])}", flush=True)
  return out


def consolidated_entries(k: int, tenants: dict, suite, tmp: pathlib.Path) -> list[dict]:
  """One store per (share, metric, owner) of the K tenants; scores with own and with averaged backbones."""
  from jaxmoe.consolidate import Metric, Owner
  from jaxmoe.eval import quality
  from jaxmoe.io.store import load_store

  out = []
  combos = list(itertools.product([float(s) for s in FLAGS.shares], FLAGS.metrics, FLAGS.owners))
  for i, (share, metric, owner) in enumerate(combos):
    path = tmp / f"k{k}-store{i}"
    header = quality.consolidate_share(tenants, path, share, Metric(metric), Owner(owner))
    models = quality.tenant_models(load_store(path))
    mem = quality.memory(header)
    label = f"consolidated share {share:g} {metric}/{owner}"
    common = dict(share=share, metric=metric, owner=owner, distinct_experts=mem["distinct_experts"])
    out.append(entry("consolidated", label, k, suite.score(models), mem["memory_fraction"], **common))
    ablated = suite.score(quality.averaged_backbones(models))
    out.append(entry("ablation", f"{label}, averaged non-expert", k, ablated, mem["memory_fraction"], **common))
    print(f"K={k} [{i + 1}/{len(combos)}] {label}: {_line(out[-2])}", flush=True)
  return out


def versions() -> dict:
  from jaxmoe.eval import quality

  return quality.environment()


def main(argv) -> None:
  del argv
  from jaxmoe.cli.common import quiet_library_logs
  from jaxmoe.eval import seq2seq, switch_report
  from jaxmoe.io import checkpoint
  from jaxmoe.train import build, recipes

  quiet_library_logs()
  if FLAGS.report_only:
    return report_only(pathlib.Path(FLAGS.out))
  start = time.perf_counter()
  recipe = recipes.recipe(FLAGS.recipe)
  if recipe.family != "switch":
    raise app.UsageError(f"--recipe={FLAGS.recipe} is not a Switch recipe")
  built = build.build(recipe, pathlib.Path(FLAGS.workdir) if FLAGS.workdir else build.default_workdir())
  cfg, base = checkpoint.load(built.base)
  originals = {t: checkpoint.load(p)[1] for t, p in built.tenants.items()}
  suite = seq2seq.TaskSuite(cfg, list(originals), FLAGS.rows)
  entries = [
    entry("original", "original fine-tunes", 0, suite.score(originals), 1.0),
    entry("base", "base", 0, suite.score_shared(base), 0.0),
  ]
  for e in entries:
    print(f"{e['label']}: {_line(e)}", flush=True)
  with tempfile.TemporaryDirectory(prefix="jaxmoe-quality-switch-") as tmp:
    for k in [int(k) for k in FLAGS.ks]:
      names = list(originals)[:k]
      entries += merge_entries(k, base, {t: originals[t] for t in names}, suite)
      entries += consolidated_entries(k, {t: built.tenants[t] for t in names}, suite, pathlib.Path(tmp))
  result = {
    "recipe": json.loads(recipe.to_json()),
    "recipe_key": recipe.key,
    "tenants": suite.tenants,
    "rows": {t: r.rows for t, r in suite.rows.items()},
    "routing": cfg.routing.value,
    "trained": list(built.trained),
    "plot_setting": FLAGS.plot_setting,
    "entries": entries,
    "versions": versions(),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
  }
  result["goals"] = switch_report.goals(entries, suite.tenants, FLAGS.goal_k, FLAGS.goal_drop)
  result["seconds"] = time.perf_counter() - start
  write(result, pathlib.Path(FLAGS.out))


def write(result: dict, out: pathlib.Path) -> None:
  from jaxmoe.eval import switch_report

  out.mkdir(parents=True, exist_ok=True)
  (out / "quality.json").write_text(json.dumps(result, indent=1))
  (out / "quality.md").write_text(switch_report.markdown(result))
  switch_report.plot(result, out / "score_vs_variants.png")
  (out / "README.md").write_text(switch_report.readme(result))
  print(switch_report.markdown(result).split("## Every setting")[0])
  print(f"wrote {out}/quality.md, quality.json, score_vs_variants.png, README.md ({result['seconds']:.0f} s)")


def report_only(out: pathlib.Path) -> None:
  """Re-renders a finished sweep's files (goals recomputed with this run's --goal_k / --goal_drop)."""
  from jaxmoe.eval import switch_report

  result = json.loads((out / "quality.json").read_text())
  result["goals"] = switch_report.goals(result["entries"], result["tenants"], FLAGS.goal_k, FLAGS.goal_drop)
  write(result, out)


if __name__ == "__main__":
  app.run(main)
