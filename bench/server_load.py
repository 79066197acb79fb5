"""Loopback load test of jaxmoe-server, against the engine driven directly on the same workload.

  python bench/server_load.py [--clients=64] [--duration_s=60] [--out=bench/results/server]

Builds a tiny store (K tenants, byte vocabulary, half the experts shared, chat
templates for all but the last tenant), starts `jaxmoe-server` on a free
loopback port as a child process, and runs closed loops with `--clients`
requests in flight over one deterministic request sequence (every tenant;
completions with text or token-id prompts, chat, greedy and seeded sampling,
stop strings):

  direct  the same Engine config driven in this process (submit/step), no HTTP,
          for half of `--duration_s` before the HTTP run and half after;
  http    `--clients` concurrent streaming clients for `--duration_s` (a lean
          keep-alive HTTP/1.1 client each); every `--bad_every`-th request is
          a bad one from a catalogue (httpx), each with the status it must get.

Both warm up first (every admission bucket, then load), so neither compiles
while timed. Reported: tokens/s of each and their ratio, requests/s, client
TTFT/TPOT percentiles, errors, the server's memory at start and end, and
whether every good request that both loops served got identical tokens.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

from absl import app, flags
from sse_client import Connection, Load, send_good

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
flags.DEFINE_integer("clients", 64, "Concurrent streaming clients (and requests in flight when direct).")
flags.DEFINE_float("duration_s", 60.0, "Timed seconds per loop.")
flags.DEFINE_float("warmup_s", 15.0, "Seconds of load before each timed loop (after the bucket warm-up).")
flags.DEFINE_integer("k", 4, "Tenants.")
flags.DEFINE_integer("max_batch", 16, "Engine rows.")
flags.DEFINE_integer("max_seq_len", 128, "Engine max_seq_len.")
flags.DEFINE_integer("bad_every", 10, "Every n-th HTTP request is a bad one.")
flags.DEFINE_string("mode", "mixed", "Engine mode.")
flags.DEFINE_float("stream_interval_s", 0.0, "The server's --stream_interval_s.")
flags.DEFINE_bool("overlap", True, "EngineConfig.overlap of both loops (the server's --overlap).")
flags.DEFINE_string("out", None, "Folder for server_load.json.")
KEY = "bench-key"
TEMPLATE = "{% for m in messages %}{{ m.role[0] }}{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
LETTERS = "abcdefghijklmnopqrstuvwxyz     "


def build_store(root: pathlib.Path, k: int) -> pathlib.Path:
  from jaxmoe.consolidate.pipeline import ConsolidateConfig, consolidate
  from jaxmoe.families.mixtral import config
  from jaxmoe.io import checkpoint
  from jaxmoe.serving.synthetic import synthetic_store

  mem = synthetic_store(config.preset("tiny"), k=k, seed=5, own_fraction=0.5, noise=0.05)
  for name in mem.tenants:
    checkpoint.save(root / name, mem.config, mem.export_params(name))
  store = root / "store"
  consolidate([(n, root / n) for n in mem.tenants], store, ConsolidateConfig(share_fraction=0.5))
  for name in mem.tenants[:-1]:
    (store / "backbones" / name / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
  return store


def good_request(i: int, tenants: list[str]) -> tuple[str, dict]:
  """Request i of the sequence: (endpoint, OpenAI body); prompts within 16 tokens (two buckets)."""
  import numpy as np

  rng = np.random.default_rng(1000 + i)
  tenant = tenants[i % len(tenants)]
  text = "".join(rng.choice(list(LETTERS), int(rng.integers(5, 14))))
  body = {"model": tenant, "max_tokens": int(rng.integers(8, 49))}
  if rng.random() < 0.5:
    body.update(temperature=0.8, top_p=0.95, seed=int(rng.integers(0, 1000)))
  if rng.random() < 0.2:
    body["stop"] = [str(rng.choice(list("xyz")))]
  kind = rng.random()
  if kind < 0.15 and tenant != tenants[-1]:
    return "chat", {**body, "messages": [{"role": "user", "content": text[:9]}]}
  if kind < 0.3:
    return "completions", {**body, "prompt": [256, *rng.integers(0, 256, len(text)).tolist()]}
  return "completions", {**body, "prompt": text}


def bad_request(j: int, tenants: list[str]) -> tuple[str, dict, int]:
  """The j-th bad request: (path, httpx kwargs, status it must get)."""
  t = tenants[0]
  ok = {"model": t, "prompt": "x"}
  catalogue = [
    ("/v1/completions", {"json": {"model": "ghost", "prompt": "x"}}, 404),
    ("/v1/completions", {"json": {**ok, "max_tokens": -3}}, 400),
    ("/v1/completions", {"json": {**ok, "prompt": "p" * 300}}, 400),
    ("/v1/completions", {"json": {**ok, "n": 3}}, 400),
    ("/v1/completions", {"content": b'{"model": "' + t.encode(), "headers": {"content-type": "application/json"}}, 400),
    ("/v1/completions", {"json": {**ok, "frobnicate": 1}}, 400),
    ("/v1/completions", {"json": {**ok, "temperature": "warm"}}, 400),
    ("/v1/chat/completions", {"json": {"model": tenants[-1], "messages": [{"role": "user", "content": "x"}]}}, 400),
    ("/v1/completions", {"json": {**ok, "prompt": "z" * (2 << 20)}}, 413),
    ("/v1/completions", {"json": ok, "headers": {"authorization": "Bearer nope"}}, 401),
    (
      "/v1/completions",
      {"content": b'{"model": "t", "prompt": "\xff"}', "headers": {"content-type": "application/json"}},
      400,
    ),
  ]
  return catalogue[j % len(catalogue)]


def engine_request(endpoint: str, body: dict, chats: dict) -> dict:
  """The engine's form of an OpenAI body (chat rendered with the server's own template code)."""
  out = {k: v for k, v in body.items() if k in ("model", "max_tokens", "temperature", "top_p", "stop", "seed")}
  if endpoint == "chat":
    out["prompt_ids"] = chats[body["model"]].prompt_ids(body["messages"])
  elif isinstance(body["prompt"], list):
    out["prompt_ids"] = body["prompt"]
  else:
    out["prompt"] = body["prompt"]
  return out


def percentiles(values: list[float]) -> dict:
  import numpy as np

  if not values:
    return {}
  return {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}


# The engine driven directly.
def prompt_tokens(r: dict) -> int:
  return len(r["prompt_ids"]) if "prompt_ids" in r else len(r["prompt"].encode()) + 1  # BOS


def warm_buckets(engine, reqs: list[dict], max_batch: int) -> None:
  """Admits groups of every power-of-two size at both prompt buckets, so no bucket compiles later."""
  size = 1
  while size <= max_batch:
    for long in (False, True):
      pick = [r for r in reqs if (prompt_tokens(r) > 8) == long][:size]
      for j, r in enumerate(pick):
        engine.submit({**r, "id": f"warm-{size}-{long}-{j}"})
      engine.run_until_done()
    size *= 2


def run_direct(store, cfg, reqs: list[dict], clients: int, duration_s: float, warmup_s: float) -> dict:
  from jaxmoe.serving import Engine
  from jaxmoe.serving.engine import compilations

  stamps: list[float] = []
  engine = Engine(store, cfg, on_token=lambda rid, tok, delta: stamps.append(time.perf_counter()))
  warm_buckets(engine, reqs, cfg.max_batch)
  compiled_before = None
  out, i, inflight, tag, completed = {}, 0, 0, "w", 0
  start = time.perf_counter()
  timed_from, end = start + warmup_s, start + warmup_s + duration_s
  while time.perf_counter() < end:
    if compiled_before is None and time.perf_counter() >= timed_from:
      compiled_before, i, tag = compilations(), 0, "t"  # the timed loop starts the sequence over, as HTTP's
    while inflight < clients:
      engine.submit({**reqs[i % len(reqs)], "id": f"{tag}{i % len(reqs)}"})
      i, inflight = i + 1, inflight + 1
    for r in engine.step():
      inflight -= 1
      if r["id"].startswith("t") and time.perf_counter() < end:
        out[r["id"]] = r  # the last answer of each request index, to compare tokens with HTTP
        completed += 1
  compiled = compilations() - (compiled_before or 0)
  engine.close()
  tokens = sum(timed_from <= s < end for s in stamps)
  done = list(out.values())
  return {
    "tokens_per_s": tokens / duration_s,
    "requests_per_s": completed / duration_s,
    "errors": sum(r["error"] is not None for r in done),
    "ttft_s": percentiles([r["timings"]["ttft_s"] for r in done if r["error"] is None]),
    "tpot_s": percentiles(
      [r["timings"]["tpot_s"] for r in done if r["error"] is None and r["usage"]["completion_tokens"] > 1]
    ),
    "compiled_while_timed": compiled,
    "token_ids": {int(k[1:]): r["token_ids"] for k, r in out.items() if r["error"] is None},
  }


# Through HTTP.
async def send_bad(http, base: str, j: int, tenants: list[str], load: Load) -> None:
  path, kwargs, status = bad_request(j, tenants)
  kwargs = dict(kwargs)
  headers = {"authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}
  try:
    r = await http.post(base + path, headers=headers, **kwargs)
    message = r.json()["error"]["message"]
  except Exception as e:
    load.mismatched.append((j, status, f"{type(e).__name__}: {e}"[:200]))
    return
  if r.status_code != status or not message:
    load.mismatched.append((j, status, r.status_code, message[:200]))
  elif load.timed(time.perf_counter()):
    load.answered_bad += 1


async def client(http, base: str, goods: list, tenants: list[str], load: Load, bad_every: int) -> None:
  host, port = base.removeprefix("http://").rsplit(":", 1)
  conn = Connection(host, int(port), KEY)
  while time.perf_counter() < load.end:
    n, load.next = load.next, load.next + 1
    if n % bad_every == bad_every - 1:
      load.bad += 1
      await send_bad(http, base, load.bad - 1, tenants, load)
    else:
      load.good += 1
      g = load.good - 1
      await send_good(conn, g % len(goods), goods[g % len(goods)], load)
  conn.close()


async def warm_http(http, base: str, goods: list, reqs: list[dict], max_batch: int) -> None:
  """Bursts of every power-of-two size at both prompt buckets (as `warm_buckets`, over HTTP)."""
  load = Load(0.0, 0.0)
  host, port = base.removeprefix("http://").rsplit(":", 1)
  conns = [Connection(host, int(port), KEY) for _ in range(max_batch)]
  size = 1
  while size <= max_batch:
    for long in (False, True):
      pick = [g for g, r in enumerate(reqs) if (prompt_tokens(r) > 8) == long][:size]
      await asyncio.gather(*(send_good(c, g, goods[g], load) for c, g in zip(conns, pick)))
    size *= 2
  for c in conns:
    c.close()
  if load.failures:
    raise RuntimeError(f"warm-up requests failed: {load.failures[:3]}")


async def run_http(base: str, goods: list, reqs: list[dict], tenants: list[str], on_timed) -> Load:
  """Bucket bursts, then untimed load until a round compiles nothing, then the timed load."""
  import httpx

  clients, warmup_s, duration_s = FLAGS.clients, FLAGS.warmup_s, FLAGS.duration_s
  limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
  async with httpx.AsyncClient(limits=limits, timeout=120) as http:
    await warm_http(http, base, goods, reqs, FLAGS.max_batch)
    for _ in range(8):
      before = server_metric(base, "jaxmoe_server_compiled_programs")
      warm = Load(time.perf_counter() + warmup_s, time.perf_counter() + warmup_s)  # an empty timed window
      await asyncio.gather(*(client(http, base, goods, tenants, warm, FLAGS.bad_every) for _ in range(clients)))
      if server_metric(base, "jaxmoe_server_compiled_programs") == before:
        break
    on_timed()
    start = time.perf_counter()
    load = Load(start, start + duration_s)
    await asyncio.gather(*(client(http, base, goods, tenants, load, FLAGS.bad_every) for _ in range(clients)))
  return load


def start_server(store: pathlib.Path, log_path: pathlib.Path):
  cmd = [
    sys.executable, "-m", "jaxmoe.cli.server", f"--store={store}", "--port=0", f"--mode={FLAGS.mode}",
    f"--max_batch={FLAGS.max_batch}", f"--max_seq_len={FLAGS.max_seq_len}", f"--max_waiting={4 * FLAGS.clients}",
    f"--api_key={KEY}", f"--stream_interval_s={FLAGS.stream_interval_s}", f"--overlap={FLAGS.overlap}",
  ]  # fmt: skip
  env = {**__import__("os").environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True, env=env, cwd=REPO)
  line = proc.stdout.readline()
  if "listening on" not in line:
    raise RuntimeError(f"the server did not start: {line!r}; see {log_path}")
  return proc, line.rsplit(" ", 1)[-1].strip()


def server_metric(base: str, name: str) -> float:
  import httpx
  from prometheus_client.parser import text_string_to_metric_families

  text = httpx.get(base + "/metrics").text
  return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def rss(pid: int) -> int:
  import psutil

  return psutil.Process(pid).memory_info().rss


def load_avg() -> list[float]:
  import os

  return [round(x, 2) for x in os.getloadavg()]


def summarize(directs: list[dict], load, mem: dict, compiled: float, duration_s: float) -> dict:
  """The report; `directs`: the direct runs before and after the HTTP run (half the time each)."""
  token_ids = {g: t for d in directs for g, t in d["token_ids"].items()}
  same = [g for g in load.token_ids if g in token_ids]
  direct_rate = sum(d["tokens_per_s"] for d in directs) / len(directs)
  http = {
    "tokens_per_s": load.tokens / duration_s,
    "requests_per_s": load.served / duration_s,
    "bad_answered_per_s": load.answered_bad / duration_s,
    "good_sent": load.good,
    "good_failed": len(load.failures),
    "bad_sent": load.bad,
    "bad_wrong_answer": len(load.mismatched),
    "ttft_s": percentiles(load.ttft),
    "tpot_s": percentiles(load.tpot),
    "compiled_while_timed": compiled,
    "failures": load.failures[:10],
    "mismatched": load.mismatched[:10],
  }
  return {
    "direct_before": {k: v for k, v in directs[0].items() if k != "token_ids"},
    "direct_after": {k: v for k, v in directs[1].items() if k != "token_ids"},
    "http": http,
    "direct_tokens_per_s": direct_rate,
    "http_over_direct_tokens_per_s": http["tokens_per_s"] / direct_rate,
    "server_rss_bytes": mem,
    "rss_growth_timed": mem["end"] / mem["timed_start"] - 1,
    "identical_tokens": {
      "compared": len(same),
      "equal": sum(load.token_ids[g] == token_ids[g] for g in same),
    },
  }


def measure(store_dir: pathlib.Path, root: pathlib.Path) -> dict:
  import httpx

  import jaxmoe
  from jaxmoe.server.chat import load_chats
  from jaxmoe.serving import EngineConfig, Mode

  store = jaxmoe.load_store(store_dir)
  goods = [good_request(i, store.tenants) for i in range(2000)]
  chats = load_chats(store)
  reqs = [engine_request(e, b, chats) for e, b in goods]
  cfg = EngineConfig(
    mode=Mode(FLAGS.mode), max_batch=FLAGS.max_batch, max_seq_len=FLAGS.max_seq_len, overlap=FLAGS.overlap
  )
  proc, base = start_server(store_dir, root / "server.log")
  try:
    mem = {"start": rss(proc.pid)}
    # Direct runs bracket the HTTP run (half its time before, half after), so load that other work
    # puts on a shared machine weighs on both alike.
    half = FLAGS.duration_s / 2
    directs = [run_direct(store, cfg, reqs, FLAGS.clients, half, FLAGS.warmup_s)]
    print(f"direct: {directs[0]['tokens_per_s']:.1f} tokens/s", flush=True)
    marks = {}

    def on_timed():
      mem["timed_start"] = rss(proc.pid)
      marks["compiled"] = server_metric(base, "jaxmoe_server_compiled_programs")
      print(f"http: warmed up, timing {FLAGS.duration_s:.0f} s", flush=True)

    load = asyncio.run(run_http(base, goods, reqs, store.tenants, on_timed))
    mem["end"] = rss(proc.pid)
    compiled = server_metric(base, "jaxmoe_server_compiled_programs") - marks["compiled"]
    health = httpx.get(base + "/health").json()
    print(f"http: {load.tokens / FLAGS.duration_s:.1f} tokens/s", flush=True)
    directs.append(run_direct(store, cfg, reqs, FLAGS.clients, half, 2.0))
  finally:
    proc.terminate()
    proc.wait(60)
  out = summarize(directs, load, mem, compiled, FLAGS.duration_s)
  out["server_alive_at_end"] = health["status"] == "ok"
  return out


def main(argv):
  del argv
  import logging

  import jax

  logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
  load_before = load_avg()
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    results = measure(build_store(root, FLAGS.k), root)
  names = (
    "clients",
    "duration_s",
    "warmup_s",
    "k",
    "max_batch",
    "max_seq_len",
    "bad_every",
    "mode",
    "stream_interval_s",
  )
  report = {
    "bench": "server_load",
    "date": time.strftime("%Y-%m-%d %H:%M"),
    "platform": platform.platform(),
    "cpus": __import__("os").cpu_count(),
    "jax": jax.__version__,
    "load_avg_before": load_before,
    "load_avg_after": load_avg(),
    "flags": {k: FLAGS[k].value for k in names},
    **results,
  }
  print(json.dumps(report, indent=1))
  if FLAGS.out:
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    name = (
      "server_load.json" if not FLAGS.stream_interval_s else f"server_load_interval{FLAGS.stream_interval_s:g}.json"
    )
    (out / name).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  sys.path.insert(0, str(REPO))
  app.run(main)
