"""jaxmoe-demo: real fine-tuned tenants, consolidated and served together, with the quality kept.

  jaxmoe-demo                      # first run trains (2-4 min on 2 CPU cores); later runs ~10 s
  jaxmoe-demo --workdir=DIR --distinct=0.5 --metric=l2 --owner=average

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
"""

from __future__ import annotations

import pathlib
import sys
import time

from absl import app, flags

from jaxmoe.cli.common import quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "demo", "Training recipe of the tenants: demo, or test (tiny, for CI).")
flags.DEFINE_string("workdir", None, "Cache folder (default: $XDG_CACHE_HOME/jaxmoe/demo, else ~/.cache/jaxmoe/demo).")
flags.DEFINE_float("distinct", 0.5, "Experts kept, as a fraction of the K x L x E of K full copies.")
flags.DEFINE_enum("metric", "l2", ["l2", "cosine", "output"], "Expert distance of the consolidation.")
flags.DEFINE_enum(
  "owner",
  "average",
  ["round_robin", "base", "medoid", "average"],
  "Whose weights a shared expert keeps (see jaxmoe-consolidate --owner).",
)
flags.DEFINE_integer("max_tokens", 40, "Tokens generated per prompt.")
flags.DEFINE_float("temperature", 0.7, "Sampling temperature (top_p 0.9, fixed seeds); 0: greedy.")
flags.DEFINE_integer("eval_rows", 8, "Held-out rows per domain for the quality rows (bench/quality.py: 64).")
flags.DEFINE_bool("progress", True, "Training progress bars on stderr (first run only).")

PROG = "jaxmoe-demo"

# Two prompts per tenant, each the start of a line of its domain.
PROMPTS = {
  "code": ("def __init__(self", "    for i in range("),
  "prose": ("The ", "An object is"),
  "arithmetic": ("12+34=", "250-75="),
  "records": ('{"code": 66, "char": "B", ', "2024-03-14,"),
}


def store_for(recipe, built, distinct: float, metric: str, owner: str) -> pathlib.Path:
  """The cached store of this consolidation, made on first use."""
  from jaxmoe.consolidate import Metric, Owner
  from jaxmoe.eval import quality
  from jaxmoe.train import corpus

  out = built.root / "stores" / f"{metric}-{owner}-{round(100 * distinct)}"
  if not (out / "store.json").is_file():
    calibration = corpus.calibration_text(recipe.domains, recipe.seq_len) if metric == "output" else None
    quality.consolidate_at(built.tenants, out, recipe.model, distinct, Metric(metric), Owner(owner), calibration)
  return out


def serve(store, max_tokens: int, temperature: float) -> list[tuple[str, dict]]:
  """Every tenant's prompts in one mixed batch: [(prompt, response)] in submission order."""
  from jaxmoe.serving import Engine, EngineConfig, Mode

  seq_len = min(store.config.max_position_embeddings, 64 + max_tokens)  # prompts are short
  engine = Engine(store, EngineConfig(mode=Mode.MIXED, max_batch=8, max_seq_len=seq_len))
  prompts = {}
  for tenant in store.tenants:
    for i, prompt in enumerate(PROMPTS[tenant]):
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
      prompts[rid] = prompt
  done = {r["id"]: r for r in engine.run_until_done()}
  return [(prompt, done[rid]) for rid, prompt in prompts.items()]


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


def demo(
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
  built = build.build(recipe, workdir, progress=progress)
  what = f"trained {', '.join(built.trained)}" if built.trained else "loaded from the cache"
  print(f"Tenants {', '.join(built.tenants)}: fine-tunes of one base ({what}, {built.seconds:.1f} s) in {built.root}")
  store = load_store(store_for(recipe, built, distinct, metric, owner))
  print_generations(serve(store, max_tokens, temperature), temperature)
  print_memory(store.metadata)
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

  workdir = pathlib.Path(FLAGS.workdir) if FLAGS.workdir else default_workdir()
  try:
    demo(
      FLAGS.recipe,
      workdir,
      FLAGS.distinct,
      FLAGS.metric,
      FLAGS.owner,
      FLAGS.max_tokens,
      FLAGS.temperature,
      FLAGS.eval_rows,
      FLAGS.progress,
    )
  except (KeyError, ValueError, OSError) as e:
    print(f"{PROG}: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
    return 1
  return 0


def run():
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
