"""Serving throughput on the CPU: one model alone vs K tenants in each mode.

  python bench/serve_throughput.py [--k=4] [--max_batch=8] [--requests=64] [--repeats=3]

Builds a small synthetic store (bench config below, K tenants derived from one
base), runs the same interleaved workload (fixed prompt length, fixed output
length, EOS ignored by using an EOS id the model never sees) through
`jaxmoe.serving.Engine` for: one tenant alone (a one-tenant store, the
reference), and K tenants in swap, resident and mixed modes, at the same
max_batch. Every system runs once to compile, then `repeats` timed rounds
that run the systems in turn; the median tokens/s and its ratio to the single
model are printed and written as JSON to --out.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("k", 4, "Tenants.")
flags.DEFINE_integer("max_batch", 8, "Batch size, the same for every system.")
flags.DEFINE_integer("requests", 64, "Requests per timed run.")
flags.DEFINE_integer("prompt_len", 16, "Prompt tokens per request.")
flags.DEFINE_integer("max_tokens", 32, "Output tokens per request.")
flags.DEFINE_integer("repeats", 3, "Timed runs per system (median reported).")
flags.DEFINE_string("out", None, "Write the results as JSON here.")


def bench_config():
  from jaxmoe.families.mixtral.config import MixtralConfig

  # eos_token_id outside the vocabulary: every request runs to max_tokens.
  return MixtralConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    num_experts=8,
    top_k=2,
    head_dim=16,
    rope_theta=10000.0,
    max_position_embeddings=1024,
    bos_token_id=1,
    eos_token_id=-1,
  )


def workload(tenants, n, prompt_len, max_tokens, seed=0):
  import numpy as np

  rng = np.random.default_rng(seed)
  return [
    {
      "id": f"r{i}",
      "model": tenants[i % len(tenants)],
      "max_tokens": max_tokens,
      "prompt_ids": rng.integers(0, 512, prompt_len).tolist(),
    }
    for i in range(n)
  ]


def timed_run(store, mode, reqs):
  from jaxmoe.serving import Engine, EngineConfig

  engine = Engine(
    store, EngineConfig(mode=mode, max_batch=FLAGS.max_batch, max_seq_len=FLAGS.prompt_len + FLAGS.max_tokens)
  )
  for r in reqs:
    engine.submit(r)
  start = time.perf_counter()
  out = engine.run_until_done()
  wall = time.perf_counter() - start
  assert all(o["error"] is None for o in out), [o["error"] for o in out if o["error"]][:3]
  return sum(len(o["token_ids"]) for o in out) / wall, engine.summary()


def main(argv):
  del argv
  import jax

  from jaxmoe.serving import Mode
  from jaxmoe.serving.synthetic import MemoryStore, synthetic_store

  cfg = bench_config()
  store = synthetic_store(cfg, FLAGS.k)
  t0 = store.tenants[0]
  single = MemoryStore(cfg, [t0], store.pool, {t0: store.backbones[t0]}, {t0: store.slot_maps[t0]})
  systems = [("single", single, Mode.RESIDENT)] + [(m.value, store, m) for m in Mode]
  reqs = {name: workload(st.tenants, FLAGS.requests, FLAGS.prompt_len, FLAGS.max_tokens) for name, st, _ in systems}
  for name, st, mode in systems:
    timed_run(st, mode, reqs[name])  # compiles every bucket the timed runs use
  # Round-robin over the systems, so load drift on a shared machine hits them alike.
  runs = {name: [] for name, _, _ in systems}
  for _ in range(FLAGS.repeats):
    for name, st, mode in systems:
      runs[name].append(timed_run(st, mode, reqs[name]))
  results = {}
  for name, _, _ in systems:
    rates = [r[0] for r in runs[name]]
    results[name] = {
      "tokens_per_s_median": statistics.median(rates),
      "tokens_per_s_runs": rates,
      "switches": runs[name][-1][1]["switches"],
      "switch_s": runs[name][-1][1]["switch_s"],
    }
    print(f"{name:9s} {statistics.median(rates):9.1f} tokens/s  runs {[round(r, 1) for r in rates]}", flush=True)
  ref = results["single"]["tokens_per_s_median"]
  print(f"\nratios to one model alone (K={FLAGS.k}, max_batch={FLAGS.max_batch}, medians of one run):")
  for name, r in results.items():
    r["ratio_to_single"] = r["tokens_per_s_median"] / ref
    print(f"  {name:9s} {r['ratio_to_single']:.3f}")
  report = {
    "bench": "serve_throughput",
    "date": time.strftime("%Y-%m-%d"),
    "platform": platform.platform(),
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "config": str(cfg),
    "flags": {k: FLAGS[k].value for k in ("k", "max_batch", "requests", "prompt_len", "max_tokens", "repeats")},
    "results": results,
  }
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
  app.run(main)
