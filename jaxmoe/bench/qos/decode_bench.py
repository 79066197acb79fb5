"""Decode throughput of one Mixtral model at several batch sizes (profile gpu-mixtral32-single).

Weights are random, made on the device leaf by leaf inside jit
(`jax.random`), never through host numpy: Mixtral-8x7B is ~93 GB in bf16.
The paged KV pool is filled with random keys and values, each row having
filled `context` positions of its pages, also on the device. There is no
prefill: the figure is decode only (as HF's per-step figures are), and no large
prefill program has to compile.

Per batch size: compile one greedy decode step (the serving engine's jitted
step, sampling on the device), in a thread with a progress line every 15 s; past
`compile_timeout_s` the results so far are written and the process exits with
status 3 (XLA cannot be interrupted). Then warm-up steps, then `steps` timed
steps, each feeding its tokens to the next, blocked once at the end:
tokens/s = batch * steps / seconds. Compared with HF transformers `generate`
on the same shape (measured separately); the goal is `goal_factor` (10) times HF.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.devices import free
from jaxmoe.families.mixtral import model as mixtral
from jaxmoe.families.mixtral.engine import decode
from jaxmoe.families.mixtral.layout import identity_slot_map, param_shapes
from jaxmoe.generation import contiguous_tables
from jaxmoe.nn import paged
from jaxmoe.nn.sampling import SamplingParams
from jaxmoe.nn.tenancy import SingleTenant
from jaxmoe.trees import tree_bytes


class CompileTimeout(RuntimeError):
  pass


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _random(key, shape, dtype, scale, offset):
  return (offset + scale * jax.random.normal(key, shape, dtype)).astype(dtype)


def random_params(cfg, seed: int = 0, scale: float = 0.02) -> dict:
  """A whole model (served layout, identity slot map) with random weights, made on the device."""
  dtype, root = jnp.dtype(cfg.dtype), jax.random.key(seed)
  tree = param_shapes(cfg)
  slot_shape = tree.pop("slot_map")
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))
  leaves = []
  for i, (path, shape) in enumerate(flat):
    norm = "norm" in jax.tree_util.keystr(path)
    std, mean = (0.1, 1.0) if norm else (scale, 0.0)
    leaves.append(_random(jax.random.fold_in(root, i), shape, dtype, std, mean))
  params = jax.tree.unflatten(treedef, leaves)
  params["slot_map"] = jnp.asarray(identity_slot_map(cfg)).reshape(slot_shape)
  return jax.block_until_ready(params)


PAGE_SIZE = 16


@functools.partial(jax.jit, static_argnames=("cfg", "pages_per_layer"))
def random_cache(key, cfg, pages_per_layer: int) -> paged.PagedKV:
  """A paged KV pool filled with random keys and values (made on the device)."""
  kv = mixtral.init_kv(cfg, pages_per_layer, PAGE_SIZE)
  k1, k2 = jax.random.split(key)
  return kv.replace(k=jax.random.normal(k1, kv.k.shape, kv.k.dtype), v=jax.random.normal(k2, kv.v.shape, kv.v.dtype))


def greedy_rows(batch: int, max_len: int, context: int) -> paged.Rows:
  """Rows that have each filled `context` positions of their own pages, decoding greedily."""
  width = -(-max_len // PAGE_SIZE)
  tables = contiguous_tables(batch, width)
  lengths = np.full(batch, context, np.int32)
  return paged.Rows(tables, lengths, np.ones(batch, bool), SamplingParams.full(batch))


def greedy_step(params, tokens, kv, rows, cfg, impl):
  """One decode step for every row, sampling on the device: (next tokens [B], kv, rows)."""
  return decode(params, tokens, kv, rows, cfg, impl, SingleTenant())


def with_watchdog(fn: Callable, timeout_s: float, label: str, log: Callable[[str], None]):
  """Runs fn() in a thread, logging every 15 s; raises CompileTimeout past timeout_s."""
  box: dict = {}

  def target():
    try:
      box["out"] = jax.block_until_ready(fn())
    except BaseException as e:  # noqa: BLE001  re-raised in the caller's thread
      box["error"] = e

  start = time.perf_counter()
  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  while thread.is_alive():
    thread.join(timeout=15.0)
    elapsed = time.perf_counter() - start
    if thread.is_alive():
      log(f"  {label}: compiling, {elapsed:.0f} s")
      if elapsed > timeout_s:
        raise CompileTimeout(f"{label}: compile did not finish within {timeout_s:.0f} s")
  if "error" in box:
    raise box["error"]
  return box["out"], time.perf_counter() - start


def bench_batch(params, profile, batch: int, log) -> dict:
  cfg = profile.model
  max_len = profile.context + profile.warmup_steps + profile.steps + 2
  rows = jax.device_put(greedy_rows(batch, max_len, profile.context))
  cache = random_cache(jax.random.key(profile.seed + batch), cfg, 1 + rows.tables.size)
  tokens = jnp.zeros((batch,), jnp.int32)
  (tokens, cache, rows), first_s = with_watchdog(
    lambda: greedy_step(params, tokens, cache, rows, cfg, profile.impl),
    profile.compile_timeout_s,
    f"batch {batch}",
    log,
  )
  for _ in range(profile.warmup_steps):
    tokens, cache, rows = greedy_step(params, tokens, cache, rows, cfg, profile.impl)
  tokens.block_until_ready()
  start = time.perf_counter()
  for _ in range(profile.steps):
    tokens, cache, rows = greedy_step(params, tokens, cache, rows, cfg, profile.impl)
  tokens.block_until_ready()
  seconds = time.perf_counter() - start
  free(cache)
  return {
    "batch": batch,
    "compile_and_first_step_s": first_s,
    "ms_per_step": 1e3 * seconds / profile.steps,
    "tokens_per_s": batch * profile.steps / seconds,
  }


def _compare(row: dict, profile) -> dict:
  hf = dict(profile.hf_tokens_per_s).get(row["batch"])
  if hf is None or "tokens_per_s" not in row:
    return row
  return row | {
    "hf_tokens_per_s": hf,
    "speedup_vs_hf": row["tokens_per_s"] / hf,
    "goal_tokens_per_s": profile.goal_factor * hf,
    "goal_met": row["tokens_per_s"] >= profile.goal_factor * hf,
  }


def run(profile, out_dir, env: dict, log: Callable[[str], None] = print) -> dict:
  """Runs every batch size and writes results.json, decode.csv, a plot and README.md."""
  from jaxmoe.bench.qos import report

  start = time.perf_counter()
  log(f"{profile.name}: making random weights on {jax.devices()[0].device_kind}")
  params = random_params(profile.model, profile.seed)
  doc = {
    "meta": env,
    "profile": report.jsonable(profile),
    "weight_bytes": tree_bytes(params),
    "parameters": sum(x.size for x in jax.tree.leaves(params)),
    "results": [],
  }
  log(
    f"  {doc['parameters'] / 1e9:.2f}B parameters, {doc['weight_bytes'] / 1e9:.1f} GB, "
    f"made in {time.perf_counter() - start:.1f} s"
  )
  timed_out = False
  for batch in profile.batches:
    try:
      row = _compare(bench_batch(params, profile, batch, log), profile)
    except CompileTimeout as e:
      row, timed_out = {"batch": batch, "error": str(e)}, True
    doc["results"].append(row)
    log(
      f"  batch {batch}: "
      + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "batch")
    )
    if timed_out:
      break
  doc["meta"]["runtime_s"] = time.perf_counter() - start
  write(pathlib.Path(out_dir), doc)
  if timed_out:
    log("a compile timed out; results written; exiting (status 3) since XLA cannot be interrupted")
    os._exit(3)
  return doc


def write(out: pathlib.Path, doc: dict) -> None:
  from jaxmoe.bench.qos import report

  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(doc, indent=1))
  report.write_csv(out / "decode.csv", doc["results"])
  rows = [r for r in doc["results"] if "tokens_per_s" in r]
  if rows:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["tokens_per_s"] for r in rows], 0.4, label="jaxmoe")
    ax.bar([x + 0.2 for x in xs], [r.get("hf_tokens_per_s", 0) for r in rows], 0.4, label="HF transformers")
    ax.set_xticks(list(xs), [f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "decode_tokens_per_s.png", dpi=110)
    plt.close(fig)
  m = doc["meta"]
  lines = [
    f"# Decode throughput: {doc['profile']['name']}",
    "",
    f"- date: {m['date']}",
    f"- command: `{m['command']}`",
    f"- device: {m['device']} ({m['backend']}), {m['platform']}",
    f"- versions: jax {m['jax']}, jaxlib {m['jaxlib']}, git {m['git_commit']}",
    "",
    "| batch | ms/step | tokens/s | HF tokens/s | x HF | goal |",
    "|---|---|---|---|---|---|",
  ]
  for r in doc["results"]:
    if "error" in r:
      lines.append(f"| {r['batch']} | {r['error']} | | | | |")
      continue
    hf = r.get("hf_tokens_per_s")
    goal = "-" if "goal_met" not in r else ("met" if r["goal_met"] else "not met")
    speedup = f"{r['speedup_vs_hf']:.1f}" if "speedup_vs_hf" in r else "-"
    lines.append(
      f"| {r['batch']} | {r['ms_per_step']:.1f} | {r['tokens_per_s']:.1f} | {hf or '-'} | {speedup} | {goal} |"
    )
  (out / "README.md").write_text("\n".join(lines) + "\n")
