"""jaxmoe-train: pretrain a small MoE on the stdlib corpora, then fine-tune one tenant per domain or task.

  jaxmoe-train --recipe=demo                 # Mixtral: 2-4 min on 2 CPU cores; cached afterwards
  jaxmoe-train --recipe=demo --workdir=runs  # checkpoints under runs/<recipe key>/
  jaxmoe-train --recipe=switch-demo          # Switch: span-corruption base, one tenant per text-to-text task

Writes jaxmoe checkpoints (the format jaxmoe-convert writes): base/ and
tenants/<tenant>/, then prints each tenant's held-out score next to the
base's: perplexity on its own domain (Mixtral), or ROUGE-L and exact match on
its own task (Switch). Checkpoints that exist for the same recipe are reused;
pass them to jaxmoe-consolidate as --tenant=<tenant>=<folder>.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

from jaxmoe.cli.common import quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "recipe", "demo", "Training recipe (jaxmoe.train.recipes.RECIPES): demo, test, switch-demo or switch-test."
)
flags.DEFINE_string("workdir", None, "Cache folder (default: $XDG_CACHE_HOME/jaxmoe/demo, else ~/.cache/jaxmoe/demo).")
flags.DEFINE_integer("eval_rows", 32, "Held-out rows per domain or task for the summary table.")
flags.DEFINE_bool("progress", True, "Progress bars on stderr.")

PROG = "jaxmoe-train"


def switch_summary(built, rows: int) -> str:
  """Each Switch tenant's ROUGE-L and exact match on its own held-out task: the fine-tune against the base."""
  from jaxmoe.eval import seq2seq
  from jaxmoe.io import checkpoint

  cfg, base = checkpoint.load(built.base)
  suite = seq2seq.TaskSuite(cfg, list(built.tenants), rows)
  ref = suite.score_shared(base)
  lines = [f"{'tenant':<15} {'ROUGE-L':>8} {'base':>6} {'exact':>6} {'base':>6} {'ppl':>7} {'base':>7}"]
  for name, path in built.tenants.items():
    own = suite.score({name: checkpoint.load(path)[1]})[name]
    b = ref[name]
    lines.append(
      f"{name:<15} {own.rouge_l:>8.3f} {b.rouge_l:>6.3f} {own.exact_match:>6.3f} {b.exact_match:>6.3f} "
      f"{own.perplexity:>7.3f} {b.perplexity:>7.3f}"
    )
  return "\n".join(lines)


def summary(recipe, built, rows: int) -> str:
  """Each tenant's held-out score on its own domain (Mixtral: perplexity) or task, against the base's."""
  from jaxmoe.eval import evaluate, quality
  from jaxmoe.io import checkpoint

  if recipe.family == "switch":
    return switch_summary(built, rows)
  cfg, base = checkpoint.load(built.base)
  heldout = quality.heldout(recipe.domains, rows, recipe.seq_len)
  lines = [f"{'tenant':<12} {'own-domain ppl':>14} {'base ppl':>9} {'gain':>7}"]
  for name, path in built.tenants.items():
    own = evaluate.evaluate(checkpoint.load(path)[1], heldout[name], cfg).perplexity
    ref = evaluate.evaluate(base, heldout[name], cfg).perplexity
    lines.append(f"{name:<12} {own:>14.3f} {ref:>9.3f} {100 * (1 - own / ref):>6.1f}%")
  return "\n".join(lines)


def main(argv) -> int:
  if len(argv) > 1:
    print(f"{PROG}: error: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 1
  quiet_library_logs()
  from jaxmoe.train import build, recipes

  try:
    recipe = recipes.recipe(FLAGS.recipe)
  except KeyError as e:
    print(f"{PROG}: error: {e.args[0]}", file=sys.stderr)
    return 1
  workdir = pathlib.Path(FLAGS.workdir) if FLAGS.workdir else build.default_workdir()
  built = build.build(recipe, workdir, progress=FLAGS.progress)
  what = f"trained {', '.join(built.trained)}" if built.trained else "all from the cache"
  print(f"{built.root}: base + {len(built.tenants)} tenants ({what}, {built.seconds:.1f} s)")
  print(summary(recipe, built, FLAGS.eval_rows))
  return 0


def run():
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
