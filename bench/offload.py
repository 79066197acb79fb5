"""Expert offloading: serving speed against the device's expert budget, one tenant and K = 4 mixed.

  python bench/offload.py [--out_dir=bench/results/offload] [--quick]

One random Mixtral-architecture base (vocab 512, D=256, F=512, L=4, 8 experts
top-2, float32; an expert is 1.57 MB) and K = 4 fine-tunes that each own half
of their experts (synthetic_store): an 80-slot pool. Each budget is a share of
the pool held in the device expert cache (100%: the whole pool, the scanned
model, no cache); the rest stays in host memory. Two workloads:

  single   one tenant (resident mode): 8 requests, 16-token prompts, 32 greedy tokens
  mixed    K = 4 tenants in mixed batches: 16 requests, the same shapes

per budget: tokens/s (median of repeats, after a warm-up that compiles), the
ratio to 100% in the same run, hits, misses, prefetched slots, bytes and host
seconds of copies per run, and the overhead per layer of running one layer at
a time: (step time at the largest budget below 100% - step time at 100%) /
layers, from runs whose misses are near zero. A budget below one layer's worst
case is refused by the engine; the table says so with the minimum.

On a CPU "device" and "host" are the same memory, so a copy is a memcpy: the
figures show the policy (hit rates, bytes) and the stepped path's dispatch
overhead, not PCIe time. The GPU profile of this benchmark needs a lent GPU.
"""

from __future__ import annotations

import json
import pathlib
import platform
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "bench/results/offload", "Folder for offload.json, offload.md and offload.png.")
flags.DEFINE_bool("quick", False, "Fewer repeats (a smoke run).")
flags.DEFINE_integer("repeats", 3, "Timed runs per budget (median reported).")
flags.DEFINE_bool("report_only", False, "Re-render offload.md and offload.png from offload.json (no runs).")

SHARES = (1.0, 0.9, 0.75, 0.5, 0.25)
PROMPT, TOKENS, BATCH = 16, 32, 8


def workload(store, tenants: list[str], n: int, seed: int) -> list[dict]:
  import numpy as np

  rng = np.random.default_rng(seed)
  return [
    {"id": f"r{i}", "model": tenants[i % len(tenants)], "prompt_ids": rng.integers(1, 500, PROMPT).tolist(),
     "max_tokens": TOKENS}
    for i in range(n)
  ]  # fmt: skip


def serve(store, mode, reqs, gb):
  from jaxmoe.serving import Engine, EngineConfig

  engine = Engine(store, EngineConfig(mode=mode, max_batch=BATCH, max_seq_len=64, page_size=16, expert_cache_gb=gb))
  for r in reqs:
    engine.submit(r)
  start = time.perf_counter()
  out = engine.run_until_done()
  wall = time.perf_counter() - start
  summary = engine.summary()
  engine.close()
  assert all(o["error"] is None for o in out), [o["error"] for o in out if o["error"]]
  return {o["id"]: o["token_ids"] for o in out}, wall, summary


def budget_rows(store, name: str, mode, tenants: list[str], n: int, repeats: int) -> list[dict]:
  from jaxmoe.nn import moe_ops
  from jaxmoe.serving.experts import ArrayPool, min_slots
  from jaxmoe.serving.weights import Mode

  pool = moe_ops.num_slots(store.pool)
  expert = ArrayPool(store.pool).expert_bytes
  need = min_slots(store.slot_maps.values(), store.config.num_experts, BATCH, len(tenants) if mode is Mode.MIXED else 1)
  rows, want = [], None
  for share in SHARES:
    slots = pool if share == 1.0 else round(share * pool)
    row = {"workload": name, "share": share, "slots": slots, "pool_slots": pool, "min_slots": need}
    if slots < need:
      rows.append({**row, "refused": f"below one layer's worst case ({need} slots, {need / pool:.0%})"})
      continue
    gb = None if share == 1.0 else slots * expert / 1e9
    reqs = workload(store, tenants, n, seed=0)
    tokens, _, _ = serve(store, mode, reqs, gb)  # warm-up: compiles this budget's programs
    if want is None:
      want = tokens
    assert tokens == want, f"{name} at {share:.0%}: tokens differ from the whole pool's"
    walls, summaries = [], []
    for r in range(repeats):
      _, wall, summary = serve(store, mode, workload(store, tenants, n, seed=1 + r), gb)
      walls.append(wall)
      summaries.append(summary)
    mid = summaries[walls.index(statistics.median_low(walls))]
    generated = mid["completion_tokens"]
    row.update(
      tokens_per_s=generated / statistics.median(walls),
      generated=generated,
      wall_s=statistics.median(walls),
      decode_steps=mid["decode_steps"],
      hits=mid.get("expert_cache_hits"),
      misses=mid.get("expert_cache_misses"),
      prefetched=mid.get("expert_cache_prefetched"),
      fetched_mb=None if gb is None else (mid["expert_cache_bytes"] + mid["expert_cache_prefetch_bytes"]) / 1e6,
      fetch_s=mid.get("expert_cache_s"),
      device_expert_mb=slots * expert / 1e6,
    )
    rows.append(row)
  full = rows[0]["tokens_per_s"]
  for row in rows:
    if "tokens_per_s" in row:
      row["ratio"] = row["tokens_per_s"] / full
  return rows


def layer_overhead(rows: list[dict], layers: int) -> dict:
  """Per-layer cost of the stepped path: the largest budget below 100% against 100%, per decode step."""
  full = rows[0]
  near = next((r for r in rows[1:] if "tokens_per_s" in r), None)
  if near is None:
    return {}
  step = lambda r: r["wall_s"] / max(1, r["decode_steps"])  # noqa: E731
  return {
    "workload": full["workload"],
    "share": near["share"],
    "misses_per_step": near["misses"] / max(1, near["decode_steps"]),
    "step_ms_full": 1e3 * step(full),
    "step_ms_stepped": 1e3 * step(near),
    "overhead_per_layer_ms": 1e3 * (step(near) - step(full)) / layers,
  }


def table(rows: list[dict]) -> str:
  head = (
    "| workload | budget | slots | tokens/s | vs 100% | hits | misses | hit rate | prefetched | copied MB | "
    "kB per token | copy s |"
  )
  out = [head, "|" + "---|" * 12]
  for r in rows:
    if "refused" in r:
      out.append(f"| {r['workload']} | {r['share']:.0%} | {r['slots']} | refused: {r['refused']} |" + " |" * 8)
      continue
    f = lambda k, spec, r=r: "-" if r.get(k) is None else format(r[k], spec)  # noqa: E731
    out.append(
      f"| {r['workload']} | {r['share']:.0%} | {r['slots']}/{r['pool_slots']} | {r['tokens_per_s']:.0f} | "
      f"{r['ratio']:.2f} | {f('hits', 'd')} | {f('misses', 'd')} | {f('hit_rate', '.1%')} | {f('prefetched', 'd')} | "
      f"{f('fetched_mb', '.0f')} | {f('kb_per_token', '.0f')} | {f('fetch_s', '.2f')} |"
    )
  return "\n".join(out)


def plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for name in sorted({r["workload"] for r in rows}):
    pts = [(100 * r["share"], r["ratio"]) for r in rows if r["workload"] == name and "ratio" in r]
    ax.plot(*zip(*pts), marker="o", label=name)
  ax.set_xlabel("device expert budget (% of the pool)")
  ax.set_ylabel("tokens/s relative to the whole pool on the device")
  ax.invert_xaxis()
  ax.set_ylim(0, 1.15)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("Expert offloading (CPU; same-run ratios)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def measure() -> dict:
  import jax

  from jaxmoe.families.mixtral.config import preset
  from jaxmoe.serving.synthetic import synthetic_store
  from jaxmoe.serving.weights import Mode

  width = dict(hidden_size=256, intermediate_size=512, num_heads=8, num_kv_heads=2, head_dim=32)
  cfg = preset("tiny").replace(vocab_size=512, num_layers=4, num_experts=8, top_k=2, eos_token_id=None, **width)
  store = synthetic_store(cfg, k=4, seed=0, own_fraction=0.5, noise=0.05)
  repeats = 1 if FLAGS.quick else FLAGS.repeats
  rows = budget_rows(store, "single", Mode.RESIDENT, store.tenants[:1], 8, repeats)
  rows += budget_rows(store, "mixed", Mode.MIXED, store.tenants, 16, repeats)
  overhead = [layer_overhead([r for r in rows if r["workload"] == w], cfg.num_layers) for w in ("single", "mixed")]
  return {
    "command": "python bench/offload.py" + (" --quick" if FLAGS.quick else ""),
    "date": time.strftime("%Y-%m-%d"),
    "machine": f"{platform.processor() or platform.machine()}, {jax.device_count()} {jax.default_backend()} device",
    "jax": jax.__version__,
    "rows": rows,
    "layer_overhead": overhead,
  }


def main(argv) -> None:
  del argv
  out = pathlib.Path(FLAGS.out_dir)
  if FLAGS.report_only:
    result = json.loads((out / "offload.json").read_text())
  else:
    result = measure()
    out.mkdir(parents=True, exist_ok=True)
    (out / "offload.json").write_text(json.dumps(result, indent=2) + "\n")
  rows, overhead = result["rows"], result["layer_overhead"]
  for row in rows:  # derived columns (also for results written before they existed)
    if row.get("hits") is not None:
      row["hit_rate"] = row["hits"] / max(1, row["hits"] + row["misses"])
      tokens = row.get("generated") or row["tokens_per_s"] * row["wall_s"]
      row["kb_per_token"] = 1e3 * row["fetched_mb"] / max(1.0, tokens)
  text = table(rows)
  lines = [f"- {o['workload']}: {o['overhead_per_layer_ms']:.2f} ms per layer per decode step ({o['share']:.0%} "
           f"budget, {o['misses_per_step']:.2f} misses per step; step {o['step_ms_stepped']:.1f} ms against "
           f"{o['step_ms_full']:.1f} ms scanned)" for o in overhead if o]  # fmt: skip
  (out / "offload.md").write_text(
    f"{result['command']} ({result['date']}, {result['machine']}, jax {result['jax']})\n\n{text}\n\n"
    "Overhead of one layer at a time:\n" + "\n".join(lines) + "\n"
  )
  plot(rows, out / "offload.png")
  print(text)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
