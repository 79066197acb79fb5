"""jaxmoe-generate: continue a prompt with a converted checkpoint.

jaxmoe-generate --ckpt=DIR --prompt="def f(x):" --max_new_tokens=32
jaxmoe-generate --ckpt=DIR --prompt_ids=1,2,3 --temperature=0.8 --seed=1
"""

from __future__ import annotations

import sys

from absl import app, flags

from jaxmoe.cli.common import define_moe_impl, define_verify_checksums, one_line_warnings, quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("ckpt", None, "jaxmoe checkpoint folder (from jaxmoe-convert).")
flags.DEFINE_string("prompt", None, "Prompt text (needs a tokenizer in the checkpoint).")
flags.DEFINE_string("prompt_ids", None, "Prompt as comma-separated token ids, instead of --prompt.")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate (>= 1).")
flags.DEFINE_float("temperature", 0.0, "0 is greedy; a finite number >= 0.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass, in (0, 1].")
flags.DEFINE_integer("seed", 0, "Sampling seed, in [0, 2^31).")
define_moe_impl()
define_verify_checksums()


def parse_ids(text: str) -> list[int]:
  try:
    ids = [int(x) for x in text.split(",") if x.strip()]
  except ValueError as e:
    raise ValueError(f"--prompt_ids must be comma-separated integers: {e}") from None
  if not ids:
    raise ValueError("--prompt_ids is empty")
  return ids


def main(argv) -> int:
  del argv
  quiet_library_logs()
  one_line_warnings("jaxmoe-generate")
  import numpy as np

  import jaxmoe
  from jaxmoe.generation import check_sampling
  from jaxmoe.nn.moe import Impl

  if (FLAGS.prompt is None) == (FLAGS.prompt_ids is None):
    raise app.UsageError("give exactly one of --prompt and --prompt_ids")
  try:
    # The sampling flags first: a bad one is reported before the checkpoint is read.
    check_sampling(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_p, FLAGS.seed)
    model = jaxmoe.load(FLAGS.ckpt, impl=Impl(FLAGS.moe_impl), verify_checksums=FLAGS.verify_checksums)
    ids = parse_ids(FLAGS.prompt_ids) if FLAGS.prompt_ids is not None else model.encode(FLAGS.prompt)
    out = model.generate(
      np.asarray([ids]), FLAGS.max_new_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p, seed=FLAGS.seed
    )
  except (ValueError, OSError) as e:
    print(f"jaxmoe-generate: error: {e}", file=sys.stderr)
    return 1
  new = model.new_tokens(out[0], len(ids))
  print("ids:", ",".join(str(int(i)) for i in out[0]))
  if model.tokenizer is not None:
    print("text:", model.decode(out[0]))
    print("new:", model.decode(new))
  return 0


def run():
  flags.mark_flag_as_required("ckpt")
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
