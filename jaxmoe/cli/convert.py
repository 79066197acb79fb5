"""`jaxmoe-convert`: a Hugging Face Mixtral or Switch safetensors folder -> a jaxmoe checkpoint.

The architecture comes from config.json's model_type ("mixtral", "switch_transformers").

  jaxmoe-convert --hf_dir=DIR --out=DIR [--dtype=bfloat16|float16|float32]

A bad input prints one `jaxmoe-convert: error: ...` line on stderr and exits
with status 1; nothing is written. SIGINT, SIGTERM and SIGHUP remove the
partial output (exit 130); a temporary left by a SIGKILL is removed by the
next run for the same --out.
"""

from __future__ import annotations

import sys

from absl import app, flags

from jaxmoe.cli.common import interrupted, quiet_library_logs, terminate_like_interrupt
from jaxmoe.errors import JaxmoeError
from jaxmoe.io.convert import DTYPES, convert

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model folder (config.json + safetensors).")
_OUT = flags.DEFINE_string("out", None, "jaxmoe checkpoint folder to create; must not exist.")
_DTYPE = flags.DEFINE_enum(
  "dtype", None, list(DTYPES), "Parameter dtype; default: config.json's dtype if supported, else float32."
)
_PROGRESS = flags.DEFINE_boolean("progress", None, "Progress bar on stderr; default: when stderr is a tty.")
flags.mark_flags_as_required(["hf_dir", "out"])

# Errors a user can fix from the message alone (bad input, a full or read-only
# disk); anything else is a bug and keeps its traceback.
USER_ERRORS = (JaxmoeError, OSError)


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  terminate_like_interrupt()
  try:
    cfg = convert(_HF_DIR.value, _OUT.value, dtype=_DTYPE.value, progress=_PROGRESS.value)
  except USER_ERRORS as e:
    print(f"jaxmoe-convert: error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:
    return interrupted("jaxmoe-convert", e, "nothing was written")
  print(
    f"wrote {_OUT.value}: {cfg.architecture}, {cfg.num_moe_layers} MoE layers, {cfg.num_experts} experts, {cfg.dtype}"
  )
  return 0


def run() -> None:
  """Console-script entry point."""
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
