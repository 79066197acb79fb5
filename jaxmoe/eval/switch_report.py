"""Tables, plot and README of the Switch quality sweep (bench/quality_switch.py's result dict).

Entries carry `kind` (original, base, merge, consolidated, ablation), `k` (0
for the original and the base, which do not depend on K) and per-tenant
scores: exact_match, rouge_l, perplexity. Changes are relative to each
tenant's original fine-tune.
"""

from __future__ import annotations

import pathlib

SCORE_NAMES = {"rouge_l": "ROUGE-L", "exact_match": "exact match", "perplexity": "perplexity"}
SCORES = tuple(SCORE_NAMES)
LOWER_BETTER = ("perplexity",)
MERGE_FAMILIES = ("average", "task_arithmetic", "ties", "dare")


def _orig(result: dict) -> dict:
  return next(e for e in result["entries"] if e["kind"] == "original")["scores"]


def _change(value: float, ref: float) -> str:
  return f"{100 * (value / ref - 1):+.1f}%" if ref > 0 else "n/a"


def _ks(result: dict) -> list[int]:
  return sorted({e["k"] for e in result["entries"] if e["k"]})


def _at(result: dict, k: int, kinds=("merge", "consolidated", "ablation")) -> list[dict]:
  fixed = [e for e in result["entries"] if e["kind"] in ("original", "base")]
  return fixed + [e for e in result["entries"] if e["k"] == k and e["kind"] in kinds]


def _yes(v: bool) -> str:
  return "yes" if v else "no"


def _loss(e: dict, orig: dict, t: str, score: str) -> float:
  """How much worse than its original tenant t scores, as a fraction (negative: better; 0 when both are 0)."""
  ref, v = orig[t][score], e["scores"][t][score]
  if score in LOWER_BETTER:
    return v / ref - 1
  return 1 - v / ref if ref > 0 else float(v < ref)


def _better(a: float, b: float, score: str) -> bool:
  return a < b if score in LOWER_BETTER else a > b


def _setting(e: dict, orig: dict, k_tenants: list[str], merges: list[dict], goal_drop: float) -> dict:
  """One consolidation at goal_k: per score the drops and whether it beats averaging and the best other merge."""
  row = {"label": e["label"], "share": e["share"], "metric": e["metric"], "owner": e["owner"]}
  for s in SCORES:
    best = min if s in LOWER_BETTER else max
    drop = {t: _loss(e, orig, t, s) for t in k_tenants}
    beats = {t: all(_better(e["scores"][t][s], m["scores"][t][s], s) for m in merges) for t in k_tenants}
    row[s] = {
      "drop": drop,
      "worst_drop": max(drop.values()),
      "within_goal": all(d <= goal_drop for d in drop.values()),
      "beats_merges": bool(merges) and all(beats.values()),
      "best_merge": {t: best(m["scores"][t][s] for m in merges) for t in k_tenants} if merges else {},
    }
  return row


def goals(entries: list[dict], tenants: list[str], goal_k: int, goal_drop: float) -> dict:
  """The issue's goals: specialisation; at goal_k, consolidation within goal_drop and above every merge; ablation.

  Beating every merge (averaging, and every task arithmetic / TIES / DARE setting) on a tenant is the
  same as beating averaging and the best of the others.
  """
  orig = next(e for e in entries if e["kind"] == "original")["scores"]
  base = next(e for e in entries if e["kind"] == "base")["scores"]
  specialised = {t: {s: _better(orig[t][s], base[t][s], s) for s in SCORES} for t in tenants}
  at_k = [e for e in entries if e["k"] == goal_k]
  k_tenants = list(next(e for e in at_k if e["kind"] == "consolidated")["scores"]) if at_k else []
  merges = [e for e in at_k if e["kind"] == "merge"]
  settings = [_setting(e, orig, k_tenants, merges, goal_drop) for e in at_k if e["kind"] == "consolidated"]
  ablation = []
  by_label = {(e["k"], e["label"]): e for e in entries}
  for e in entries:
    if e["kind"] == "consolidated":
      ab = by_label[(e["k"], f"{e['label']}, averaged non-expert")]
      better = {
        s: {t: _better(e["scores"][t][s], ab["scores"][t][s], s) for t in e["scores"]}
        for s in ("rouge_l", "perplexity")
      }
      ablation.append({"k": e["k"], "label": e["label"], "own_better": better})
  return {
    "goal_k": goal_k,
    "goal_drop": goal_drop,
    "specialised": specialised,
    "all_specialised": all(all(v.values()) for v in specialised.values()),
    "settings": settings,
    "met_by": {s: [r["label"] for r in settings if r[s]["within_goal"] and r[s]["beats_merges"]] for s in SCORES},
    "ablation": ablation,
  }


def _goals_md(result: dict) -> list[str]:
  g = result["goals"]
  spec = ", ".join(f"{t} {_yes(all(v.values()))}" for t, v in g["specialised"].items())
  lines = [
    "## Goals",
    "",
    f"- Specialised (each tenant beats the base on its own task: ROUGE-L, exact match and perplexity): "
    f"{'met' if g['all_specialised'] else 'MISSED'} ({spec})",
  ]
  for s in SCORES:
    met = g["met_by"][s]
    what = f"met by {len(met)} settings: {', '.join(met)}" if met else "MISSED by every setting"
    lines.append(
      f"- {SCORE_NAMES[s]}, K = {g['goal_k']}: every tenant within {100 * g['goal_drop']:.0f}% of its original "
      f"and better than every merge (averaging, each task arithmetic / TIES / DARE setting), on every tenant: {what}"
    )
  for s in ("rouge_l", "perplexity"):
    per_k = {}
    for a in g["ablation"]:
      per_k.setdefault(a["k"], [0, 0])[0] += all(a["own_better"][s].values())
      per_k[a["k"]][1] += 1
    counts = "; ".join(f"K = {k}: {n} of {m}" for k, (n, m) in sorted(per_k.items()))
    lines.append(
      f"- Reconfiguration ablation, {SCORE_NAMES[s]} (own non-expert layers better than one averaged set for "
      f"every tenant, same experts): {counts} consolidation settings"
    )
  lines += [
    "",
    f"K = {g['goal_k']}: worst loss over tenants against the original (score drop, or perplexity increase; "
    "negative: better than the original) and whether the setting beats every merge on every tenant.",
    "",
    "| setting | " + " | ".join(f"worst {SCORE_NAMES[s]} loss | within | beats merges" for s in SCORES) + " |",
    "|---|" + "---:|:---:|:---:|" * len(SCORES),
  ]
  for r in g["settings"]:
    cells = []
    for s in SCORES:
      x = r[s]
      cells += [f"{100 * x['worst_drop']:+.2f}%", _yes(x["within_goal"]), _yes(x["beats_merges"])]
    lines.append(f"| {r['label']} | {' | '.join(cells)} |")
  return lines


def _tenant_table(result: dict, k: int, score: str) -> list[str]:
  """One score, every method at K = k, one column per tenant of the K."""
  orig = _orig(result)
  rows = _at(result, k)
  tenants = list(next(e for e in rows if e["kind"] == "consolidated")["scores"])
  lines = [
    f"### {SCORE_NAMES[score]}, K = {k}",
    "",
    "| setting | memory | " + " | ".join(tenants) + " |",
    "|---|---:|" + "---:|" * len(tenants),
  ]
  for e in rows:
    cells = []
    for t in tenants:
      v = e["scores"][t][score]
      cells.append(f"{v:.3f}" + ("" if e["kind"] == "original" else f" ({_change(v, orig[t][score])})"))
    memory = f"{100 * e['memory_fraction']:.1f}%" if e["kind"] != "base" else "-"
    lines.append(f"| {e['label']} | {memory} | {' | '.join(cells)} |")
  return lines


def _mean_rel(scores: dict, orig: dict, score: str) -> float | None:
  """Mean over tenants of score / the original's ({tenant: value}); tenants whose original scores 0 left out."""
  rel = [v / orig[t][score] for t, v in scores.items() if orig[t][score] > 0]
  return sum(rel) / len(rel) if rel else None


def _fmt(x: float | None) -> str:
  return "-" if x is None else f"{x:.3f}"


def _series(result: dict, score: str) -> dict[str, dict[int, dict]]:
  """Plot/table series: method label -> {k: {tenant: score}}; merges other than average at their best spec."""
  metric_owner = result["plot_setting"]
  out: dict[str, dict[int, dict]] = {}
  for k in _ks(result):
    ents = _at(result, k)
    tenants = list(next(e for e in ents if e["kind"] == "consolidated")["scores"])
    for e in ents:
      if e["kind"] in ("original", "base"):
        out.setdefault(e["label"], {})[k] = {t: e["scores"][t][score] for t in tenants}
      elif e["kind"] == "merge":
        family = e["label"].split("(")[0]
        name = family if family == "average" else f"{family} (best setting per tenant)"
        cur = out.setdefault(name, {}).setdefault(k, {})
        best = min if score == "perplexity" else max
        for t in tenants:
          v = e["scores"][t][score]
          cur[t] = best(cur[t], v) if t in cur else v
      elif f"{e['metric']}/{e['owner']}" == metric_owner:
        name = f"consolidated share {e['share']:g}" + (" averaged non-expert" if e["kind"] == "ablation" else "")
        out.setdefault(name, {})[k] = {t: e["scores"][t][score] for t in tenants}
  return out


def _variants_md(result: dict, score: str) -> list[str]:
  orig = _orig(result)
  ks = _ks(result)
  lines = [
    f"### {SCORE_NAMES[score]}: mean over the K tenants of score / original's",
    "",
    f"Consolidation: {result['plot_setting']}; merges other than averaging at their best hyperparameters "
    "per tenant (which favours them).",
    "",
    "| method | " + " | ".join(f"K = {k}" for k in ks) + " |",
    "|---|" + "---:|" * len(ks),
  ]
  for name, by_k in _series(result, score).items():
    cells = [_fmt(_mean_rel(by_k[k], orig, score)) if k in by_k else "-" for k in ks]
    lines.append(f"| {name} | {' | '.join(cells)} |")
  return lines


def _every_md(result: dict, k: int) -> list[str]:
  orig = _orig(result)
  rows = [e for e in _at(result, k, ("merge", "consolidated", "ablation"))]
  tenants = list(next(e for e in rows if e["kind"] == "consolidated")["scores"])
  lines = [
    f"### K = {k}: {', '.join(tenants)}",
    "",
    "Per tenant: ROUGE-L / exact match / perplexity. Last columns: mean over tenants of ROUGE-L, exact "
    "match and perplexity as fractions of the originals' (tenants whose original scores 0 left out).",
    "",
    "| setting | memory | distinct experts | " + " | ".join(tenants) + " | mean RL | mean EM | mean ppl |",
    "|---|---:|---:|" + "---|" * len(tenants) + "---:|---:|---:|",
  ]
  for e in rows:
    cells = [
      f"{e['scores'][t]['rouge_l']:.3f} / {e['scores'][t]['exact_match']:.3f} / {e['scores'][t]['perplexity']:.3f}"
      for t in tenants
    ]
    distinct = f"{100 * e['distinct_experts']:.1f}%" if "distinct_experts" in e else "-"
    memory = f"{100 * e['memory_fraction']:.1f}%" if e["kind"] != "base" else "-"
    rel = " | ".join(_fmt(_mean_rel({t: e["scores"][t][s] for t in tenants}, orig, s)) for s in SCORES)
    lines.append(f"| {e['label']} | {memory} | {distinct} | {' | '.join(cells)} | {rel} |")
  return lines


def markdown(result: dict) -> str:
  rows = ", ".join(f"{t} {n}" for t, n in result["rows"].items())
  ks = _ks(result)
  lines = [
    f"# Switch quality against merging baselines: recipe `{result['recipe']['name']}`, "
    f"K = {', '.join(map(str, ks))} variants",
    "",
    f"Each tenant is scored on held-out rows of its own task (rows: {rows}): greedy output, "
    f"{result['routing']} routing, against the reference; exact match, ROUGE-L F1 (`rouge-score`, default "
    "tokenizer, no stemming), perplexity of the reference output (teacher-forced). The K variants are the "
    f"first K tenants of {', '.join(result['tenants'])}. Changes are against each tenant's original fine-tune. "
    "Memory: bytes held as a fraction of K full copies (a merge is one model: 1/K). Consolidated rows: "
    "`share` (fraction of the L*E*(K-1) possible expert joins) `metric/owner`; their `averaged non-expert` "
    "rows are the reconfiguration ablation (the same experts, one mean backbone for every tenant).",
    "",
  ]
  lines += _goals_md(result) + ["", "## Score against the number of variants", ""]
  for s in SCORES:
    lines += _variants_md(result, s) + [""]
  lines += [f"## Per tenant, K = {result['goals']['goal_k']}", ""]
  for s in ("rouge_l", "exact_match", "perplexity"):
    lines += _tenant_table(result, result["goals"]["goal_k"], s) + [""]
  lines += ["## Every setting", ""]
  for k in ks:
    lines += _every_md(result, k) + [""]
  return "\n".join(lines)


def plot(result: dict, path: pathlib.Path) -> None:
  """Score against the number of variants: a panel per tenant and one of the mean relative score, per score."""
  from matplotlib.figure import Figure

  tenants, orig, ks = result["tenants"], _orig(result), _ks(result)
  scores = SCORES
  fig = Figure(figsize=(3.6 * (len(tenants) + 1), 3.4 * len(scores) + 1.2), layout="constrained")
  axes = fig.subplots(len(scores), len(tenants) + 1, squeeze=False)
  for row, score in enumerate(scores):
    for name, by_k in _series(result, score).items():
      style = _style(name)
      for col, t in enumerate(tenants):
        pts = [(k, by_k[k][t]) for k in ks if t in by_k.get(k, {})]
        if pts:
          axes[row, col].plot(*zip(*pts), label=name, **style)
      mean = [(k, _mean_rel(by_k[k], orig, score)) for k in ks if k in by_k]
      mean = [(k, m) for k, m in mean if m is not None]
      if mean:
        axes[row, -1].plot(*zip(*mean), label=name, **style)
    if score == "perplexity":  # merges and the base are orders of magnitude above the fine-tunes
      for ax in axes[row]:
        ax.set_yscale("log")
    for col, t in enumerate(tenants):
      axes[row, col].set_title(f"{t}: {SCORE_NAMES[score]}", fontsize=9)
    axes[row, -1].set_title(f"mean {SCORE_NAMES[score]} / original's", fontsize=9)
    for ax in axes[row]:
      ax.set_xticks(ks)
      ax.set_xlabel("distinct variants K")
      ax.grid(True, alpha=0.3)
  handles, labels = axes[0, -1].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncol=4, fontsize=7)
  fig.savefig(path, dpi=100, metadata={"Software": None})


def _style(name: str) -> dict:
  if name.startswith("original"):
    return {"color": "black", "ls": "--", "marker": "*"}
  if name == "base":
    return {"color": "gray", "ls": ":", "marker": "s"}
  if name.startswith("consolidated"):
    share = float(name.split()[2])
    color = (0.1, 0.3 + 0.5 * share, 0.2)
    if "averaged" in name:
      return {"color": color, "ls": ":", "marker": "v", "alpha": 0.8}
    return {"color": color, "ls": "-", "marker": "o"}
  colors = {"average": "tab:red", "task_arithmetic": "tab:orange", "ties": "tab:purple", "dare": "tab:brown"}
  return {"color": colors[name.split(" ")[0]], "ls": "-", "marker": "x"}


def readme(result: dict) -> str:
  v = result["versions"]
  trained = (
    f"including training {', '.join(result['trained'])}"
    if result["trained"]
    else "tenants loaded from the cache jaxmoe-demo --family=switch / jaxmoe-train fill; without it the "
    "command trains them first, bit for bit the same on one machine"
  )
  return "\n".join(
    [
      "# Switch quality results",
      "",
      "Reproduce (from the repository root, after `pip install -e '.[bench]'`):",
      "",
      "```bash",
      result["command"],
      "```",
      "",
      f"- date: {result['date']}",
      f"- wall time: {result['seconds']:.0f} s ({trained})",
      f"- recipe: `{result['recipe']['name']}`, cache key `{result['recipe_key']}`; routing {result['routing']}",
      (
        f"- versions: Python {v['python']}, jax {v['jax']}, numpy {v['numpy']}, optax {v['optax']}, "
        f"{v['platform']}, backend {v['backend']}"
      ),
      "",
      "Files: `quality.md` (tables, goals), `quality.json` (every score), `score_vs_variants.png`.",
      "The corpora come from the running Python's standard library, so another Python version trains",
      "slightly different tenants: expect the same picture, not the same digits.",
      "",
    ]
  )
