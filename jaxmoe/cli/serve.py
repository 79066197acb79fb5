"""jaxmoe-serve: answer a file of JSON-line requests from a consolidated store.

  jaxmoe-serve --store=STORE --requests=in.jsonl --out=out.jsonl --mode=mixed --max_batch=8

Every input line gets exactly one output line with its id (a bad line gets an
error response; the others are served). Exit code 0 unless something fatal
happens: an unreadable store or requests file, an unwritable output (2).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from jaxmoe.cli import mesh_flags
from jaxmoe.cli.common import define_moe_impl, quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "Store folder from jaxmoe-consolidate.")
flags.DEFINE_string("requests", None, "Input: one JSON request per line.")
flags.DEFINE_string("out", None, "Output: one JSON response per input line.")
flags.DEFINE_enum(
  "mode",
  "mixed",
  ["swap", "resident", "mixed"],
  "swap: one backbone on the device, copied in on a tenant switch; resident: all backbones "
  "on the device; mixed: batches mix tenants.",
)
flags.DEFINE_integer("max_batch", 8, "Sequences decoded together.")
flags.DEFINE_integer("max_seq_len", 512, "Longest prompt + max_tokens.")
flags.DEFINE_float("max_wait_s", 1.0, "swap/resident: how long a tenant may wait before the batch switches to it.")
define_moe_impl()
flags.DEFINE_bool("progress", True, "Progress bar on stderr.")


def fatal(message: str) -> int:
  print(f"jaxmoe-serve: fatal: {message}", file=sys.stderr)
  return 2


def format_summary(s: dict) -> str:
  def ms(x):
    return "-" if x is None else f"{1e3 * x:.1f} ms"

  return "\n".join(
    [
      f"mode {s['mode']}: {s['requests']} requests ({s['completed']} served, {s['errors']} errors), "
      f"{s['completion_tokens']} tokens in {s['wall_s']:.2f} s = {s['tokens_per_s']:.1f} tokens/s",
      f"TTFT p50 {ms(s['ttft_p50_s'])}, p99 {ms(s['ttft_p99_s'])}; "
      f"turnaround p50 {ms(s['turnaround_p50_s'])}, p99 {ms(s['turnaround_p99_s'])}",
      f"switches {s['switches']} ({s['switch_bytes'] / 2**20:.1f} MiB, {s['switch_s']:.3f} s); "
      f"compiled programs {s['compilations']}; weights on device {s['device_weight_bytes'] / 2**20:.1f} MiB",
    ]
  )


def serve(lines: list[bytes], engine, out, progress: bool) -> dict:
  from tqdm import tqdm

  from jaxmoe.serving import requests as req_lib

  bar = tqdm(total=len(lines), unit="req", file=sys.stderr, disable=not progress)
  for n, line in enumerate(lines, start=1):
    if not line.strip():
      engine.reject(f"line-{n}", f"line {n} is empty")
      continue
    try:
      engine.submit(req_lib.parse_line(line, n))
    except req_lib.RequestError as e:
      engine.reject(req_lib.line_id(line, n), str(e))
  while engine.has_work:
    for response in engine.step():
      out.write(json.dumps(response) + "\n")
      out.flush()
      bar.update(1)
  bar.close()
  return engine.summary()


def main(argv) -> int:
  del argv
  quiet_library_logs()
  several_hosts = mesh_flags.start_distributed()  # before anything touches a device
  import jaxmoe
  from jaxmoe.nn.moe import Impl
  from jaxmoe.serving import Engine, EngineConfig, Mode, distributed

  if several_hosts and not distributed.is_leader():
    return follow()
  try:
    with open(FLAGS.requests, "rb") as f:
      lines = f.read().splitlines()
  except OSError as e:
    return fatal(f"cannot read --requests: {e}")
  try:
    out = open(FLAGS.out, "w", encoding="utf-8")
  except OSError as e:
    return fatal(f"cannot write --out: {e}")
  with out:
    try:
      store = jaxmoe.load_store(FLAGS.store)
    except (OSError, ValueError) as e:
      return fatal(f"cannot read --store: {e}")
    config = EngineConfig(
      mode=Mode(FLAGS.mode),
      max_batch=FLAGS.max_batch,
      max_seq_len=FLAGS.max_seq_len,
      max_wait_s=FLAGS.max_wait_s,
      impl=Impl(FLAGS.moe_impl),
      **mesh_flags.engine_fields(),
    )
    try:
      engine = distributed.lead(Engine(store, config))
    except ValueError as e:
      return fatal(str(e))
    try:
      summary = serve(lines, engine, out, FLAGS.progress)
    finally:
      distributed.stop(engine)
  print(format_summary(summary))
  return 0


def follow() -> int:
  """A process other than 0: the same engine over its devices, running process 0's steps."""
  import jaxmoe
  from jaxmoe.nn.moe import Impl
  from jaxmoe.serving import Engine, EngineConfig, Mode, distributed

  config = EngineConfig(
    mode=Mode(FLAGS.mode),
    max_batch=FLAGS.max_batch,
    max_seq_len=FLAGS.max_seq_len,
    max_wait_s=FLAGS.max_wait_s,
    impl=Impl(FLAGS.moe_impl),
    **mesh_flags.engine_fields(),
  )
  distributed.follow(Engine(jaxmoe.load_store(FLAGS.store), config))
  return 0


def _follower_flags() -> bool:
  pid = FLAGS.process_id if FLAGS.process_id is not None else int(os.environ.get("JAXMOE_PROCESS_ID", "0") or 0)
  return pid > 0


def run():
  flags.mark_flags_as_required(["store"])
  for name in ("requests", "out"):  # process 0's files; the other processes of a multi-host run read none
    flags.register_validator(name, lambda v: v is not None or _follower_flags(), f"--{name} is required")
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
