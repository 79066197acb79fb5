"""The serving engine with overlapped decode steps against one step at a time, in one process.

  python bench/overlap_ab.py [--rounds=3]

The workload of bench/decode.py's engine figure (its D=256, L=4 model, K=4
mixed tenants, batch 8, 32 requests of 32 tokens after 16-token prompts);
rounds alternate the two settings after one warm-up each, and the medians are
printed with every round's tokens/s and the decode steps each ran.
"""

from __future__ import annotations

import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 3, "Timed rounds per setting.")


def main(argv):
  del argv
  import numpy as np
  from decode import bench_config  # bench/decode.py, beside this script

  from jaxmoe.serving import Engine, EngineConfig, Mode
  from jaxmoe.serving.synthetic import synthetic_store

  store = synthetic_store(bench_config(), 4, seed=0, own_fraction=0.25)
  rng = np.random.default_rng(3)
  reqs = [
    {"id": f"r{i}", "model": store.tenants[i % 4], "max_tokens": 32, "prompt_ids": rng.integers(0, 512, 16).tolist()}
    for i in range(32)
  ]

  def serve(overlap: bool) -> tuple[float, int]:
    engine = Engine(store, EngineConfig(mode=Mode.MIXED, max_batch=8, max_seq_len=256, overlap=overlap))
    for r in reqs:
      engine.submit(dict(r))
    start = time.perf_counter()
    out = engine.run_until_done()
    return sum(len(o["token_ids"]) for o in out) / (time.perf_counter() - start), engine.decode_steps

  for overlap in (True, False):
    serve(overlap)
  runs = {True: [], False: []}
  for _ in range(FLAGS.rounds):
    for overlap in (True, False):
      runs[overlap].append(serve(overlap))
  for overlap, rs in runs.items():
    rates = [round(r) for r, _ in rs]
    print(f"overlap={overlap}: median {statistics.median(rates)} tok/s, rounds {rates}, decode steps {rs[0][1]}")


if __name__ == "__main__":
  app.run(main)
