"""jaxmoe-quickstart: build a tiny Mixtral, convert it, generate from it.

The README's first command. It exercises the whole single-model path on any
machine in seconds: random weights in Hugging Face's safetensors layout ->
`jaxmoe-convert` -> `jaxmoe.load` -> greedy generation, plus a check that
KV-cache decoding agrees with a full forward pass.
"""

from __future__ import annotations

import pathlib
import shutil
import tempfile
import time

from absl import app, flags

from jaxmoe.cli.common import quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where to keep the checkpoints (default: a temporary folder).")
flags.DEFINE_string("prompt", "Hello, MoE!", "Prompt text (byte tokenizer).")
flags.DEFINE_integer("max_new_tokens", 24, "Tokens to generate.")
flags.DEFINE_integer("seed", 0, "Seed of the random weights.")


def quickstart(workdir: pathlib.Path, prompt: str, max_new_tokens: int, seed: int) -> None:
  import numpy as np

  import jaxmoe
  from jaxmoe.families.mixtral import config, layout
  from jaxmoe.families.mixtral.export import write_hf
  from jaxmoe.io.convert import convert

  cfg = config.preset("tiny")
  t0 = time.perf_counter()
  hf_dir = write_hf(cfg, layout.init_params(cfg, seed=seed, scale=0.2), workdir / "hf_tiny_mixtral")
  print(f"1. wrote a random tiny Mixtral in HF safetensors layout: {hf_dir}")
  ckpt = workdir / "jaxmoe_tiny_mixtral"
  shutil.rmtree(ckpt, ignore_errors=True)
  convert(hf_dir, ckpt, progress=False)
  print(f"2. converted to a jaxmoe orbax checkpoint: {ckpt}")
  model = jaxmoe.load(ckpt)
  ids = model.encode(prompt)
  out = model.generate(np.asarray([ids]), max_new_tokens, stop_at_eos=False)
  print(f"3. generated {max_new_tokens} tokens (greedy) from {prompt!r}:")
  print("   ids:", out[0, len(ids) :].tolist())
  print("   text:", repr(model.decode(out[0, len(ids) :])))
  full = model.logits(out[:, :-1]).argmax(-1)[0, len(ids) - 1 :]
  agree = bool((full == out[0, len(ids) :]).all())
  print(f"4. KV-cache decoding agrees with a full forward pass: {agree}")
  print(f"done in {time.perf_counter() - t0:.1f} s")
  if not agree:
    raise SystemExit("KV-cache decoding disagrees with the full forward pass")


def main(argv) -> None:
  del argv
  quiet_library_logs()
  if FLAGS.workdir:
    quickstart(pathlib.Path(FLAGS.workdir), FLAGS.prompt, FLAGS.max_new_tokens, FLAGS.seed)
    return
  with tempfile.TemporaryDirectory(prefix="jaxmoe-quickstart-") as tmp:
    quickstart(pathlib.Path(tmp), FLAGS.prompt, FLAGS.max_new_tokens, FLAGS.seed)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
