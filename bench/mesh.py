"""Expert parallelism on paper and on forced CPU devices: bytes per device, collective bytes, step time.

  python bench/mesh.py [--out=bench/results/mesh] [--measure]

For each model shape and mesh, with K tenants consolidated into one pool
(`own_fraction` of (layer, expert) positions distinct per tenant, as
`synthetic_store` builds them), the table gives:
  - bytes each device holds: its pool shard (slots over `expert` by
    round-robin placement, each slot's hidden features F over `model`), the
    backbones (mode mixed: all K; replicated, or with a model axis split as
    `--split_backbones` splits them: attention and the LM head over
    expert x model), the KV pages of its data shard's rows (the batch /
    n_data; by head too where backbones are split);
  - the bytes one device sends per decode step in the MoE all-reduce
    (jaxmoe/nn/expert_parallel.py: T x D float32 per layer, ring, over expert x model)
    and, for comparison, what an all-to-all dispatch + return of the
    (token, k) pairs over `expert` would send;
  - the estimated decode step on NVLink 4, PCIe 5 and ICI: the single-device
    step time split by bytes read into its expert and non-expert parts; the
    expert part divided over the shards, the slowest expert shard of every
    layer counted (Monte-Carlo over uniform top-k routing of the batch's rows
    over their tenants' slot maps) and divided by the model axis, the
    non-expert part as held, plus the all-reduce's bytes over the link, the
    all-gathers split backbones add (the heads' outputs and the output
    projection per layer, the logits once) and a latency per collective. The
    single-device step is the HBM roofline (bytes touched / 3.44 TB/s, the
    H200 copy bandwidth measured in this project) unless measured:
    `--measure` times the engine's decode step of a small model on this CPU,
    alone and on forced host devices (those share the CPU's cores, so that
    column checks the mechanism, not the speed).
  - "ideal": the single-device roofline / n, the reference of issue 18's goal
    (8x22B, K = 4, 8 H200, batch 32: within 1.2x of it);
  - `split_backbones`: the step on NVLink 4 with `--split_backbones` (on a
    mesh with a model axis, the same as the NVLink 4 column).

Splitting by features (a model axis) or by head makes outputs equal one
device's to float rounding; slots over `expert` with replicated backbones
are bit-identical (jaxmoe/nn/expert_parallel.py, jaxmoe/nn/sharding.py).

Interconnect figures are vendor datasheet numbers per direction per device,
not measured here: NVLink 4 450 GB/s (900 GB/s bidirectional, H100/H200
SXM), PCIe 5.0 x16 64 GB/s, TPU v5p ICI 600 GB/s (4,800 Gbps per chip);
latency per collective 10 / 25 / 10 us (assumed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "bench/results/mesh", "Folder for table.md and results.json.")
flags.DEFINE_bool("measure", True, "Also time the engine's decode step on this CPU (forced host devices).")
flags.DEFINE_integer("trials", 64, "Monte-Carlo routings per estimate.")
flags.DEFINE_string("worker", None, "Internal: run the CPU measurement for this mesh spec and print JSON.")

HBM_BYTES_PER_S = 3.44e12  # ANCHORS: H200 device-to-device copy (read + written)
LINKS = {  # name: (bytes/s per direction per device, latency per collective in s); datasheet figures
  "NVLink 4": (450e9, 10e-6),
  "PCIe 5": (64e9, 25e-6),
  "ICI (v5p)": (600e9, 10e-6),
}


@dataclasses.dataclass(frozen=True)
class Shape:
  name: str
  d: int
  f: int
  layers: int
  experts: int
  top_k: int
  heads: int
  kv_heads: int
  head_dim: int
  vocab: int
  itemsize: int = 2  # bf16

  @property
  def expert_bytes(self) -> int:
    return 3 * self.d * self.f * self.itemsize

  @property
  def split_bytes(self) -> int:
    """Of one backbone: what --split_backbones splits (attention, the LM head)."""
    attn = self.d * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
    return (self.layers * attn + self.vocab * self.d) * self.itemsize

  def gather_bytes(self, tokens: int, n: int) -> float:
    """Bytes one device receives per step in --split_backbones' all-gathers (ring)."""
    per_layer = tokens * (self.heads * self.head_dim + self.d) * self.itemsize
    return (n - 1) / n * (self.layers * per_layer + tokens * self.vocab * 4)

  @property
  def backbone_bytes(self) -> int:
    attn = self.d * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
    per_layer = attn + self.d * self.experts + 2 * self.d
    return (self.layers * per_layer + 2 * self.vocab * self.d + self.d) * self.itemsize

  def kv_bytes(self, positions: int) -> int:
    return 2 * self.layers * self.kv_heads * self.head_dim * positions * self.itemsize


SHAPES = {
  "mixtral-8x7b": Shape("mixtral-8x7b", 4096, 14336, 32, 8, 2, 32, 8, 128, 32000),
  "mixtral-8x22b": Shape("mixtral-8x22b", 6144, 16384, 56, 8, 2, 48, 8, 128, 32768),
}
CASES = [  # (shape, K tenants, own fraction, batch, context positions per row, mesh)
  ("mixtral-8x7b", 4, 0.5, 32, 1024, "expert:2"),
  ("mixtral-8x7b", 4, 0.5, 32, 1024, "expert:4"),
  ("mixtral-8x7b", 4, 0.5, 32, 1024, "data:2,expert:4"),
  ("mixtral-8x7b", 4, 0.5, 32, 1024, "expert:8"),
  ("mixtral-8x22b", 4, 0.5, 32, 1024, "expert:8"),
  ("mixtral-8x22b", 4, 0.5, 32, 1024, "expert:4,model:2"),
  ("mixtral-8x22b", 4, 0.5, 32, 1024, "model:8"),
  ("mixtral-8x22b", 4, 0.5, 8, 1024, "expert:8"),
  ("mixtral-8x22b", 4, 0.5, 8, 1024, "model:8"),
  ("mixtral-8x22b", 4, 0.25, 32, 1024, "expert:8"),
]


def layer_maps(rng, shape: Shape, k: int, own: float) -> tuple[np.ndarray, int]:
  """Per layer, each tenant's slots [L, K, E] in a layer-major pool, and the pool's size X."""
  maps, x = np.zeros((shape.layers, k, shape.experts), np.int64), 0
  for layer in range(shape.layers):
    base = x + np.arange(shape.experts)
    x += shape.experts
    maps[layer, :] = base
    for t in range(1, k):
      mine = rng.random(shape.experts) < own
      maps[layer, t, mine] = x + np.arange(mine.sum())
      x += mine.sum()
  return maps, x


def routed_slots(rng, maps, batch: int, top_k: int) -> list[np.ndarray]:
  """Per layer, the distinct slots a decode step of `batch` rows (tenants round-robin) reads."""
  k, e = maps.shape[1:]
  tenants = np.arange(batch) % k
  out = []
  for layer in range(maps.shape[0]):
    picks = np.argsort(rng.random((batch, e)), axis=1)[:, :top_k]  # uniform top-k without repeats
    out.append(np.unique(maps[layer, tenants[:, None], picks]))
  return out


def estimate(case, trials: int, measured_step_s: float | None = None) -> dict:
  from jaxmoe.nn import expert_parallel

  name, k, own, batch, context, mesh = case
  s = SHAPES[name]
  sizes = dict(p.split(":") for p in mesh.split(","))
  n_exp, n_model, n_data = (int(sizes.get(a, 1)) for a in ("expert", "model", "data"))
  n_split = n_exp * n_model  # the devices one data shard's rows span
  n = n_split * n_data
  rng = np.random.default_rng(0)
  maps, x = layer_maps(rng, s, k, own)
  per_shard = -(-x // n_exp)
  device_of = np.arange(x) % n_exp  # round-robin placement
  one_bytes, slow_bytes = [], []
  for _ in range(trials):
    layers = routed_slots(rng, maps, batch, s.top_k)
    one_bytes.append(sum(len(u) for u in layers) * s.expert_bytes)
    # data shards split the rows: each data group routes batch / n_data rows; the slowest device per layer
    slow = 0
    for u in layers if n_data == 1 else routed_slots(rng, maps, batch // n_data, s.top_k):
      slow += np.bincount(device_of[u], minlength=n_exp).max() * s.expert_bytes / n_model  # F split over model
    slow_bytes.append(slow)
  expert_read, slowest = float(np.mean(one_bytes)), float(np.mean(slow_bytes))
  backbone_read = k * s.backbone_bytes  # mixed: every tenant's non-expert weights once per step
  split_read = k * s.split_bytes  # of which attention and the LM head
  kv_read = s.kv_bytes(batch * context)
  one_total = expert_read + backbone_read + kv_read
  roofline = one_total / HBM_BYTES_PER_S
  t1 = measured_step_s if measured_step_s is not None else roofline
  tokens = batch // n_data
  all_reduce = expert_parallel.all_reduce_bytes(tokens, s.d, n_split) * s.layers
  all_to_all = expert_parallel.all_to_all_bytes(tokens, s.d, s.top_k, n_exp, s.itemsize) * s.layers

  def device_bytes(split: bool) -> tuple[float, float]:
    """(backbone bytes, KV bytes) one device reads per step: replicated backbones, or split ones."""
    if not split:
      return backbone_read, kv_read / n_data
    return backbone_read - split_read + split_read / n_split, kv_read / n_data / n_split

  def step(split: bool, bw: float, lat: float) -> float:
    backbone, kv = device_bytes(split)
    t = t1 * (slowest + backbone + kv) / one_total + all_reduce / bw + (s.layers * lat if n_split > 1 else 0.0)
    if split:  # the heads' outputs and the projection per layer, the logits once
      t += s.gather_bytes(tokens, n_split) / bw + (2 * s.layers + 1) * lat
    return t

  split = n_model > 1  # a model axis implies --split_backbones
  out = {
    "model": name,
    "K": k,
    "own_fraction": own,
    "batch": batch,
    "context": context,
    "mesh": mesh,
    "pool_slots": int(x),
    "pool_GB": x * s.expert_bytes / 1e9,
    "pool_per_device_GB": per_shard * s.expert_bytes / n_model / 1e9,
    "pool_per_device_vs_ideal": per_shard / (x / n_exp),
    "backbones_per_device_GB": device_bytes(split)[0] / 1e9,
    "kv_per_device_GB": device_bytes(split)[1] / 1e9,
    "all_reduce_MB_per_step": all_reduce / 1e6,
    "all_to_all_MB_per_step": all_to_all / 1e6,
    "single_device_step_ms": 1e3 * t1,
    "ideal_ms": 1e3 * roofline / n,
  }
  for link, (bw, lat) in LINKS.items():
    t = step(split, bw, lat)
    out[f"{link}_ms"] = 1e3 * t
    out[f"{link}_vs_ideal"] = t / (roofline / n)
  # With --split_backbones on a mesh without a model axis (the same as above where there is one).
  out["NVLink 4_ms_split_backbones"] = 1e3 * step(True, *LINKS["NVLink 4"])
  out["split_backbones_vs_ideal"] = out["NVLink 4_ms_split_backbones"] / out["ideal_ms"]
  return out


# --- CPU measurement (one device and forced host devices, in a subprocess) ---
def _bench_store():
  from jaxmoe.families.mixtral.config import MixtralConfig
  from jaxmoe.serving.synthetic import synthetic_store

  cfg = MixtralConfig(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    num_experts=8,
    top_k=2,
    head_dim=32,
    rope_theta=10000.0,
    max_position_embeddings=512,
    eos_token_id=511 + 1000,  # never produced: every request runs to max_tokens
  )
  return synthetic_store(cfg, k=4, seed=0, own_fraction=0.5, noise=0.02)


def _measure(spec: str) -> dict:
  import jax

  from jaxmoe.serving import Engine, EngineConfig, Mode

  store = _bench_store()
  rng = np.random.default_rng(0)
  reqs = [
    {"id": f"r{i}", "model": store.tenants[i % 4], "prompt_ids": rng.integers(0, 500, 16).tolist(), "max_tokens": 48}
    for i in range(8)
  ]
  engine = Engine(store, EngineConfig(mode=Mode.MIXED, max_batch=8, max_seq_len=128, page_size=16, mesh=spec))
  for r in reqs[:8]:
    engine.submit(dict(r, id=r["id"] + "w", max_tokens=8))
  engine.run_until_done()  # compiles
  for r in reqs:
    engine.submit(r)
  outputs = engine.step()  # admission (prefill) of all eight rows
  start, steps = time.perf_counter(), engine.decode_steps
  while engine.has_work:
    outputs += engine.step()
  step_s = (time.perf_counter() - start) / (engine.decode_steps - steps)
  tokens = json.dumps(sorted((o["id"], o["token_ids"]) for o in outputs))
  pool = sum(w.nbytes for w in store.pool.values())
  held = engine.mesh.bytes_per_device(engine.weights.pool) if engine.mesh is not None else {0: pool}
  return {
    "mesh": spec or "one device",
    "devices": jax.device_count(),
    "decode_step_ms": 1e3 * step_s,
    "pool_bytes": pool,
    "pool_bytes_per_device": sorted(set(held.values())),
    "tokens_sha256": hashlib.sha256(tokens.encode()).hexdigest()[:16],
  }


def measure_cpu() -> list[dict]:
  out = []
  for spec in ("", "expert:4", "data:2,expert:4", "model:4", "expert:4,model:2"):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[1])
    proc = subprocess.run(
      [sys.executable, __file__, f"--worker={spec or 'none'}"], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode:
      raise RuntimeError(proc.stderr[-3000:])
    out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  return out


def table(rows: list[dict]) -> str:
  cols = [
    ("model", "{}"),
    ("K", "{}"),
    ("own_fraction", "{:.2f}"),
    ("batch", "{}"),
    ("mesh", "{}"),
    ("pool_GB", "{:.1f}"),
    ("pool_per_device_GB", "{:.2f}"),
    ("pool_per_device_vs_ideal", "{:.4f}"),
    ("backbones_per_device_GB", "{:.2f}"),
    ("kv_per_device_GB", "{:.2f}"),
    ("all_reduce_MB_per_step", "{:.1f}"),
    ("all_to_all_MB_per_step", "{:.1f}"),
    ("single_device_step_ms", "{:.1f}"),
    ("ideal_ms", "{:.2f}"),
    ("NVLink 4_ms", "{:.2f}"),
    ("NVLink 4_vs_ideal", "{:.2f}"),
    ("PCIe 5_ms", "{:.2f}"),
    ("PCIe 5_vs_ideal", "{:.2f}"),
    ("ICI (v5p)_ms", "{:.2f}"),
    ("NVLink 4_ms_split_backbones", "{:.2f}"),
    ("split_backbones_vs_ideal", "{:.2f}"),
  ]
  lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(fmt.format(r[c]) for c, fmt in cols) + " |")
  return "\n".join(lines)


def main(argv):
  del argv
  if FLAGS.worker is not None:
    print(json.dumps(_measure("" if FLAGS.worker == "none" else FLAGS.worker)))
    return
  rows = [estimate(c, FLAGS.trials) for c in CASES]
  out = pathlib.Path(FLAGS.out)
  previous = out / "results.json"
  if FLAGS.measure:
    measured = measure_cpu()
  elif previous.exists():  # keep the last CPU measurement with the new estimates
    measured = json.loads(previous.read_text()).get("measured_cpu", [])
  else:
    measured = []
  out.mkdir(parents=True, exist_ok=True)
  text = [
    "# Expert parallelism: bytes per device, collective bytes, estimated decode step",
    "",
    f"`python bench/mesh.py --out={FLAGS.out}` on {platform.machine()} / {platform.python_version()}; "
    "single-device step = HBM roofline at 3.44 TB/s (H200, measured copy bandwidth); links: datasheet figures "
    "(bench/mesh.py docstring). Mixed mode: all K backbones read once per step, replicated (split over expert x model where the mesh has a model axis); round-robin "
    "placement; uniform top-k routing, rows spread evenly over tenants; KV per device: its data shard's rows, "
    "`context` positions each.",
    "",
    table(rows),
  ]
  if measured:
    text += [
      "",
      "## Measured on this CPU (forced host devices share its cores: a check of the mechanism, not of speed)",
      "",
      "| mesh | devices | decode step ms | pool bytes | pool bytes per device | tokens (sha256) | = one device |",
      "|---|---|---|---|---|---|---|",
    ]
    first = measured[0].get("tokens_sha256")
    text += [
      f"| {m['mesh']} | {m['devices']} | {m['decode_step_ms']:.2f} | {m['pool_bytes']} | {m['pool_bytes_per_device']}"
      f" | {m.get('tokens_sha256', '-')} | {'-' if first is None else m.get('tokens_sha256') == first} |"
      for m in measured
    ]
  (out / "table.md").write_text("\n".join(text) + "\n")
  (out / "results.json").write_text(json.dumps({"estimates": rows, "measured_cpu": measured}, indent=1) + "\n")
  print("\n".join(text))


if __name__ == "__main__":
  app.run(main)
