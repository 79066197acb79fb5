"""Several hosts, one engine: `jax.distributed`, the scheduler on process 0, the others following its steps.

JAX runs multi-host programs multi-controller: every process runs the same
jitted step over the global mesh, each feeding its own devices. The engine's
scheduling (admission, tenant switches, `max_wait_s`) depends on arrival
times, so it cannot simply run everywhere; instead:

  process 0  runs the whole `Engine` (requests, scheduler, detokenizer,
             responses). Before each device step its `MeshHooks` hand the
             step's host inputs to `Leader`, which broadcasts them.
  others     build the same `Engine` (the same store, config and mesh: their
             shards of the pool, the replicated backbones and KV cache) and
             run `follow`: receive a step, pick the same params (tenant or
             mixed ids), run the same jitted program on their devices.

A step plan is a few small arrays (token ids, block tables, lengths, sampling
settings, the tenant): serialised with `np.savez` (no pickle), sent as bytes
with `jax.experimental.multihost_utils.broadcast_one_to_all`, which is itself
a collective over every process's devices, so no transport besides JAX's own
runtime is involved. The payload is padded to a power of two, so the
broadcast compiles a handful of programs. A decode step that continues from
the previous one sends no rows: followers keep the rows their own last step
returned, as process 0 does.

With an expert cache smaller than the pool (jaxmoe/serving/experts.py) every
process keeps the same cache bookkeeping: each layer's routed slots are
gathered from every process (a collective at the same point of the same
step), so all make the same misses, evictions and prefetches in the same
order, and each writes only its own devices' blocks.

`initialize` starts `jax.distributed` from flags or the environment
(`JAXMOE_COORDINATOR`, `JAXMOE_NUM_PROCESSES`, `JAXMOE_PROCESS_ID`); with none
of them it is a no-op (one process). A device step that fails on one process
fails the whole run (the processes would diverge otherwise). While process 0
is idle it sends an empty plan every 30 s (`Leader`), as CPU collectives
time out when processes arrive far apart.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time

import jax
import numpy as np

from jaxmoe import buckets
from jaxmoe.nn import paged
from jaxmoe.nn.sampling import SamplingParams
from jaxmoe.nn.tenancy import MixedTenants, SingleTenant


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  cpu_collectives: str = "gloo",
) -> bool:
  """Starts jax.distributed when a coordinator or a process count is given (args, else environment).

  Returns whether it did. On CPUs, cross-process collectives need an
  implementation (`jax_cpu_collectives_implementation`: gloo by default).
  """
  coordinator = coordinator or os.environ.get("JAXMOE_COORDINATOR") or None
  if num_processes is None and os.environ.get("JAXMOE_NUM_PROCESSES"):
    num_processes = int(os.environ["JAXMOE_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAXMOE_PROCESS_ID"):
    process_id = int(os.environ["JAXMOE_PROCESS_ID"])
  if coordinator is None and (num_processes is None or num_processes <= 1):
    return False
  if cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  return True


def is_leader() -> bool:
  return jax.process_index() == 0


def _broadcast(payload: bytes | None) -> bytes:
  """Process 0's bytes on every process (a collective: every process must call it, in the same order)."""
  from jax.experimental import multihost_utils

  source = is_leader()
  n = np.array([len(payload) if source else 0], np.int32)
  n = int(np.asarray(multihost_utils.broadcast_one_to_all(n, source))[0])
  buf = np.zeros(buckets.pow2(max(n, 64), 1 << 40), np.uint8)
  if source:
    buf[:n] = np.frombuffer(payload, np.uint8)
  return np.asarray(multihost_utils.broadcast_one_to_all(buf, source))[:n].tobytes()


def _pack(plan: dict) -> bytes:
  out = io.BytesIO()
  np.savez(out, **{k: np.asarray(v) for k, v in plan.items()})
  return out.getvalue()


def _unpack(data: bytes) -> dict:
  with np.load(io.BytesIO(data), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _flat_rows(rows: paged.Rows) -> dict:
  out = {}
  for f in dataclasses.fields(rows):
    v = getattr(rows, f.name)
    if isinstance(v, SamplingParams):
      out.update({f"rows.sampling.{g.name}": np.asarray(getattr(v, g.name)) for g in dataclasses.fields(v)})
    elif v is not None:
      out[f"rows.{f.name}"] = np.asarray(v)
  return out


def _rows(plan: dict) -> paged.Rows:
  sp = {k.split(".")[-1]: v for k, v in plan.items() if k.startswith("rows.sampling.")}
  fields = {k.split(".")[-1]: v for k, v in plan.items() if k.startswith("rows.") and "sampling" not in k}
  return paged.Rows(sampling=SamplingParams(**sp), **fields)


class Leader:
  """Process 0's side: broadcasts each device step's inputs before running it (`MeshHooks.observer`).

  CPU (gloo) collectives give up when the processes arrive too far apart, so
  while process 0 has nothing to run (a server between requests) a thread
  sends an empty plan every `keepalive_s`. `lock` orders those against the
  steps: `MeshHooks` holds it from a step's broadcast to its dispatch, so
  every process launches its collectives in the same order.
  """

  def __init__(self, engine, keepalive_s: float | None = 30.0):
    self.engine = engine
    self.last_rows = None  # the rows the last decode returned: followers hold their own copy of them
    self.lock = threading.RLock()
    self.last_sent = time.monotonic()
    self._stopped = threading.Event()
    if keepalive_s:
      threading.Thread(target=self._keepalive, args=(keepalive_s,), daemon=True, name="jaxmoe-keepalive").start()

  def _keepalive(self, every: float) -> None:
    while not self._stopped.wait(every / 4):
      with self.lock:
        if not self._stopped.is_set() and time.monotonic() - self.last_sent >= every:
          self._send({"op": np.array("noop")})

  def _send(self, plan: dict) -> None:
    _broadcast(_pack(plan))
    self.last_sent = time.monotonic()

  def __call__(self, op: str, tokens, rows, ops) -> None:
    plan = {"op": np.array(op), "tokens": np.asarray(tokens)}
    if isinstance(ops, MixedTenants):
      plan["ids"] = np.asarray(ops.ids)
    else:
      plan["tenant"] = np.array(self.engine.weights.index[self.engine.weights.active], np.int32)
    if op == "decode" and rows is self.last_rows and rows is not None:
      plan["reuse_rows"] = np.array(1)
    else:
      plan.update(_flat_rows(rows))
    self._send(plan)

  def returned(self, op: str, rows) -> None:
    if op == "decode":
      self.last_rows = rows

  def stop(self) -> None:
    """Ends the followers' loops (call once, when process 0 is done serving)."""
    with self.lock:
      if not self._stopped.is_set():
        self._stopped.set()
        self._send({"op": np.array("stop")})


def lead(engine):
  """Makes `engine` (on process 0) broadcast its steps when several processes run; returns it."""
  if jax.process_count() > 1:
    if getattr(engine, "mesh", None) is None:
      raise ValueError("several processes need a mesh over their devices: pass --mesh")
    engine.family.observer = Leader(engine)
  return engine


def stop(engine) -> None:
  observer = getattr(engine.family, "observer", None)
  if isinstance(observer, Leader):
    observer.stop()


def follow(engine) -> int:
  """A follower's loop: runs process 0's steps on this process's devices until it stops. Returns steps run."""
  hooks, weights, steps, rows = engine.family, engine.weights, 0, None
  while True:
    plan = _unpack(_broadcast(None))
    op = str(plan["op"])
    if op == "stop":
      return steps
    if op == "noop":
      continue
    if "ids" in plan:
      params, ops = weights.stacked, MixedTenants(plan["ids"], len(weights.tenants))
    else:
      params, ops = weights.params(weights.tenants[int(plan["tenant"])]), SingleTenant()
    given = rows if "reuse_rows" in plan else _rows(plan)
    out, engine.kv, new_rows = hooks.run(
      op, params, plan["tokens"], engine.kv, given, engine.cfg, engine.config.impl, ops, weights.cache
    )
    if op == "decode":
      rows = new_rows
    np.asarray(out)  # keep pace with process 0, which reads every step's tokens
    steps += 1
