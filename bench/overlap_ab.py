"""The serving engine with overlapped decode steps against one step at a time, in one process.

  python bench/overlap_ab.py [--rounds=3]

The workload of bench/decode.py's engine figure (its D=256, L=4 model, K=4
mixed tenants, batch 8, 32 requests of 32 tokens after 16-token prompts);
rounds alternate the two settings after one warm-up each, and the medians are
printed with every round's tokens/s and the decode steps each ran.
"""

from __future__ import annotations

import statistics

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 3, "Timed rounds per setting.")


def main(argv):
  del argv
  from decode import bench_config, engine_requests, engine_run  # bench/decode.py, beside this script

  from jaxmoe.serving.synthetic import synthetic_store

  store = synthetic_store(bench_config(), 4, seed=0, own_fraction=0.25)
  reqs = engine_requests(store)
  for overlap in (True, False):
    engine_run(store, reqs, 256, overlap)
  runs = {True: [], False: []}
  for _ in range(FLAGS.rounds):
    for overlap in (True, False):
      runs[overlap].append(engine_run(store, reqs, 256, overlap))
  for overlap, rs in runs.items():
    rates = [round(r) for r, _ in rs]
    print(f"overlap={overlap}: median {statistics.median(rates)} tok/s, rounds {rates}, decode steps {rs[0][1]}")


if __name__ == "__main__":
  app.run(main)
