"""Two processes over loopback (jax.distributed, gloo CPU collectives) serve a tiny store with jaxmoe-serve.

Each process forces 2 host devices; the mesh expert:2,data:2 spans both
processes with its expert axis, so the pool's slots are split across them
(each reads only its half from the store) and every decode step's all-reduce
crosses the process boundary; the batch's rows are split over each process's
two devices. Process 0 runs the scheduler; process 1 follows its broadcast
steps. The answers must equal
a one-device jaxmoe-serve of the same file, token for token.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxmoe.consolidate.pipeline import ConsolidateConfig, consolidate
from jaxmoe.families.mixtral import config
from jaxmoe.io import checkpoint
from jaxmoe.serving.synthetic import synthetic_store
from tests.helpers import cpu_devices_env

TIMEOUT_S = 240


def _has_cpu_collectives() -> bool:
  return bool(getattr(jax.config, "jax_cpu_collectives_implementation", None))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  mem = synthetic_store(config.preset("tiny"), k=3, seed=2, own_fraction=0.5, noise=0.05)
  pairs = []
  for name in mem.tenants:
    checkpoint.save(root / name, mem.config, mem.export_params(name))
    pairs.append((name, root / name))
  consolidate(pairs, root / "store", ConsolidateConfig(share_fraction=0.0))
  rng = np.random.default_rng(0)
  lines = [
    {
      "id": f"r{i}",
      "model": mem.tenants[i % 3],
      "prompt_ids": rng.integers(0, 256, 2 + i % 4).tolist(),
      "max_tokens": 3,
    }
    for i in range(6)
  ]
  (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  return root


def _serve_args(root, out, *extra):
  return [
    sys.executable,
    "-m",
    "jaxmoe.cli.serve",
    f"--store={root / 'store'}",
    "--mode=mixed",
    "--max_batch=2",
    "--max_seq_len=16",
    "--noprogress",
    *extra,
  ] + ([f"--requests={root / 'in.jsonl'}", f"--out={out}"] if out is not None else [])


def _tokens(path) -> dict:
  return {r["id"]: (r["token_ids"], r["error"]) for r in map(json.loads, path.read_text().splitlines())}


def _slots_read(out: str) -> tuple[int, int, int]:
  """(slots read, slots in the pool, slots its devices hold) from a jaxmoe-serve summary."""
  m = re.search(r"read (\d+) of (\d+) pool slots from the store \(its devices hold (\d+)\)", out)
  assert m, out[-2000:]
  return tuple(int(x) for x in m.groups())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# 7 experts cached per device (of the 8 slots each expert shard holds), 14 in all: misses and evictions;
# 98,304 bytes per float32 expert of the tiny config.
CACHE = "--expert_cache_gb=0.000688128"


@pytest.mark.parametrize("cache", [False, True], ids=["pool", "expert cache"])
def test_two_processes_over_loopback_equal_one_device(served, cache):
  if not _has_cpu_collectives():
    pytest.skip("this jax has no CPU collectives (jax_cpu_collectives_implementation)")
  root = served
  dist = ["--mesh=expert:2,data:2", f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2"]
  dist += [CACHE] if cache else []
  follower = subprocess.Popen(
    _serve_args(root, None, *dist, "--process_id=1"),
    env=cpu_devices_env(2),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
  )
  one = subprocess.Popen(
    _serve_args(root, root / "one.jsonl"), env=cpu_devices_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
  )
  try:
    leader = subprocess.run(
      _serve_args(root, root / "mesh.jsonl", *dist, "--process_id=0"),
      env=cpu_devices_env(2),
      capture_output=True,
      text=True,
      timeout=TIMEOUT_S,
    )
    follower_out, _ = follower.communicate(timeout=60)
    one_out, _ = one.communicate(timeout=TIMEOUT_S)  # the one-device reference, run alongside
  finally:
    for p in (follower, one):
      if p.poll() is None:
        p.kill()
  assert leader.returncode == 0, leader.stdout[-3000:] + leader.stderr[-3000:]
  assert follower.returncode == 0, follower_out.decode(errors="replace")[-3000:]
  assert one.returncode == 0, one_out.decode(errors="replace")[-3000:]
  got, want = _tokens(root / "mesh.jsonl"), _tokens(root / "one.jsonl")
  assert all(err is None for _, err in want.values()) and len(want) == 6
  assert got == want
  if cache:  # the pool stays on the hosts: each process's cache copied experts in as they were routed
    m = re.search(r"expert cache (\d+) of (\d+) experts: (\d+) hits, (\d+) misses", leader.stdout + leader.stderr)
    assert m and int(m[1]) == 14 < int(m[2]) and int(m[4]) > 0, (leader.stdout + leader.stderr)[-2000:]
    return
  # Each process read from the store only the slots its own devices hold.
  reads = [_slots_read(leader.stdout), _slots_read(follower_out.decode(errors="replace"))]
  assert all(read == held < total for read, total, held in reads), reads
  assert sum(held for _, _, held in reads) == reads[0][1], reads  # round-robin: disjoint halves
