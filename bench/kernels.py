"""One MoE layer four ways: jaxmoe's Pallas kernels, jax.lax.ragged_dot, a dense einsum, and jax's
Mosaic-GPU ragged_dot (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`, Hopper only: variant `mgpu`).

Mixtral shapes by default (d=4096, f=14336, E=8, top-2, bf16) at
T in {1, 8, 64, 512, 4096, 16384}; `--small` swaps in tiny shapes and runs the
Pallas kernels in interpret mode, so the script can be smoke-tested on a CPU.

Each (variant, T) runs in its own child process, so a compile that outruns
--compile_timeout_s is killed and reported, not waited for (XLA GPU compiles of
MoE layers have been seen to take minutes). Compile time is reported apart from
run time. The copy bandwidth and the throughput of a large bf16 matmul are
measured in the same run as ceilings; each result gives GB/s over the bytes the
layer must read (the routed experts' weights, x and y) and TFLOP/s over the
routed FLOPs, and both as a percent of those ceilings. Results go to
bench/results/kernels-<date>-<card>.json with the card, date and versions.

  python bench/kernels.py [--small] [--tokens=1,8] [--variants=pallas,ragged]
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import queue
import re
import subprocess
import sys
import threading
import time

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

FLAGS = flags.FLAGS
flags.DEFINE_bool("small", False, "tiny shapes and interpret-mode kernels (CPU smoke test)")
flags.DEFINE_list("tokens", None, "token counts T; default 1,8,64,512,4096,16384 (1,8,64 with --small)")
flags.DEFINE_list("variants", ["pallas", "ragged", "dense"], "which implementations to time (also: mgpu)")
flags.DEFINE_float("compile_timeout_s", 240.0, "kill and report a variant whose compile takes longer")
flags.DEFINE_float("setup_timeout_s", 300.0, "bound on a child's start-up (imports, weights)")
flags.DEFINE_float("min_time_s", 1.0, "time each variant for at least this long (after warm-up)")
flags.DEFINE_string("out_dir", str(ROOT / "bench" / "results"), "where the JSON goes")
flags.DEFINE_string("cache_dir", None, "persistent JAX compilation cache, shared by the children")
flags.DEFINE_string("xla_flags", "", "appended to XLA_FLAGS of the children (e.g. autotune level)")
flags.DEFINE_string("child", None, "internal: a JSON job for a child process")

MIXTRAL = {"d": 4096, "f": 14336, "e": 8, "k": 2, "dtype": "bfloat16"}
SMALL = {"d": 64, "f": 128, "e": 8, "k": 2, "dtype": "bfloat16"}


# ---------------------------------------------------------------- child side


def _emit(**event):
  print(json.dumps(event), flush=True)


def _time(fn, args, min_time_s: float, max_iters: int = 1000) -> float:
  """Median seconds per call after one warm-up call."""
  import jax

  jax.block_until_ready(fn(*args))
  times, start = [], time.perf_counter()
  while len(times) < 3 or (time.perf_counter() - start < min_time_s and len(times) < max_iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2]


def _ceilings(job):
  import jax
  import jax.numpy as jnp

  small = job["small"]
  n = (1 << 24) if small else (1 << 30)  # elements of bf16: 32 MiB / 2 GiB
  a = jnp.ones((n,), jnp.bfloat16)
  _emit(event="ready")
  copy = jax.jit(lambda v: v + 1)
  copy_s = _time(copy, (a,), job["min_time_s"])
  m = 512 if small else 8192
  x = jnp.ones((m, m), jnp.bfloat16)
  matmul = jax.jit(lambda p, q: p @ q)
  matmul_s = _time(matmul, (x, x), job["min_time_s"])
  dev = jax.devices()[0]
  _emit(
    event="result",
    card=dev.device_kind,
    platform=dev.platform,
    copy_gbps=2 * n * 2 / copy_s / 1e9,
    matmul_tflops=2 * m**3 / matmul_s / 1e12,
    copy_bytes=2 * n * 2,
    matmul_shape=[m, m, m],
  )


def _dense_einsum(x, router_logits, slot_map, pool, spec):
  """Every slot on every token as batched einsums (no loop), then the routed mix."""
  import jax
  import jax.numpy as jnp

  from jaxmoe.nn.moe_ops import expert_slots, route

  weights, experts = route(router_logits, spec.top_k, spec.router)
  slots = expert_slots(experts, slot_map)
  num_slots = pool["w1"].shape[0]
  gate_w = jnp.einsum("TK,TKX->TX", weights, jax.nn.one_hot(slots, num_slots, dtype=jnp.float32))
  f32 = jnp.float32
  gate = jnp.einsum("TD,XDF->XTF", x, pool["w1"], preferred_element_type=f32)
  up = jnp.einsum("TD,XDF->XTF", x, pool["w3"], preferred_element_type=f32)
  h = (jax.nn.silu(gate) * up).astype(x.dtype)
  y = jnp.einsum("XTF,XFD->XTD", h, pool["w2"], preferred_element_type=f32)
  return jnp.einsum("TX,XTD->TD", gate_w, y).astype(x.dtype)


def _mgpu_moe(x, router_logits, slot_map, pool, spec):
  """The SwiGLU experts through jax's Hopper ragged_dot kernel: (token, k) pairs sorted by slot."""
  import jax
  import jax.numpy as jnp
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

  from jaxmoe.nn.moe_ops import expert_slots, route

  t, k = router_logits.shape[0], spec.k
  weights, experts = route(router_logits, spec.top_k, spec.router)
  flat = expert_slots(experts, slot_map).reshape(t * k)
  order = jnp.argsort(flat, stable=True)
  sizes = jnp.bincount(flat, length=pool["w1"].shape[0]).astype(jnp.int32)
  rows = x[order // k]
  blocks = dict(block_m=64, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
  dot = lambda a, w: ragged_dot_mgpu.ragged_dot(a, w, group_sizes=sizes, **blocks)  # noqa: E731
  h = (jax.nn.silu(dot(rows, pool["w1"]).astype(jnp.float32)) * dot(rows, pool["w3"])).astype(x.dtype)
  ys = dot(h, pool["w2"]).astype(jnp.float32) * weights.reshape(t * k)[order][:, None]
  return jnp.zeros((t, x.shape[1]), jnp.float32).at[order // k].add(ys).astype(x.dtype)


def _layer(job):
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxmoe.nn.moe import Impl, MoeSpec, moe
  from jaxmoe.nn.moe_ops import expert_slots, route

  shape, t, variant = job["shape"], job["tokens"], job["variant"]
  d, f, e, k, dtype = shape["d"], shape["f"], shape["e"], shape["k"], jnp.dtype(shape["dtype"])
  keys = jax.random.split(jax.random.PRNGKey(t), 5)
  x = jax.random.normal(keys[0], (t, d), dtype)
  logits = jax.random.normal(keys[1], (t, e), dtype)
  slot_map = jnp.arange(e, dtype=jnp.int32)
  pool = {
    "w1": jax.random.normal(keys[2], (e, d, f), dtype) * 0.02,
    "w3": jax.random.normal(keys[3], (e, d, f), dtype) * 0.02,
    "w2": jax.random.normal(keys[4], (e, f, d), dtype) * 0.02,
  }
  gpu = jax.default_backend() == "gpu"
  impl = {"pallas": Impl.PALLAS if gpu else Impl.PALLAS_INTERPRET, "ragged": Impl.RAGGED}.get(variant)
  spec = MoeSpec(top_k=k, impl=impl or Impl.DENSE)
  other = _mgpu_moe if variant == "mgpu" else _dense_einsum
  fn = functools.partial(moe, spec=spec) if impl else functools.partial(other, spec=spec)
  args = (x, logits, slot_map, pool)
  jax.block_until_ready(args)
  _emit(event="ready")
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  _emit(event="compiled", compile_s=time.perf_counter() - t0)
  seconds = _time(compiled, args, job["min_time_s"])
  _, experts = route(logits, k, spec.router)
  used = len(np.unique(np.asarray(expert_slots(experts, slot_map))))
  item = dtype.itemsize
  must_read = used * 3 * d * f * item + 2 * t * d * item + t * e * item
  flops = 2 * 3 * t * k * d * f
  _emit(
    event="result",
    seconds=seconds,
    bytes=must_read,
    flops=flops,
    experts_used=used,
    impl=impl.value if impl else ("ragged_dot_mgpu" if variant == "mgpu" else "dense_einsum"),
    platform=jax.default_backend(),
  )


def _child(job_text: str):
  job = json.loads(job_text)
  if job.get("cache_dir"):
    import jax

    jax.config.update("jax_compilation_cache_dir", job["cache_dir"])
  {"ceilings": _ceilings, "layer": _layer}[job["kind"]](job)


# --------------------------------------------------------------- parent side


def _run_child(job: dict) -> dict:
  """Runs a job in a child with a deadline per phase: setup, compile, run."""
  env = dict(os.environ)
  if FLAGS.xla_flags:
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + FLAGS.xla_flags).strip()
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), f"--child={json.dumps(job)}"]
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  lines: queue.Queue = queue.Queue()
  err: list[str] = []

  def pump():
    for line in proc.stdout:
      lines.put(line)
    lines.put(None)

  threading.Thread(target=pump, daemon=True).start()
  threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True).start()
  phase, out = "setup", {}
  limits = {
    "setup": FLAGS.setup_timeout_s,
    "compile": FLAGS.compile_timeout_s,
    "run": max(120.0, 30 * FLAGS.min_time_s),
  }
  deadline = time.monotonic() + limits[phase]
  while True:
    try:
      line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
      proc.kill()
      proc.wait()
      return {**out, "status": f"{phase}_timeout", "limit_s": limits[phase]}
    if line is None:
      proc.wait()
      tail = "".join(err)[-2000:]
      return {**out, "status": f"error (exit {proc.returncode})", "stderr_tail": tail}
    try:
      event = json.loads(line)
    except json.JSONDecodeError:
      continue
    name = event.pop("event")
    out.update(event)
    if name == "result":
      proc.wait()
      return {**out, "status": "ok"}
    phase = {"ready": "compile", "compiled": "run"}[name]
    deadline = time.monotonic() + limits[phase]


def _versions() -> dict:
  import jax
  import jaxlib
  import numpy

  return {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "numpy": numpy.__version__,
  }


def _row(r: dict) -> str:
  if r["status"] != "ok":
    return f"{r['variant']:>7} T={r['tokens']:<6} {r['status']}"
  return (
    f"{r['variant']:>7} T={r['tokens']:<6} compile {r['compile_s']:7.2f} s  "
    f"{r['seconds'] * 1e3:9.3f} ms  {r['gbps']:8.1f} GB/s ({r['pct_copy']:5.1f}%)  "
    f"{r['tflops']:7.2f} TFLOP/s ({r['pct_matmul']:5.1f}%)  experts {r['experts_used']}"
  )


def main(argv):
  del argv
  if FLAGS.child:
    _child(FLAGS.child)
    return
  shape = SMALL if FLAGS.small else MIXTRAL
  default_tokens = [1, 8, 64] if FLAGS.small else [1, 8, 64, 512, 4096, 16384]
  tokens = [int(t) for t in FLAGS.tokens] if FLAGS.tokens else default_tokens
  common = {"small": FLAGS.small, "min_time_s": FLAGS.min_time_s, "cache_dir": FLAGS.cache_dir}
  ceilings = _run_child({"kind": "ceilings", **common})
  print(f"ceilings: {json.dumps(ceilings)}", flush=True)
  if ceilings["status"] != "ok":
    raise SystemExit("could not measure the ceilings")
  results = []
  for t in tokens:
    for variant in FLAGS.variants:
      r = {
        "variant": variant,
        "tokens": t,
        **_run_child({"kind": "layer", "variant": variant, "tokens": t, "shape": shape, **common}),
      }
      if r["status"] == "ok":
        r["gbps"] = r["bytes"] / r["seconds"] / 1e9
        r["tflops"] = r["flops"] / r["seconds"] / 1e12
        r["pct_copy"] = 100 * r["gbps"] / ceilings["copy_gbps"]
        r["pct_matmul"] = 100 * r["tflops"] / ceilings["matmul_tflops"]
      results.append(r)
      print(_row(r), flush=True)
  now = datetime.datetime.now(datetime.timezone.utc)
  report = {
    "benchmark": "moe_layer",
    "card": ceilings["card"],
    "platform": ceilings["platform"],
    "date": now.isoformat(timespec="seconds"),
    "versions": _versions(),
    "small": FLAGS.small,
    "shape": shape,
    "ceilings": ceilings,
    "compile_timeout_s": FLAGS.compile_timeout_s,
    "notes": "gbps: bytes the layer must read (routed experts' weights, x, y, logits) / time; "
    "tflops: 2*3*T*K*D*F routed FLOPs / time; pct_*: of the ceilings of this run",
    "results": results,
  }
  out_dir = pathlib.Path(FLAGS.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  card = re.sub(r"[^A-Za-z0-9]+", "-", ceilings["card"]).strip("-").lower()
  path = out_dir / f"kernels-{now:%Y%m%d-%H%M%S}-{card}{'-small' if FLAGS.small else ''}.json"
  path.write_text(json.dumps(report, indent=2) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  app.run(main)
