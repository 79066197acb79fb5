"""jaxmoe-serve end to end: consolidate real checkpoints, serve a JSONL file with bad lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jaxmoe
from jaxmoe.consolidate.pipeline import ConsolidateConfig, consolidate
from jaxmoe.families.mixtral import config
from jaxmoe.io import checkpoint
from jaxmoe.io.store import expert_bytes
from jaxmoe.serving.experts import min_slots
from jaxmoe.serving.synthetic import synthetic_store
from tests.helpers import REPO as ROOT


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
  """Three tenant checkpoints (plain models) consolidated with nothing lossy shared."""
  root = tmp_path_factory.mktemp("serve")
  mem = synthetic_store(config.preset("tiny"), k=3, seed=2, own_fraction=0.5, noise=0.05)
  pairs = []
  for name in mem.tenants:
    checkpoint.save(root / name, mem.config, mem.export_params(name))
    pairs.append((name, root / name))
  consolidate(pairs, root / "store", ConsolidateConfig(share_fraction=0.0))
  return root / "store"


def run_serve(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "jaxmoe.cli.serve", *args, "--noprogress"],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )


def test_serve_cli_answers_every_line_and_matches_each_tenant(store_dir, tmp_path):
  store = jaxmoe.load_store(store_dir)
  good = [{"id": f"g{i}", "model": store.tenants[i % 3], "prompt": f"hello {i}", "max_tokens": 5} for i in range(5)]
  lines = [json.dumps(r).encode() for r in good]
  lines[2:2] = [
    b'{"id": "broken", "model": ',  # malformed JSON: answered as line-3
    b'{"id": "latin1", "prompt": "caf\xe9"}',  # invalid UTF-8
    b"",  # an empty line
    json.dumps({"id": "who", "model": "nobody", "prompt": "x"}).encode(),
    json.dumps({"id": "neg", "model": store.tenants[0], "prompt": "x", "max_tokens": -1}).encode(),
  ]
  requests = tmp_path / "in.jsonl"
  requests.write_bytes(b"\n".join(lines) + b"\n")
  out = tmp_path / "out.jsonl"
  proc = run_serve(
    f"--store={store_dir}", f"--requests={requests}", f"--out={out}", "--mode=swap", "--max_batch=4", "--max_seq_len=64"
  )
  assert proc.returncode == 0, proc.stderr
  assert "tokens/s" in proc.stdout and "switches" in proc.stdout
  responses = [json.loads(x) for x in out.read_text().splitlines()]
  assert len(responses) == len(lines)
  by_id = {r["id"]: r for r in responses}
  assert sorted(by_id) == sorted(["line-3", "line-4", "line-5", "who", "neg"] + [r["id"] for r in good])
  assert "not valid JSON" in by_id["line-3"]["error"]["message"]
  assert "not valid UTF-8" in by_id["line-4"]["error"]["message"]
  assert "empty" in by_id["line-5"]["error"]["message"]
  assert "unknown model 'nobody'" in by_id["who"]["error"]["message"]
  assert "'max_tokens' must be >= 1" in by_id["neg"]["error"]["message"]
  for r in good:
    model = store.model(r["model"])
    ids = model.encode(r["prompt"])
    want = model.generate(np.array([ids]), 5)[0, len(ids) :].tolist()
    got = by_id[r["id"]]
    assert got["error"] is None and got["token_ids"] == want, r["id"]
    assert got["text"] == model.decode(want)


def test_serve_cli_fatal_errors_exit_2(store_dir, tmp_path):
  requests = tmp_path / "in.jsonl"
  requests.write_text(json.dumps({"model": "t", "prompt": "x"}) + "\n")
  no_store = run_serve(f"--store={tmp_path / 'missing'}", f"--requests={requests}", f"--out={tmp_path / 'o'}")
  assert no_store.returncode == 2 and "cannot read --store" in no_store.stderr
  no_out = run_serve(f"--store={store_dir}", f"--requests={requests}", f"--out={tmp_path / 'no' / 'dir' / 'o'}")
  assert no_out.returncode == 2 and "cannot write --out" in no_out.stderr
  no_in = run_serve(f"--store={store_dir}", f"--requests={tmp_path / 'none.jsonl'}", f"--out={tmp_path / 'o2'}")
  assert no_in.returncode == 2 and "cannot read --requests" in no_in.stderr


def test_serve_cli_with_experts_off_the_device_and_out_of_host_memory(store_dir, tmp_path):
  store = jaxmoe.load_store(store_dir)
  reqs = [{"id": f"g{i}", "model": store.tenants[i % 3], "prompt": f"offload {i}", "max_tokens": 4} for i in range(4)]
  requests = tmp_path / "in.jsonl"
  requests.write_text("".join(json.dumps(r) + "\n" for r in reqs))
  common = [f"--store={store_dir}", f"--requests={requests}", "--mode=mixed", "--max_batch=2", "--max_seq_len=32"]
  whole = run_serve(*common, f"--out={tmp_path / 'whole.jsonl'}")
  assert whole.returncode == 0, whole.stderr
  expert = expert_bytes(store.config)
  slots = min_slots(store.slot_maps.values(), store.config.num_experts, rows=2, tenants=3)  # the engine's minimum
  gb = f"--expert_cache_gb={slots * expert / 1e9}"
  cached = run_serve(*common, f"--out={tmp_path / 'cached.jsonl'}", gb, f"--host_cache_gb={4 * expert / 1e9}")
  assert cached.returncode == 0, cached.stderr
  assert f"expert cache {slots} of {sum(store.slots_per_layer)} experts" in cached.stdout
  read = lambda name: {r["id"]: r["token_ids"] for r in map(json.loads, (tmp_path / name).read_text().splitlines())}  # noqa: E731
  assert read("cached.jsonl") == read("whole.jsonl")
  small = run_serve(*common, f"--out={tmp_path / 'o'}", f"--expert_cache_gb={(slots - 1) * expert / 1e9}")
  assert small.returncode == 2 and "at least expert_cache_gb=" in small.stderr
  lone = run_serve(*common, f"--out={tmp_path / 'o'}", f"--host_cache_gb={4 * expert / 1e9}")
  assert lone.returncode == 2 and "--host_cache_gb needs --expert_cache_gb" in lone.stderr
