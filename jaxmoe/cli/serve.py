"""jaxmoe-serve: answer a file of JSON-line requests from a consolidated store.

  jaxmoe-serve --store=STORE --requests=in.jsonl --out=out.jsonl --mode=mixed --max_batch=8

Every input line gets exactly one output line with its id (a bad line gets an
error response; the others are served). Exit code 0 unless something fatal
happens: an unreadable store or requests file, an unwritable output (2).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from jaxmoe.cli.common import define_engine_flags, engine_config, load_store, quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "Store folder from jaxmoe-consolidate.")
flags.DEFINE_string("requests", None, "Input: one JSON request per line.")
flags.DEFINE_string("out", None, "Output: one JSON response per input line.")
define_engine_flags()
flags.DEFINE_bool("progress", True, "Progress bar on stderr.")


def fatal(message: str) -> int:
  print(f"jaxmoe-serve: fatal: {message}", file=sys.stderr)
  return 2


def format_summary(s: dict) -> str:
  def ms(x):
    return "-" if x is None else f"{1e3 * x:.1f} ms"

  cache = []
  if "expert_cache_slots" in s:
    cache = [
      f"expert cache {s['expert_cache_slots']} of {s['expert_pool_slots']} experts: {s['expert_cache_hits']} hits, "
      f"{s['expert_cache_misses']} misses, {s['expert_cache_prefetched']} prefetched, "
      f"{s['expert_cache_bytes'] / 2**20:.1f} MiB copied in {s['expert_cache_s']:.3f} s"
    ]
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
  from jaxmoe.serving import Engine

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
      store = load_store(FLAGS.store)
    except (OSError, ValueError) as e:
      return fatal(f"cannot read --store: {e}")
    config = engine_config()
    try:
      engine = Engine(store, config)
    except ValueError as e:
      return fatal(str(e))
    summary = serve(lines, engine, out, FLAGS.progress)
  print(format_summary(summary))
  return 0


def run():
  flags.mark_flags_as_required(["store", "requests", "out"])
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
