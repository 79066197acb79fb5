"""jaxmoe-demo: real fine-tuned tenants, consolidated and served together, with the quality kept.

  jaxmoe-demo                      # first run trains (2-4 min on 2 CPU cores); later runs ~10 s
  jaxmoe-demo --workdir=DIR --distinct=0.5 --metric=l2 --owner=average
  jaxmoe-demo --family=switch      # Switch tenants, one per text-to-text task (trains first: minutes)

1. Builds or loads the recipe's tenants: a small Mixtral pretrained on the
   Python standard library's source, its English documentation, generated
   arithmetic and JSON/CSV records, then fully fine-tuned once per domain
   (cached under --workdir, keyed by the recipe).
2. Consolidates them into one store keeping --distinct of the experts (cached).
3. Serves a mixed batch of prompts for every tenant (mode mixed) and prints
   what each tenant generated.
4. Prints the memory of K full copies against the store's, and per tenant the
   held-out perplexity on its own domain: its original fine-tune, consolidated,
   the base, and the best merging baseline (`bench/quality.py` is the full sweep).

With --family=switch the tenants are Switch Transformers (encoder-decoder,
top-1): a base pretrained with span corruption on the same corpora, fine-tuned
once per text-to-text task (list a function's parameters, lower-case a word
of prose written in capitals, invert an equation, summarise a record). The prompts are task inputs, decoded
greedily, and the quality rows are exact match and ROUGE-L on each tenant's
held-out task rows (`bench/quality_switch.py` is the full sweep).
"""

from __future__ import annotations

import pathlib
import sys
import time

from absl import app, flags

from jaxmoe.cli.common import quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_enum("family", "mixtral", ["mixtral", "switch"], "Model family of the tenants.")
flags.DEFINE_string(
  "recipe", None, "Training recipe (default: demo, or switch-demo with --family=switch; test / switch-test: tiny, CI)."
)
flags.DEFINE_string("workdir", None, "Cache folder (default: $XDG_CACHE_HOME/jaxmoe/demo, else ~/.cache/jaxmoe/demo).")
flags.DEFINE_float("distinct", 0.5, "Experts kept, as a fraction of the K x L x E of K full copies.")
flags.DEFINE_enum("metric", "l2", ["l2", "cosine", "output"], "Expert distance of the consolidation.")
flags.DEFINE_enum(
  "owner",
  "average",
  ["round_robin", "base", "medoid", "average"],
  "Whose weights a shared expert keeps (see jaxmoe-consolidate --owner).",
)
flags.DEFINE_integer("max_tokens", None, "Tokens generated per prompt (default: 40; Switch: 32).")
flags.DEFINE_float("temperature", None, "Sampling temperature (top_p 0.9, fixed seeds); 0: greedy (Switch's default).")
flags.DEFINE_integer(
  "eval_rows", None, "Held-out rows per domain or task for the quality rows (default 8; Switch: 64)."
)
flags.DEFINE_bool("progress", True, "Training progress bars on stderr (first run only).")

PROG = "jaxmoe-demo"

# Two prompts per tenant, each the start of a line of its domain.
PROMPTS = {
  "code": ("def __init__(self", "    for i in range("),
  "prose": ("The ", "An object is"),
  "arithmetic": ("12+34=", "250-75="),
  "records": ('{"code": 66, "char": "B", ', "2024-03-14,"),
}
# Switch tenants: two inputs of each task (prose-lower: the word between bytes 14 and 15 is in capitals).
SWITCH_PROMPTS = {
  "code-params": ("def get(self, key, default=None):\n    try:", "def copy_file(src, dst, *, follow=True):"),
  "prose-lower": ("The \x0ePASS\x0f statement does nothing.", "A module is a file of Python \x0eCODE\x0f."),
  "arithmetic": ("12+34=46", "250-75=175"),
  "record-summary": (
    '{"code": 66, "char": "B", "name": "LATIN CAPITAL LETTER B", "category": "Lu", "bidi": "L"}',
    "2024-03-14,Thursday,March,74,11",
  ),
}
# Per family: (default recipe, max_tokens, temperature, eval_rows).
DEFAULTS = {"mixtral": ("demo", 40, 0.7, 8), "switch": ("switch-demo", 32, 0.0, 64)}


def store_for(recipe, built, distinct: float, metric: str, owner: str) -> pathlib.Path:
  """The cached store of this consolidation, made on first use."""
  from jaxmoe.consolidate import Metric, Owner
  from jaxmoe.eval import quality
  from jaxmoe.train import corpus

  if metric == "output" and recipe.family != "mixtral":
    raise ValueError("--metric=output needs a calibration step, which only Mixtral has; use l2 or cosine")
  out = built.root / "stores" / f"{metric}-{owner}-{round(100 * distinct)}"
  if not (out / "store.json").is_file():
    calibration = corpus.calibration_text(recipe.domains, recipe.seq_len) if metric == "output" else None
    quality.consolidate_at(built.tenants, out, recipe.model, distinct, Metric(metric), Owner(owner), calibration)
  return out


def serve(store, prompts: dict, max_tokens: int, temperature: float) -> list[tuple[str, dict]]:
  """Every tenant's prompts in one mixed batch: [(prompt, response)] in submission order."""
  from jaxmoe.serving import Engine, EngineConfig, Mode

  longest = max(len(p.encode()) + 1 for tenant in store.tenants for p in prompts[tenant])
  seq_len = max(64, longest) + max_tokens  # the Mixtral prompts are short: 64 + max_tokens
  limit = store.config.max_positions  # None: relative positions (Switch)
  seq_len = seq_len if limit is None else min(limit, seq_len)
  engine = Engine(store, EngineConfig(mode=Mode.MIXED, max_batch=8, max_seq_len=seq_len))
  ids = {}
  for tenant in store.tenants:
    for i, prompt in enumerate(prompts[tenant]):
      rid = engine.submit(
        {
          "id": f"{tenant}-{i}",
          "model": tenant,
          "prompt": prompt,
          "seed": i,
          "max_tokens": max_tokens,
          "temperature": temperature,
          "top_p": 0.9,
        }
      )
      ids[rid] = prompt
  done = {r["id"]: r for r in engine.run_until_done()}
  return [(prompt, done[rid]) for rid, prompt in ids.items()]


def print_generations(served: list[tuple[str, dict]], temperature: float) -> None:
  how = "greedy" if temperature == 0 else f"temperature {temperature:g}, top_p 0.9, fixed seeds"
  print(f"\nGenerations ({how}; all tenants in one mixed batch from the store):")
  for prompt, r in served:
    text = repr(r["text"]) if r["error"] is None else f"error: {r['error']}"
    print(f"  [{r['model']}] {prompt!r} -> {text}")


def print_memory(header: dict) -> None:
  from jaxmoe.consolidate.report import human
  from jaxmoe.eval import quality

  m = quality.memory(header)
  k = len(header["tenants"])
  print(
    f"\nMemory: {k} full copies {human(m['full_copies_bytes'])} -> store {human(m['store_bytes'])} "
    f"(saving {100 * (1 - m['memory_fraction']):.1f}%; pool keeps {m['unique_experts']} of "
    f"{m['experts_before']} experts, metric {header['metric']}, owner {header['owner']})"
  )


def quality_rows(recipe, built, store, rows: int) -> list[dict]:
  """Per tenant: held-out perplexity of the original, consolidated, base and best merging baseline."""
  from jaxmoe.eval import quality
  from jaxmoe.io import checkpoint

  cfg, base = checkpoint.load(built.base)
  originals = {t: checkpoint.load(p)[1] for t, p in built.tenants.items()}
  suite = quality.Suite(cfg, originals, quality.heldout(recipe.domains, rows, recipe.seq_len))
  orig, cons = suite.score(originals), suite.score(quality.tenant_models(store))
  base_scores = suite.score_shared(base)
  merges = {label: suite.score_shared(m) for label, m in quality.merged_models(base, originals).items()}
  out = []
  for t in suite.tenants:
    best = min(merges, key=lambda label: merges[label][t].perplexity)
    out.append(
      {
        "tenant": t,
        "original": orig[t].perplexity,
        "consolidated": cons[t].perplexity,
        "kl": cons[t].kl,
        "top1": cons[t].top1,
        "base": base_scores[t].perplexity,
        "best_merge": merges[best][t].perplexity,
        "best_merge_name": best,
      }
    )
  return out


def print_quality(rows: list[dict], distinct: float, eval_rows: int, seq_len: int) -> None:
  print(
    f"\nQuality: held-out perplexity on each tenant's own domain ({eval_rows} rows x {seq_len} bytes; "
    f"consolidated at {100 * distinct:.0f}% of distinct experts)"
  )
  print(
    f"  {'tenant':<11} {'original':>8} {'consol.':>8} {'(delta)':>8} {'KL':>6} {'top-1':>6} "
    f"{'base':>7} {'best merge':>10}  (which)"
  )
  for r in rows:
    delta = 100 * (r["consolidated"] / r["original"] - 1)
    print(
      f"  {r['tenant']:<11} {r['original']:>8.3f} {r['consolidated']:>8.3f} {delta:>+7.1f}% "
      f"{r['kl']:>6.3f} {r['top1']:>6.3f} {r['base']:>7.3f} {r['best_merge']:>10.3f}  "
      f"{r['best_merge_name']}"
    )


def switch_quality(built, store, rows: int) -> dict[str, dict]:
  """Per tenant, its task's held-out scores: original, consolidated, base, best merge by ROUGE-L."""
  from jaxmoe.eval import quality, seq2seq
  from jaxmoe.io import checkpoint

  cfg, base = checkpoint.load(built.base)
  originals = {t: checkpoint.load(p)[1] for t, p in built.tenants.items()}
  suite = seq2seq.TaskSuite(cfg, list(originals), rows)
  out = {"original": suite.score(originals), "consolidated": suite.score(quality.tenant_models(store))}
  out["base"] = suite.score_shared(base)
  merges = {label: suite.score_shared(m) for label, m in quality.merged_models(base, originals).items()}
  best = {t: max(merges, key=lambda label: merges[label][t].rouge_l) for t in suite.tenants}
  out["best merge"] = {t: merges[best[t]][t] for t in suite.tenants}
  out["which"] = best
  return out


def print_switch_quality(q: dict, distinct: float, eval_rows: int) -> None:
  print(
    f"\nQuality: each tenant on {eval_rows} held-out rows of its own task, greedy, ROUGE-L / exact match "
    f"(consolidated at {100 * distinct:.0f}% of distinct experts)"
  )
  columns = ("original", "consolidated", "base", "best merge")
  print(f"  {'tenant':<15} " + " ".join(f"{c:>13}" for c in columns) + "  (which merge)")
  for t in q["original"]:
    cells = " ".join(f"{q[c][t].rouge_l:>6.3f}/{q[c][t].exact_match:<6.3f}" for c in columns)
    print(f"  {t:<15} {cells}  {q['which'][t]}")


def demo(
  family: str,
  recipe_name: str,
  workdir: pathlib.Path,
  distinct: float,
  metric: str,
  owner: str,
  max_tokens: int,
  temperature: float,
  eval_rows: int,
  progress: bool,
) -> None:
  from jaxmoe.io.store import load_store
  from jaxmoe.train import build, recipes

  start = time.perf_counter()
  recipe = recipes.recipe(recipe_name)
  if recipe.family != family:
    raise ValueError(f"recipe {recipe_name!r} trains {recipe.family} tenants, not --family={family}")
  if family == "switch":
    from jaxmoe.eval import seq2seq

    seq2seq.rouge_l("", "")  # fails now, not after training, when rouge-score is missing
  built = build.build(recipe, workdir, progress=progress)
  what = f"trained {', '.join(built.trained)}" if built.trained else "loaded from the cache"
  print(f"Tenants {', '.join(built.tenants)}: fine-tunes of one base ({what}, {built.seconds:.1f} s) in {built.root}")
  store = load_store(store_for(recipe, built, distinct, metric, owner))
  prompts = SWITCH_PROMPTS if family == "switch" else PROMPTS
  print_generations(serve(store, prompts, max_tokens, temperature), temperature)
  print_memory(store.metadata)
  if family == "switch":
    print_switch_quality(switch_quality(built, store, eval_rows), distinct, eval_rows)
  else:
    print_quality(quality_rows(recipe, built, store, eval_rows), distinct, eval_rows, recipe.seq_len)
  print(f"\ndone in {time.perf_counter() - start:.1f} s")


def main(argv) -> int:
  if len(argv) > 1:
    print(f"{PROG}: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 1
  quiet_library_logs()
  if not 0.0 < FLAGS.distinct <= 1.0:
    print(f"{PROG}: error: --distinct={FLAGS.distinct} must be in (0, 1]", file=sys.stderr)
    return 1
  from jaxmoe.train.build import default_workdir

  recipe, max_tokens, temperature, eval_rows = DEFAULTS[FLAGS.family]
  pick = lambda value, default: default if value is None else value
  workdir = pathlib.Path(FLAGS.workdir) if FLAGS.workdir else default_workdir()
  try:
    demo(
      FLAGS.family,
      pick(FLAGS.recipe, recipe),
      workdir,
      FLAGS.distinct,
      FLAGS.metric,
      FLAGS.owner,
      pick(FLAGS.max_tokens, max_tokens),
      pick(FLAGS.temperature, temperature),
      pick(FLAGS.eval_rows, eval_rows),
      FLAGS.progress,
    )
  except (KeyError, ValueError, OSError, ImportError) as e:
    print(f"{PROG}: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
    return 1
  return 0


def run():
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
