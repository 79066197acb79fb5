"""jaxmoe-train: pretrain a small Mixtral on the stdlib corpora, then fine-tune one tenant per domain.

  jaxmoe-train --recipe=demo                 # 2-4 min on 2 CPU cores; cached afterwards
  jaxmoe-train --recipe=demo --workdir=runs  # checkpoints under runs/<recipe key>/

Writes jaxmoe checkpoints (the format jaxmoe-convert writes): base/ and
tenants/<domain>/, then prints each tenant's held-out perplexity on its own
domain next to the base's. Checkpoints that exist for the same recipe are
reused; pass them to jaxmoe-consolidate as --tenant=<domain>=<folder>.
"""

from __future__ import annotations

import pathlib
import sys

from absl import app, flags

from jaxmoe.cli.common import quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("recipe", "demo", "Training recipe (jaxmoe.train.recipes.RECIPES): demo or test.")
flags.DEFINE_string("workdir", None, "Cache folder (default: $XDG_CACHE_HOME/jaxmoe/demo, else ~/.cache/jaxmoe/demo).")
flags.DEFINE_integer("eval_rows", 32, "Held-out rows per domain for the summary table.")
flags.DEFINE_bool("progress", True, "Progress bars on stderr.")

PROG = "jaxmoe-train"


def summary(recipe, built, rows: int) -> str:
  """Each tenant's perplexity on its own held-out domain: the fine-tune against the base."""
  from jaxmoe.eval import evaluate, quality
  from jaxmoe.io import checkpoint

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
