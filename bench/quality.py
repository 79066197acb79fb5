"""Quality against memory: consolidation vs merging baselines on real fine-tuned tenants.

  python bench/quality.py                       # writes bench/results/quality/
  python bench/quality.py --rows=16 --distinct=0.5 --metrics=l2 --owners=average --out=/tmp/q

Builds (or loads from the demo's cache) the recipe's base and its K fine-tuned
tenants (jaxmoe-train), then scores every tenant on held-out text of its own
domain (perplexity, KL to its original, top-1 agreement) for:
  original      each tenant's own fine-tune (K full copies; the upper bound)
  base          the pretrained base, for every tenant
  merges        weight averaging, task arithmetic, TIES, DARE: one model for all
  consolidated  one store per (distinct experts, metric, owner): each tenant
                keeps its backbone and router, experts shared by similarity
  ablation      for every store, the same experts with ONE set of non-expert
                layers, the mean of the K backbones (no reconfiguration)
Writes quality.json (everything), quality.md (tables and the goals),
quality_vs_memory.png and README.md (command, date, versions) under --out.
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
flags.DEFINE_string("recipe", "demo", "Training recipe of the tenants.")
flags.DEFINE_string("workdir", None, "Cache of trained tenants (default: the demo's).")
flags.DEFINE_string("out", "bench/results/quality", "Output folder.")
flags.DEFINE_integer("rows", 64, "Held-out rows per domain (of the recipe's seq_len bytes).")
flags.DEFINE_list("distinct", ["1.0", "0.75", "0.5", "0.25"], "Fractions of distinct experts kept.")
flags.DEFINE_list("metrics", ["l2", "cosine", "output"], "Expert distance metrics.")
flags.DEFINE_list("owners", ["round_robin", "base", "medoid", "average"], "Owner policies.")
flags.DEFINE_float("goal_distinct", 0.5, "Where the goals are checked.")
flags.DEFINE_float("goal_ppl", 0.02, "Goal: consolidated perplexity within this fraction of the original.")


def entry(kind: str, label: str, scores: dict, memory_fraction: float, **extra) -> dict:
  return {
    "kind": kind,
    "label": label,
    "memory_fraction": memory_fraction,
    **extra,
    "scores": {t: s.as_dict() for t, s in scores.items()},
  }


def consolidated_entries(built, cfg, suite, calibration: str) -> list[dict]:
  from jaxmoe.consolidate import Metric, Owner
  from jaxmoe.eval import quality
  from jaxmoe.io.store import load_store

  out = []
  combos = list(itertools.product([float(d) for d in FLAGS.distinct], FLAGS.metrics, FLAGS.owners))
  with tempfile.TemporaryDirectory(prefix="jaxmoe-quality-") as tmp:
    for i, (distinct, metric, owner) in enumerate(combos):
      path = pathlib.Path(tmp) / f"store{i}"
      header = quality.consolidate_at(built.tenants, path, cfg, distinct, Metric(metric), Owner(owner), calibration)
      models = quality.tenant_models(load_store(path))
      ablation = suite.score(quality.averaged_backbones(models))
      mem = quality.memory(header)
      label = f"consolidated {100 * distinct:.0f}% {metric}/{owner}"
      out.append(
        entry(
          "consolidated",
          label,
          suite.score(models),
          mem["memory_fraction"],
          distinct=distinct,
          metric=metric,
          owner=owner,
          store_bytes=mem["store_bytes"],
          distinct_experts=mem["distinct_experts"],
          ablation_scores={t: s.as_dict() for t, s in ablation.items()},
        )
      )
      print(f"[{i + 1}/{len(combos)}] {label}: " + _ppl_line(out[-1]), flush=True)
  return out


def _ppl_line(e: dict) -> str:
  return "  ".join(f"{t} {s['perplexity']:.3f}" for t, s in e["scores"].items())


def goals(entries: list[dict], tenants: list[str]) -> dict:
  """The issue's goals, checked per consolidation setting at goal_distinct."""
  orig = next(e for e in entries if e["kind"] == "original")["scores"]
  base = next(e for e in entries if e["kind"] == "base")["scores"]
  merges = [e for e in entries if e["kind"] == "merge"]
  best_merge = {t: min(m["scores"][t]["perplexity"] for m in merges) for t in tenants}
  specialised = {t: orig[t]["perplexity"] < base[t]["perplexity"] for t in tenants}
  ablation = [
    {"label": e["label"], "own_better": {t: _own_better(e, t) for t in tenants}}
    for e in entries
    if e["kind"] == "consolidated"
  ]
  settings = []
  for e in entries:
    if e["kind"] != "consolidated" or abs(e["distinct"] - FLAGS.goal_distinct) > 1e-9:
      continue
    ratio = {t: e["scores"][t]["perplexity"] / orig[t]["perplexity"] - 1 for t in tenants}
    beats = {t: e["scores"][t]["perplexity"] < best_merge[t] for t in tenants}
    settings.append(
      {
        "label": e["label"],
        "metric": e["metric"],
        "owner": e["owner"],
        "ppl_increase": ratio,
        "within_goal": all(r <= FLAGS.goal_ppl for r in ratio.values()),
        "beats_every_merge": all(beats.values()),
        "worst_increase": max(ratio.values()),
      }
    )
  return {
    "goal_distinct": FLAGS.goal_distinct,
    "goal_ppl": FLAGS.goal_ppl,
    "specialised": specialised,
    "all_specialised": all(specialised.values()),
    "best_merge_ppl": best_merge,
    "settings": settings,
    "met_by": [s["label"] for s in settings if s["within_goal"] and s["beats_every_merge"]],
    "ablation": ablation,
    "ablation_met_by": [a["label"] for a in ablation if all(a["own_better"].values())],
  }


def _own_better(e: dict, t: str) -> bool:
  """Own non-expert layers give tenant t a lower perplexity than the averaged ones (same experts)."""
  return e["scores"][t]["perplexity"] < e["ablation_scores"][t]["perplexity"]


def _goals_md(g: dict) -> list[str]:
  specialised = ", ".join(f"{t} {'yes' if v else 'no'}" for t, v in g["specialised"].items())
  met = f"met by {', '.join(g['met_by'])}" if g["met_by"] else "MISSED by every setting"
  lines = [
    "## Goals",
    "",
    (
      f"- Specialised (each tenant beats the base on its own domain): "
      f"{'met' if g['all_specialised'] else 'MISSED'} ({specialised})"
    ),
    (
      f"- At {100 * g['goal_distinct']:.0f}% distinct experts, every tenant within "
      f"{100 * g['goal_ppl']:.0f}% of its original and better than every merging baseline: {met}"
    ),
    (
      f"- Reconfiguration ablation (own non-expert layers beat one averaged set, every tenant, same "
      f"experts): {len(g['ablation_met_by'])} of {len(g['ablation'])} consolidation settings"
    ),
    "",
    "| setting | worst ppl increase | within goal | beats every merge |",
    "|---|---:|:---:|:---:|",
  ]
  yes = lambda v: "yes" if v else "no"
  for s in g["settings"]:
    lines.append(
      f"| {s['label']} | {100 * s['worst_increase']:+.2f}% | {yes(s['within_goal'])} | {yes(s['beats_every_merge'])} |"
    )
  return lines


def _change(p: float, ref: float) -> str:
  return f"{100 * (p / ref - 1):+.1f}%"


def _table_md(tenants: list[str], entries: list[dict]) -> list[str]:
  orig = next(e for e in entries if e["kind"] == "original")["scores"]
  lines = [
    "## All settings",
    "",
    "Last two columns, consolidated rows: the reconfiguration ablation (the same experts, every tenant on "
    "the mean of the K backbones): its worst perplexity change against the original, and whether each "
    "tenant's own non-expert layers do better for every tenant.",
    "",
    "| setting | memory | "
    + " | ".join(tenants)
    + " | mean KL | mean top-1 | averaged non-expert: worst | own better |",
    "|---|---:|" + "---:|" * len(tenants) + "---:|---:|---:|:---:|",
  ]
  for e in entries:
    cells = []
    for t in tenants:
      p = e["scores"][t]["perplexity"]
      change = "" if e["kind"] == "original" else f" ({_change(p, orig[t]['perplexity'])})"
      cells.append(f"{p:.3f}{change}")
    kl = sum(e["scores"][t]["kl"] for t in tenants) / len(tenants)
    top1 = sum(e["scores"][t]["top1"] for t in tenants) / len(tenants)
    memory = f"{100 * e['memory_fraction']:.1f}%"
    ablation = " | "
    if e["kind"] == "consolidated":
      worst = max(e["ablation_scores"][t]["perplexity"] / orig[t]["perplexity"] - 1 for t in tenants)
      ablation = f"{100 * worst:+.1f}% | {'yes' if all(_own_better(e, t) for t in tenants) else 'no'}"
    lines.append(f"| {e['label']} | {memory} | {' | '.join(cells)} | {kl:.4f} | {top1:.3f} | {ablation} |")
  return lines


def _ablation_md(tenants: list[str], entries: list[dict], distinct: float) -> list[str]:
  """Per tenant perplexity at `distinct`: own non-expert layers against the averaged ones."""
  orig = next(e for e in entries if e["kind"] == "original")["scores"]
  lines = [
    f"## Reconfiguration ablation at {100 * distinct:.0f}% distinct experts",
    "",
    "Perplexity (change vs the original) with each tenant's own non-expert layers / with one averaged set, "
    "the experts the same.",
    "",
    "| setting | " + " | ".join(tenants) + " |",
    "|---|" + "---|" * len(tenants),
  ]
  for e in entries:
    if e["kind"] != "consolidated" or abs(e["distinct"] - distinct) > 1e-9:
      continue
    cells = []
    for t in tenants:
      own, avg, ref = e["scores"][t]["perplexity"], e["ablation_scores"][t]["perplexity"], orig[t]["perplexity"]
      cells.append(f"{own:.3f} ({_change(own, ref)}) / {avg:.3f} ({_change(avg, ref)})")
    lines.append(f"| {e['label']} | {' | '.join(cells)} |")
  return lines


def markdown(result: dict) -> str:
  tenants = result["tenants"]
  intro = (
    f"Held-out rows per domain: {result['rows']} x {result['recipe']['seq_len']} bytes. Perplexity "
    "of each tenant on its own domain (change vs its original); KL(original || model) and top-1 "
    "agreement with the original, averaged over tenants. Memory: bytes held, as a fraction of K full "
    "copies (a merge or the base is one model: 1/K). Consolidated rows: `distinct experts% "
    "metric/owner`."
  )
  title = f"# Quality vs memory: recipe `{result['recipe']['name']}`, K = {len(tenants)} tenants"
  lines = [title, "", intro, ""]
  lines += _goals_md(result["goals"]) + [""]
  lines += _ablation_md(tenants, result["entries"], result["goals"]["goal_distinct"]) + [""]
  lines += _table_md(tenants, result["entries"])
  return "\n".join(lines) + "\n"


def plot(result: dict, path: pathlib.Path) -> None:
  """Mean perplexity / original against memory: one panel per metric, a line per owner policy."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import FormatStrFormatter

  tenants, entries = result["tenants"], result["entries"]
  orig = next(e for e in entries if e["kind"] == "original")["scores"]
  rel = lambda e, key="scores": sum(e[key][t]["perplexity"] / orig[t]["perplexity"] for t in tenants) / len(tenants)
  metrics = sorted({e["metric"] for e in entries if e["kind"] == "consolidated"}) or ["-"]
  fig = Figure(figsize=(5.5 * len(metrics), 4.5), layout="constrained")
  axes = fig.subplots(1, len(metrics), squeeze=False)[0]
  others = [e for e in entries if e["kind"] != "consolidated"]
  markers = {"original": "*", "base": "s", "merge": "x"}
  for ax, metric in zip(axes, metrics):
    cons = [e for e in entries if e["kind"] == "consolidated" and e["metric"] == metric]
    for owner in sorted({e["owner"] for e in cons}):
      pts = sorted((100 * e["memory_fraction"], rel(e)) for e in cons if e["owner"] == owner)
      (line,) = ax.plot(*zip(*pts), marker="o", label=f"consolidated, owner {owner}")
      ablated = sorted((100 * e["memory_fraction"], rel(e, "ablation_scores")) for e in cons if e["owner"] == owner)
      ax.plot(*zip(*ablated), ls="--", marker=".", color=line.get_color(), label=f"  averaged non-expert, {owner}")
    for e in others:
      ax.scatter([100 * e["memory_fraction"]], [rel(e)], marker=markers[e["kind"]], label=e["label"])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    ax.tick_params(axis="y", which="minor", labelsize=6)
    ax.set_xlabel("memory (% of K full copies)")
    ax.set_ylabel("perplexity / original's (mean over tenants)")
    ax.set_title(f"consolidation metric {metric}")
    ax.grid(True, which="both", alpha=0.3)
  axes[-1].legend(fontsize=6, loc="upper right")
  fig.savefig(path, dpi=110, metadata={"Software": None})


def readme(result: dict) -> str:
  v = result["versions"]
  trained = (
    f"including training {', '.join(result['trained'])}"
    if result["trained"]
    else "tenants loaded from the cache jaxmoe-demo / jaxmoe-train fill; without it the command "
    "trains them first, bit for bit the same on one machine"
  )
  return "\n".join(
    [
      "# Quality vs memory results",
      "",
      "Reproduce (from the repository root, after `pip install -e .`):",
      "",
      "```bash",
      result["command"],
      "```",
      "",
      f"- date: {result['date']}",
      f"- wall time: {result['seconds']:.0f} s ({trained})",
      f"- recipe: `{result['recipe']['name']}`, cache key `{result['recipe_key']}`",
      (
        f"- versions: Python {v['python']}, jax {v['jax']}, numpy {v['numpy']}, optax {v['optax']}, "
        f"{v['platform']}, backend {v['backend']}"
      ),
      "",
      "Files: `quality.md` (tables, goals), `quality.json` (every score), `quality_vs_memory.png`.",
      "The corpora come from the running Python's standard library, so another Python version trains",
      "slightly different tenants: expect the same picture, not the same digits.",
      "",
    ]
  )


def versions() -> dict:
  from jaxmoe.eval import quality

  return quality.environment()


def main(argv) -> None:
  del argv
  from jaxmoe.cli.common import quiet_library_logs
  from jaxmoe.eval import quality
  from jaxmoe.io import checkpoint
  from jaxmoe.train import build, corpus, recipes

  quiet_library_logs()
  start = time.perf_counter()
  recipe = recipes.recipe(FLAGS.recipe)
  built = build.build(recipe, pathlib.Path(FLAGS.workdir) if FLAGS.workdir else build.default_workdir())
  cfg, base = checkpoint.load(built.base)
  originals = {t: checkpoint.load(p)[1] for t, p in built.tenants.items()}
  k = len(originals)
  suite = quality.Suite(cfg, originals, quality.heldout(recipe.domains, FLAGS.rows, recipe.seq_len))
  entries = [
    entry("original", "original fine-tunes", suite.score(originals), 1.0),
    entry("base", "base", suite.score_shared(base), 1.0 / k),
  ]
  for label, model in quality.merged_models(base, originals).items():
    entries.append(entry("merge", label, suite.score_shared(model), 1.0 / k))
  for e in entries:
    print(f"{e['label']}: {_ppl_line(e)}", flush=True)
  entries += consolidated_entries(built, cfg, suite, corpus.calibration_text(recipe.domains, recipe.seq_len))
  result = {
    "recipe": json.loads(recipe.to_json()),
    "recipe_key": recipe.key,
    "tenants": suite.tenants,
    "trained": list(built.trained),
    "rows": FLAGS.rows,
    "entries": entries,
    "versions": versions(),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
  }
  result["goals"] = goals(entries, suite.tenants)
  result["seconds"] = time.perf_counter() - start
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "quality.json").write_text(json.dumps(result, indent=1))
  (out / "quality.md").write_text(markdown(result))
  plot(result, out / "quality_vs_memory.png")
  (out / "README.md").write_text(readme(result))
  print(markdown(result).split("## All settings")[0])
  print(f"wrote {out}/quality.md, quality.json, quality_vs_memory.png, README.md ({result['seconds']:.0f} s)")


if __name__ == "__main__":
  app.run(main)
