"""jaxmoe-serve: answer a file of JSON-line requests from a consolidated store.

  jaxmoe-serve --store=STORE --requests=in.jsonl --out=out.jsonl --mode=mixed --max_batch=8

Every input line gets exactly one output line (jaxmoe/serving/batch.py): a bad
line, a duplicate id included, gets an error response; the others are served.
Responses are written in completion order, the lines refused before serving
first: match them by `id`, unique in a batch, or by `line`, the 1-based input
line number every response carries. Everything is checked (requests file, store, flags)
before anything is written, and responses go to a temporary file renamed
onto --out at the end, so a fatal error or a signal leaves --out as it was.
Exit code 0, or 2 when something fatal happens: an unreadable store or
requests file, bad flags, an unwritable output.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys

from absl import app, flags

from jaxmoe.cli import mesh_flags
from jaxmoe.cli.common import (
  define_engine_flags,
  engine_config,
  interrupted,
  load_store,
  one_line_warnings,
  quiet_library_logs,
  terminate_like_interrupt,
)

PROG = "jaxmoe-serve"
FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "Store folder from jaxmoe-consolidate.")
flags.DEFINE_string("requests", None, "Input: one JSON request per line.")
flags.DEFINE_string("out", None, "Output: one JSON response per input line (replaced at the end; not --requests).")
define_engine_flags()
flags.DEFINE_bool("progress", True, "Progress bar on stderr.")


class Fatal(Exception):
  """Ends the run with exit status 2 and a one-line message."""


def format_summary(s: dict) -> str:
  def ms(x):
    return "-" if x is None else f"{1e3 * x:.1f} ms"

  cache = []
  if "expert_cache_slots" in s:
    cache = [
      f"expert cache {s['expert_cache_slots']} of {s['expert_pool_slots']} experts: {s['expert_cache_hits']} hits, "
      f"{s['expert_cache_misses']} misses, {s['expert_cache_prefetched']} prefetched, "
      f"{(s['expert_cache_bytes'] + s['expert_cache_prefetch_bytes']) / 2**20:.1f} MiB copied in "
      f"{s['expert_cache_s']:.3f} s"
    ]
  if "pool_slots_read" in s:
    cache.append(pool_reads_line(s))
  return "\n".join(
    [
      f"mode {s['mode']}: {s['requests']} requests ({s['completed']} served, {s['errors']} errors), "
      f"{s['completion_tokens']} tokens in {s['wall_s']:.2f} s = {s['tokens_per_s']:.1f} tokens/s",
      f"TTFT p50 {ms(s['ttft_p50_s'])}, p99 {ms(s['ttft_p99_s'])}; "
      f"turnaround p50 {ms(s['turnaround_p50_s'])}, p99 {ms(s['turnaround_p99_s'])}",
      f"switches {s['switches']} ({s['switch_bytes'] / 2**20:.1f} MiB, {s['switch_s']:.3f} s); "
      f"compiled programs {s['compilations']}; weights on device {s['device_weight_bytes'] / 2**20:.1f} MiB",
      *cache,
    ]
  )


def pool_reads_line(s: dict) -> str:
  held = f" (its devices hold {s['pool_slots_held']})" if "pool_slots_held" in s else ""
  return f"read {s['pool_slots_read']} of {s['pool_slots']} pool slots from the store{held}"


def writer(out):
  def write(response: dict) -> None:
    try:
      out.write(json.dumps(response) + "\n")  # ASCII: a lone surrogate in an id stays escaped
      out.flush()
    except OSError as e:
      raise Fatal(f"cannot write --out: {e}") from None

  return write


def serve(lines: list[bytes], engine, out, progress: bool) -> dict:
  from tqdm import tqdm

  from jaxmoe.serving.batch import serve_lines

  with tqdm(total=len(lines), unit="req", file=sys.stderr, disable=not progress) as bar:
    return serve_lines(lines, engine, writer(out), bar.update)


@contextlib.contextmanager
def open_out(out: pathlib.Path, direct: bool):
  from jaxmoe.io import files

  try:
    ctx = open(out, "w", encoding="utf-8") if direct else files.atomic_file(out)
    with ctx as f:
      yield f
  except OSError as e:  # opening, or the final flush and rename
    raise Fatal(f"cannot write --out: {e}") from None


def build_engine(store):
  from jaxmoe.serving import Engine

  try:
    return Engine(store, engine_config(store))
  except ValueError as e:
    raise Fatal(str(e)) from None


def run_serve() -> dict:
  from jaxmoe.io import files
  from jaxmoe.serving import requests as req_lib

  requests, out = pathlib.Path(FLAGS.requests), pathlib.Path(FLAGS.out)
  try:
    lines = req_lib.request_lines(requests.read_bytes())
  except OSError as e:
    raise Fatal(f"cannot read --requests: {e}") from None
  try:
    direct = files.output_file(out, requests)
  except ValueError as e:
    raise Fatal(f"cannot write --out: {e}") from None
  try:
    store = load_store(FLAGS.store)
  except (OSError, ValueError) as e:
    raise Fatal(f"cannot read --store: {e}") from None
  from jaxmoe.serving import distributed

  engine = distributed.lead(build_engine(store))  # several hosts: the other processes run its steps
  try:
    with open_out(out, direct) as f:
      return serve(lines, engine, f, FLAGS.progress)
  finally:
    distributed.stop(engine)


def follow() -> int:
  """A process other than 0 of a multi-host run: the same engine over its devices, running process 0's steps."""
  from jaxmoe.serving import distributed

  store = load_store(FLAGS.store)
  engine = build_engine(store)
  distributed.follow(engine)
  summary = engine.summary()
  if "pool_slots_read" in summary:
    import jax

    print(f"process {jax.process_index()}: {pool_reads_line(summary)}", flush=True)
  return 0


def main(argv) -> int:
  if len(argv) > 1:
    print(f"{PROG}: fatal: unexpected arguments {argv[1:]}", file=sys.stderr)
    return 2
  quiet_library_logs()
  one_line_warnings(PROG)
  terminate_like_interrupt()
  from jaxmoe.serving import distributed

  try:
    if mesh_flags.start_distributed() and not distributed.is_leader():  # before anything touches a device
      return follow()
    summary = run_serve()
  except Fatal as e:
    print(f"{PROG}: fatal: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    return interrupted(PROG, e, "--out left as it was")
  print(format_summary(summary))
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
