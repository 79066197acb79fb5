"""Every GPU figure the project needs, in one short run: `python bench/gpu_check.py --out=DIR`.

Steps, each in its own child process with its own deadline inside one overall
limit (--budget_s, default 480 s), progress printed as it goes, every result
written under --out (results.json, one log per step, the kernel bench's JSON):

  tests    the GPU-marked tests (pytest -m gpu)
  kernels  one MoE layer at Mixtral-8x7B widths: jaxmoe's Pallas kernels against
           jax.lax.ragged_dot, a dense einsum and jax's Hopper ragged_dot_mgpu
           (bench/kernels.py), T = 1, 8, 64, 512
  decode   decode tokens/s at Mixtral-8x7B widths with layers reduced, batch 1, 8,
           32: the step at L and 2L layers gives the time per layer, against the
           HBM roofline of what a layer must read (attention, router, the
           distinct experts its tokens route to, the rows' KV pages) at the copy
           bandwidth measured in the same process
  swap     a tenant switch of a Mixtral backbone (layers reduced) in swap mode,
           against the pinned-copy floor (one pinned host buffer of the same
           bytes copied to the device)
  mixed    the serving engine at Mixtral widths (L reduced), K = 4 tenants:
           mixed batches against one model alone, tokens/s
  offload  the same engine with the device expert cache at 100 / 75 / 50% of
           the pool (one tenant, resident mode; K = 4, mixed): tokens/s, misses,
           prefetched experts and bytes copied from pinned host memory

A persistent compilation cache (--cache_dir) makes a rerun cheap. --dry_run
runs the same plan at tiny shapes on any backend (CI runs it on the CPU).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Folder for every result (default $OUT/gpu_check, else bench/results/gpu).")
flags.DEFINE_bool("dry_run", False, "The same plan at tiny shapes, on any backend.")
flags.DEFINE_float("budget_s", 480.0, "Overall wall-clock limit; steps past it are skipped and reported.")
flags.DEFINE_string("cache_dir", None, "Persistent XLA compilation cache (default: <out>/xla_cache).")
flags.DEFINE_list("steps", ["tests", "kernels", "decode", "swap", "mixed", "offload"], "Which steps to run, in order.")
flags.DEFINE_string("child", None, "internal: run one measurement and print its JSON result")

# Seconds per step, within the overall budget.
LIMITS = {"tests": 90, "kernels": 150, "decode": 120, "swap": 45, "mixed": 75, "offload": 90}


def mixtral_shape(dry_run: bool, layers: int):
  from jaxmoe.families.mixtral.config import preset

  if dry_run:
    return preset("tiny").replace(num_layers=layers, dtype="bfloat16", max_position_embeddings=4096)
  return preset("mixtral-8x7b").replace(num_layers=layers)


# ------------------------------------------------------------------ children


def _copy_bandwidth(n: int) -> float:
  """Device-to-device bytes (read + written) per second of a large bf16 copy."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n,), jnp.bfloat16)
  f = jax.jit(lambda v: v + 1)
  jax.block_until_ready(f(a))
  start = time.perf_counter()
  for _ in range(5):
    b = f(a)
  jax.block_until_ready(b)
  return 5 * 2 * a.nbytes / (time.perf_counter() - start)


def _step_seconds(cfg, batch: int, context: int, steps: int) -> tuple[float, float]:
  """(seconds per decode step of `batch` rows at `context`, compile-and-first-step seconds)."""
  import jax
  import jax.numpy as jnp

  from jaxmoe.bench.qos import decode_bench
  from jaxmoe.nn.moe import Impl

  params = decode_bench.random_params(cfg)
  rows = jax.device_put(decode_bench.greedy_rows(batch, context + steps + 4, context))
  kv = decode_bench.random_cache(jax.random.key(batch), cfg, 1 + rows.tables.size)
  tokens = jnp.zeros((batch,), jnp.int32)
  start = time.perf_counter()
  tokens, kv, rows = decode_bench.greedy_step(params, tokens, kv, rows, cfg, Impl.AUTO)
  jax.block_until_ready(tokens)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    tokens, kv, rows = decode_bench.greedy_step(params, tokens, kv, rows, cfg, Impl.AUTO)
  jax.block_until_ready(tokens)
  seconds = (time.perf_counter() - start) / steps
  jax.tree.map(lambda x: x.delete(), (params, kv))
  return seconds, first


def child_decode(dry_run: bool) -> dict:
  bw = _copy_bandwidth(1 << (22 if dry_run else 30))
  context, steps = (16, 2) if dry_run else (128, 10)
  rows = []
  for batch in (2,) if dry_run else (1, 8, 32):
    half, full = mixtral_shape(dry_run, 1), mixtral_shape(dry_run, 2)
    t1, c1 = _step_seconds(half, batch, context, steps)
    t2, c2 = _step_seconds(full, batch, context, steps)
    per_layer = max(t2 - t1, 1e-9)
    cfg, item = full, 2
    d, f, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
    attention = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + cfg.num_heads * cfg.head_dim * d
    distinct = e * (1 - (1 - cfg.top_k / e) ** batch)  # uniform routing of random weights
    kv = 2 * batch * (context + 1) * cfg.num_kv_heads * cfg.head_dim
    layer_bytes = (attention + d * e + 2 * d + distinct * 3 * d * f + kv) * item
    roofline = layer_bytes / (bw / 2)  # a read is half of a copy's traffic
    full_model = mixtral_shape(dry_run, 32 if not dry_run else 2)
    rows.append(
      {
        "batch": batch,
        "step_s_1_layer": t1,
        "step_s_2_layers": t2,
        "per_layer_ms": 1e3 * per_layer,
        "layer_bytes": layer_bytes,
        "roofline_per_layer_ms": 1e3 * roofline,
        "roofline_share": roofline / per_layer,
        "compile_s": [c1, c2],
        "tokens_per_s_32_layers_est": batch / (t1 + (full_model.num_layers - 1) * per_layer),
      }
    )
  return {"copy_gbps": bw / 1e9, "context": context, "rows": rows}


def _host_store(dry_run: bool, layers: int, tenants: int, own_fraction: float):
  from jaxmoe.bench.qos.hoststore import StoreSpec, build_host_store

  cfg = mixtral_shape(dry_run, layers).replace(eos_token_id=-1)  # every request runs to max_tokens
  return build_host_store(StoreSpec(model=cfg, tenants=tenants, own_fraction=own_fraction))


def child_swap(dry_run: bool) -> dict:
  import jax
  import numpy as np

  from jaxmoe.devices import pinned_host_sharding, to_device
  from jaxmoe.serving.weights import Mode, make_weights
  from jaxmoe.trees import tree_bytes

  host = _host_store(dry_run, 2 if dry_run else 4, 2, 0.0)
  store = host.device_store()
  weights = make_weights(Mode.SWAP, store)
  weights.params(store.tenants[0])
  for i in range(4):
    weights.params(store.tenants[(i + 1) % 2])
  switch_s = weights.stats.seconds / weights.stats.switches
  nbytes = tree_bytes(store.backbones[store.tenants[0]])
  pinned = pinned_host_sharding()
  buf = np.ones(nbytes // 2, np.uint16)
  staged = jax.device_put(buf, pinned) if pinned is not None else buf
  floors = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(to_device(staged))
    floors.append(time.perf_counter() - start)
  floor = min(floors)
  return {
    "backbone_bytes": nbytes,
    "switch_s": switch_s,
    "pinned_copy_floor_s": floor,
    "ratio": switch_s / floor,
    "pinned_host": pinned is not None,
    "layers": host.config.num_layers,
  }


def child_mixed(dry_run: bool) -> dict:
  import numpy as np

  from jaxmoe.bench.qos.hoststore import tenant_model_store
  from jaxmoe.serving import Engine, EngineConfig, Mode

  host = _host_store(dry_run, 2 if dry_run else 1, 4, 0.25)
  cfg = host.config
  rng = np.random.default_rng(0)
  n, tokens = (4, 3) if dry_run else (32, 16)

  def run(st, mode):
    engine = Engine(st, EngineConfig(mode=mode, max_batch=4 if dry_run else 8, max_seq_len=32 if dry_run else 64))
    for i in range(n):
      engine.submit(
        {
          "id": f"r{i}",
          "model": st.tenants[i % len(st.tenants)],
          "max_tokens": tokens,
          "prompt_ids": rng.integers(0, cfg.vocab_size, 16).tolist(),
        }
      )
    start = time.perf_counter()
    out = engine.run_until_done()
    return sum(len(o["token_ids"]) for o in out) / (time.perf_counter() - start)

  t0 = host.tenants[0]
  single = tenant_model_store(host.load_tenant(t0), cfg, t0)
  run(single, Mode.RESIDENT)  # compiles
  single_rate = run(single, Mode.RESIDENT)
  del single
  store = host.device_store()
  run(store, Mode.MIXED)
  mixed_rate = run(store, Mode.MIXED)
  return {
    "single_tokens_per_s": single_rate,
    "mixed_tokens_per_s": mixed_rate,
    "ratio": mixed_rate / single_rate,
    "layers": cfg.num_layers,
  }


def child_offload(dry_run: bool) -> dict:
  import numpy as np

  from jaxmoe.io.store import expert_bytes
  from jaxmoe.serving import Engine, EngineConfig, Mode
  from jaxmoe.serving.experts import min_slots

  host = _host_store(dry_run, 2 if dry_run else 1, 4, 0.25)
  store, cfg = host.host_memory_store(), host.config
  pool, expert = int(next(iter(store.pool.values())).shape[0]), expert_bytes(cfg)
  batch, n, tokens = (4, 4, 3) if dry_run else (8, 16, 16)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, cfg.vocab_size, 16).tolist() for _ in range(n)]

  def run(mode, tenants, share):
    need = min_slots(store.slot_maps.values(), cfg.num_experts, batch, len(tenants) if mode is Mode.MIXED else 1)
    slots = pool if share == 1.0 else max(need, round(share * pool))
    gb = None if slots >= pool else slots * expert / 1e9
    engine = Engine(store, EngineConfig(mode=mode, max_batch=batch, max_seq_len=64, expert_cache_gb=gb))
    rates = []
    for _ in range(2):  # the first run compiles
      for i in range(n):
        engine.submit(
          {"id": f"r{i}", "model": tenants[i % len(tenants)], "max_tokens": tokens, "prompt_ids": prompts[i]}
        )
      start = time.perf_counter()
      out = engine.run_until_done()
      rates.append(sum(len(o["token_ids"]) for o in out) / (time.perf_counter() - start))
    s = engine.summary()
    engine.close()
    keys = ("expert_cache_misses", "expert_cache_prefetched", "expert_cache_bytes", "expert_cache_prefetch_bytes")
    return {"share": share, "slots": slots, "tokens_per_s": rates[-1], **{k: s.get(k) for k in keys}}

  plan = [(mode, share) for mode in (Mode.RESIDENT, Mode.MIXED) for share in (1.0, 0.75, 0.5)]
  if dry_run:  # the paths, not the curve: the whole pool on the device, and an expert cache
    plan = [(Mode.RESIDENT, 1.0), (Mode.MIXED, 0.5)]
  rows = []
  for mode, share in plan:
    tenants = store.tenants if mode is Mode.MIXED else store.tenants[:1]
    rows.append({"mode": mode.value, **run(mode, tenants, share)})
  return {"pool_slots": pool, "expert_bytes": expert, "layers": cfg.num_layers, "rows": rows}


CHILDREN = {"decode": child_decode, "swap": child_swap, "mixed": child_mixed, "offload": child_offload}


# ------------------------------------------------------------------ parent


def environment() -> dict:
  import jax

  dev = jax.devices()[0]
  try:
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    smi = None
  versions = {"python": platform.python_version(), "jax": jax.__version__}
  for mod in ("jaxlib", "flax", "numpy", "orbax.checkpoint"):
    try:
      versions[mod] = __import__(mod, fromlist=["_"]).__version__
    except (ImportError, AttributeError):
      versions[mod] = None
  return {
    "card": dev.device_kind,
    "platform": dev.platform,
    "devices": len(jax.devices()),
    "nvidia_smi": smi,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "host": platform.node(),
    "versions": versions,
  }


def run_step(name: str, cmd: list[str], limit: float, out: pathlib.Path, env: dict) -> dict:
  print(f"[{name}] starting (limit {limit:.0f} s): {' '.join(cmd[1:])}", flush=True)
  start = time.perf_counter()
  log = out / f"{name}.log"
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env, cwd=ROOT)
  except subprocess.TimeoutExpired as e:
    log.write_text((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""))
    print(f"[{name}] timed out after {limit:.0f} s", flush=True)
    return {"status": "timeout", "limit_s": limit}
  log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
  seconds = time.perf_counter() - start
  result = {"status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}", "seconds": seconds}
  if name in CHILDREN:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
      result["result"] = json.loads(lines[-1])
    else:
      result["stderr_tail"] = proc.stderr[-1500:]
  else:
    result["tail"] = proc.stdout[-1500:]
  print(f"[{name}] {result['status']} in {seconds:.0f} s", flush=True)
  return result


def commands(dry_run: bool, out: pathlib.Path, cache: str) -> dict[str, list[str]]:
  me, py = str(pathlib.Path(__file__).resolve()), sys.executable
  flag = ["--dry_run"] if dry_run else []
  kernels = (
    ["--small", "--tokens=8", "--variants=pallas"]
    if dry_run
    else ["--tokens=1,8,64,512", "--variants=pallas,ragged,dense,mgpu", "--compile_timeout_s=60", "--min_time_s=0.3"]
  )
  tests = ["--co"] if dry_run else []  # the GPU tests skip off GPUs: a dry run checks they collect
  return {
    "tests": [py, "-m", "pytest", "-q", "-m", "gpu", *tests, "tests/kernels"],
    "kernels": [py, str(ROOT / "bench" / "kernels.py"), *kernels, f"--out_dir={out}", f"--cache_dir={cache}"],
    **{name: [py, me, f"--child={name}", *flag, f"--cache_dir={cache}"] for name in CHILDREN},
  }


def main(argv):
  del argv
  if FLAGS.child:
    import jax

    if FLAGS.cache_dir:
      jax.config.update("jax_compilation_cache_dir", FLAGS.cache_dir)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0 if FLAGS.dry_run else 1.0)
    print(json.dumps(CHILDREN[FLAGS.child](FLAGS.dry_run)), flush=True)
    return
  base = os.environ.get("OUT")
  out = pathlib.Path(FLAGS.out or (pathlib.Path(base) / "gpu_check" if base else ROOT / "bench" / "results" / "gpu"))
  out.mkdir(parents=True, exist_ok=True)
  cache = FLAGS.cache_dir or str(out / "xla_cache")
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  if not FLAGS.dry_run:  # the GPU tests run at XLA's full optimisation, not the suite's cheap CPU one
    env["JAXMOE_TEST_FULL_OPT"] = "1"
  doc = {
    "environment": environment(),
    "dry_run": FLAGS.dry_run,
    "command": " ".join([sys.executable, *sys.argv]),
    "steps": {},
  }
  print(
    f"gpu_check: {doc['environment']['card']} ({doc['environment']['platform']}), budget {FLAGS.budget_s:.0f} s",
    flush=True,
  )
  deadline = time.monotonic() + FLAGS.budget_s
  plan = commands(FLAGS.dry_run, out, cache)
  for name in FLAGS.steps:
    left = deadline - time.monotonic()
    if left < 10:
      doc["steps"][name] = {"status": "skipped: overall budget spent"}
      continue
    doc["steps"][name] = run_step(name, plan[name], min(LIMITS[name], left), out, env)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")  # whatever happens next, keep this
  print(f"results: {out / 'results.json'}")
  bad = [n for n, s in doc["steps"].items() if s["status"] != "ok"]
  if bad:
    print(f"steps not ok: {bad}")


if __name__ == "__main__":
  app.run(main)
