"""The decode path on this machine: step time, tokens/s and the share of the memory roofline.

  python bench/decode.py [--out=bench/results/decode/decode_cpu.json] [--hf] [--quick]

One random Mixtral-architecture model (vocab 512, D=256, F=512, L=4, 8 query /
2 kv heads, 8 experts top-2, float32: 13.5M parameters), measured in one run:

  steps      the jitted decode step alone (sampling included, tokens stay on the
             device), batch 1 / 8 / 32, rows at actual length 64 in a cache
             sized for max_seq_len 256 and 4096; one model, and K = 4 tenants in
             one mixed batch. The share of the roofline is the bytes the step
             must read (attention, norms, routers and LM head of its tenants,
             every distinct expert its tokens route to, the rows' KV pages) over
             the read bandwidth measured in the same run (the fastest of an XLA
             and a numpy reduction over 256 MB on every core).
  generate   end-to-end `generate`: prompts of 64 random ids, 64 greedy tokens,
             tokens/s = batch x 64 / wall time; against HF transformers eager
             `generate` on the same weights when torch is importable (--hf).
  engine     the serving engine on one short workload at max_seq_len 256 and
             4096 (tokens/s), mixed mode, K = 4.
  compile    the decode step's compile time against depth, L = 2, 8, 32 at tiny width.

Every figure is a median of repeats; the machine is shared, so compare ratios
taken in the same run.
"""

from __future__ import annotations

import json
import pathlib
import platform
import statistics
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Write the results as JSON here (and print them).")
flags.DEFINE_bool("hf", True, "Also time HF transformers eager generate (needs torch and transformers).")
flags.DEFINE_bool("quick", False, "Fewer repeats and steps (a smoke run).")
flags.DEFINE_integer("repeats", 5, "Timed repeats per figure (median reported).")

PAGE = 16
CONTEXT = 64


def bench_config(layers: int = 4, width: int = 256):
  from jaxmoe.families.mixtral.config import MixtralConfig

  return MixtralConfig(
    vocab_size=512,
    hidden_size=width,
    intermediate_size=2 * width,
    num_layers=layers,
    num_heads=8,
    num_kv_heads=2,
    num_experts=8,
    top_k=2,
    head_dim=width // 8,
    rope_theta=10000.0,
    max_position_embeddings=8192,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=0,
  )


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def read_bandwidth(repeats: int) -> float:
  """Bytes/s a memory-bound step can read from a 256 MB float32 array: the fastest of a jitted XLA sum
  (which XLA spreads over the cores) and numpy dot products of slices, one slice per core at once (numpy
  releases the GIL in them). Taking the fastest keeps the roofline shares from overstating."""
  import os
  from concurrent.futures import ThreadPoolExecutor

  import jax
  import jax.numpy as jnp
  import numpy as np

  x = np.ones(64 << 20, np.float32)
  on_device = jnp.asarray(x)
  xla_sum = jax.jit(jnp.sum)
  parts = np.array_split(x, os.cpu_count() or 1)
  with ThreadPoolExecutor(len(parts)) as pool:
    reads = [lambda: xla_sum(on_device).block_until_ready(), lambda: list(pool.map(lambda a: np.dot(a, a), parts))]
    for read in reads:
      read()
    return max(x.nbytes / median_time(read, repeats) for read in reads)


class StepBench:
  """A decode step over B rows at actual length CONTEXT, for one model or a mixed batch of tenants."""

  def __init__(self, store, tenants: list[str], batch: int, max_seq_len: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxmoe.families import base
    from jaxmoe.families.mixtral import model
    from jaxmoe.families.mixtral.engine import decode
    from jaxmoe.generation import contiguous_tables
    from jaxmoe.nn import moe_ops, paged
    from jaxmoe.nn.sampling import SamplingParams
    from jaxmoe.nn.tenancy import MixedTenants, SingleTenant

    cfg = store.config
    self.cfg, self.batch, self.decode = cfg, batch, decode
    width = -(-max_seq_len // PAGE)
    tables = contiguous_tables(batch, width)
    self.kv = model.init_kv(cfg, 1 + tables.size, PAGE)
    used = -(-(CONTEXT + 1) // PAGE)
    rows = paged.Rows(
      tables[:, : 1 << (used - 1).bit_length()],
      np.full(batch, CONTEXT, np.int32),
      np.ones(batch, bool),
      SamplingParams.full(batch),
    )
    self.rows = jax.device_put(rows)
    pool = jax.device_put(moe_ops.pack(store.pool))
    ids = np.arange(batch) % len(tenants)
    if len(tenants) == 1:
      t = tenants[0]
      self.params = jax.device_put({"backbone": store.backbones[t], "experts": pool, "slot_map": store.slot_maps[t]})
      self.ops = SingleTenant()
    else:
      stacked = base.stack_tenants(("layers",), [store.backbones[t] for t in tenants])
      smap = np.stack([store.slot_maps[t] for t in tenants])
      self.params = jax.device_put({"backbone": stacked, "experts": pool, "slot_map": smap})
      self.ops = MixedTenants(jnp.asarray(ids, jnp.int32), len(tenants))
    self.tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, batch), jnp.int32)
    self.weight_bytes = self._bytes_read(store, tenants, ids)

  def _bytes_read(self, store, tenants, ids) -> int:
    """Weights one step must read: its tenants' backbones (embedding rows aside), every distinct routed
    expert (counted from the step's own routing), and the rows' KV pages up to CONTEXT."""
    import numpy as np

    from jaxmoe.families.mixtral import layout, model

    cfg = self.cfg
    item = np.dtype(cfg.dtype).itemsize
    per_tenant = sum(int(np.prod(s)) for s in layout.layer_shapes(cfg).values()) * cfg.num_layers
    per_tenant += cfg.hidden_size * cfg.vocab_size + cfg.hidden_size  # LM head and final norm
    backbones = len(set(ids.tolist())) * per_tenant * item
    expert = 3 * cfg.hidden_size * cfg.intermediate_size * item
    experts = 0
    rng = np.random.default_rng(1)
    for t in sorted(set(ids.tolist())):  # the distinct experts each layer routes this step's tokens to
      rows = rng.integers(0, cfg.vocab_size, (int((ids == t).sum()), CONTEXT + 1))
      params = store.params(tenants[t])
      _, cap = model.forward(params, rows, cfg, capture=True)
      logits = np.asarray(cap["router_logits"][:, :, -1])  # [L, b, E] at the step's position
      chosen = np.argsort(-logits, axis=-1)[..., : cfg.top_k]
      slots = np.take_along_axis(np.asarray(params["slot_map"])[:, None, :], chosen, axis=-1)
      experts += sum(len(np.unique(slots[layer])) for layer in range(cfg.num_layers))
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (CONTEXT + 1) * self.batch * item
    return backbones + experts * expert + kv

  def run(self, steps: int):
    import jax

    from jaxmoe.nn.moe import Impl

    tokens, kv, rows = self.tokens, self.kv, self.rows
    for _ in range(steps):
      tokens, kv, rows = self.decode(self.params, tokens, kv, rows, self.cfg, Impl.AUTO, self.ops)
    jax.block_until_ready(tokens)
    self.kv = kv


def step_figures(store, bandwidth: float, repeats: int, steps: int) -> list[dict]:
  out = []
  for tenants in ([store.tenants[0]], list(store.tenants)):
    for batch in (1, 8, 32):
      for max_seq_len in (256, 4096):
        bench = StepBench(store, tenants, batch, max_seq_len)
        bench.run(2)  # compile and warm up
        seconds = median_time(lambda b=bench: b.run(steps), repeats) / steps
        roofline = bench.weight_bytes / bandwidth
        out.append(
          {
            "tenants": len(tenants),
            "batch": batch,
            "max_seq_len": max_seq_len,
            "context": CONTEXT,
            "step_ms": 1e3 * seconds,
            "tokens_per_s": batch / seconds,
            "bytes_read": bench.weight_bytes,
            "roofline_ms": 1e3 * roofline,
            "roofline_share": roofline / seconds,
          }
        )
        print(
          f"  step K={len(tenants)} B={batch:<2} max_seq_len={max_seq_len:<4}: {1e3 * seconds:6.2f} ms, "
          f"{batch / seconds:7.0f} tok/s, {100 * roofline / seconds:4.0f}% of the roofline",
          flush=True,
        )
  return out


def generate_figures(store, repeats: int) -> dict:
  import numpy as np

  from jaxmoe.families.mixtral import MixtralModel

  t = store.tenants[0]
  model = MixtralModel(store.config, store.export_params(t))
  out = {}
  for batch in (1, 8):
    prompts = np.random.default_rng(0).integers(0, store.config.vocab_size, (batch, 64))
    model.generate(prompts, 64, stop_at_eos=False)
    seconds = median_time(lambda p=prompts: model.generate(p, 64, stop_at_eos=False), repeats)
    out[batch] = batch * 64 / seconds
    print(f"  generate B={batch}: {out[batch]:.0f} tok/s", flush=True)
  return out


def hf_figures(store, repeats: int) -> dict | None:
  try:
    import torch
    import transformers
  except ImportError:
    print("  HF transformers: skipped (torch or transformers not installed)")
    return None
  import tempfile

  import numpy as np

  from jaxmoe.families.mixtral.export import write_hf

  torch.set_num_threads(2)
  with tempfile.TemporaryDirectory() as tmp:
    write_hf(store.config, store.export_params(store.tenants[0]), pathlib.Path(tmp) / "hf")
    model = transformers.MixtralForCausalLM.from_pretrained(pathlib.Path(tmp) / "hf", dtype=torch.float32).eval()
  out = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
  for batch in (1, 8):
    prompts = torch.tensor(np.random.default_rng(0).integers(0, store.config.vocab_size, (batch, 64)))
    kw = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=64, min_new_tokens=64, do_sample=False)
    with torch.no_grad():
      model.generate(prompts, **kw)
      seconds = median_time(lambda p=prompts, kw=kw: model.generate(p, **kw), repeats)
    out[batch] = batch * 64 / seconds
    print(f"  HF eager generate B={batch}: {out[batch]:.0f} tok/s", flush=True)
  return out


def engine_requests(store) -> list[dict]:
  """The engine figure's workload: 32 requests of 32 tokens after 16-token prompts, every tenant."""
  import numpy as np

  rng = np.random.default_rng(3)
  return [
    {
      "id": f"r{i}",
      "model": store.tenants[i % len(store.tenants)],
      "max_tokens": 32,
      "prompt_ids": rng.integers(0, 512, 16).tolist(),
    }
    for i in range(32)
  ]


def engine_run(store, reqs: list[dict], max_seq_len: int, overlap: bool = True) -> tuple[float, int]:
  """(tokens/s, decode steps) of a mixed-mode engine at batch 8 serving `reqs` to the end."""
  from jaxmoe.serving import Engine, EngineConfig, Mode

  engine = Engine(store, EngineConfig(mode=Mode.MIXED, max_batch=8, max_seq_len=max_seq_len, overlap=overlap))
  for r in reqs:
    engine.submit(dict(r))
  start = time.perf_counter()
  out = engine.run_until_done()
  return sum(len(o["token_ids"]) for o in out) / (time.perf_counter() - start), engine.decode_steps


def engine_figures(store, repeats: int) -> dict:
  reqs = engine_requests(store)
  out = {}
  for max_seq_len in (256, 4096):
    engine_run(store, reqs, max_seq_len)
    out[max_seq_len] = statistics.median(engine_run(store, reqs, max_seq_len)[0] for _ in range(repeats))
    print(f"  engine mixed K={len(store.tenants)} max_seq_len={max_seq_len}: {out[max_seq_len]:.0f} tok/s", flush=True)
  return out


def compile_figures() -> dict:
  import jax
  import numpy as np

  from jaxmoe.families.mixtral import layout, model
  from jaxmoe.families.mixtral.engine import decode
  from jaxmoe.generation import contiguous_tables
  from jaxmoe.nn import paged
  from jaxmoe.nn.moe import Impl
  from jaxmoe.nn.sampling import SamplingParams
  from jaxmoe.nn.tenancy import SingleTenant

  out = {}
  for layers in (2, 8, 32):
    cfg = bench_config(layers, width=64)
    params = jax.device_put(layout.init_params(cfg))
    kv = model.init_kv(cfg, 1 + 4, PAGE)
    rows = jax.device_put(
      paged.Rows(contiguous_tables(1, 4), np.zeros(1, np.int32), np.ones(1, bool), SamplingParams.full(1))
    )
    start = time.perf_counter()
    decode.lower(params, np.zeros(1, np.int32), kv, rows, cfg, Impl.AUTO, SingleTenant()).compile()
    out[layers] = time.perf_counter() - start
    print(f"  compile decode step L={layers}: {out[layers]:.2f} s", flush=True)
  return out


def main(argv):
  del argv
  import jax

  from jaxmoe.serving.synthetic import synthetic_store

  repeats = 2 if FLAGS.quick else FLAGS.repeats
  steps = 4 if FLAGS.quick else 32
  store = synthetic_store(bench_config(), 4, seed=0, own_fraction=0.25)
  bandwidth = read_bandwidth(repeats)
  print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
  doc = {
    "command": " ".join(["python", *sys.argv]),
    "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    "platform": platform.platform(),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "versions": {"jax": jax.__version__, "python": platform.python_version()},
    "read_bandwidth_gbps": bandwidth / 1e9,
    "steps": step_figures(store, bandwidth, repeats, steps),
    "generate_tokens_per_s": generate_figures(store, repeats),
    "hf_eager_tokens_per_s": hf_figures(store, repeats) if FLAGS.hf else None,
    "engine_tokens_per_s": engine_figures(store, repeats),
    "compile_s": compile_figures(),
  }
  if FLAGS.out:
    pathlib.Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(FLAGS.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
