"""Switch tenants end to end: 3 checkpoints -> jaxmoe-consolidate -> store -> engine, every mode.

Tenants t0..t2 share a random tiny-switch base; t1 and t2 change a few
experts and every backbone a little. With share_fraction=0 only identical
experts are shared, so every tenant's greedy output must equal its own
checkpoint's, in every engine mode.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import jaxmoe
from jaxmoe.consolidate import ConsolidateConfig, consolidate
from jaxmoe.families.switch import layout
from jaxmoe.families.switch.api import SwitchModel
from jaxmoe.families.switch.config import preset
from jaxmoe.io import checkpoint
from jaxmoe.io.store import load_store
from jaxmoe.serving import Engine, EngineConfig, Mode
from jaxmoe.serving import requests as req_lib

CFG = preset("tiny-switch")  # byte vocabulary; MoE layers: encoder block 1, decoder blocks 0 and 1
NAMES = ("t0", "t1", "t2")
CHANGED = {1: [(0, 2), (2, 0)], 2: [(0, 2), (1, 3)]}  # tenant -> (MoE layer, expert) with its own expert
MAX_SEQ = 16


def make_tenant(base, t: int):
  p = jax.tree.map(np.array, base)
  rng = np.random.default_rng(10 + t)
  for m, e in CHANGED.get(t, []):
    for w in p["experts"].values():
      w[m * CFG.num_experts + e] += (0.05 * rng.standard_normal(w.shape[1:])).astype(w.dtype)
  if t:
    for block in p["backbone"]["decoder"]["layers"].values():  # [G, ...] leaves of each block_j
      block["q"] += (0.02 * rng.standard_normal(block["q"].shape)).astype(block["q"].dtype)
  return p


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("switch_tenants")
  base = layout.init_params(CFG, seed=3, scale=0.15)
  out = {}
  for t, name in enumerate(NAMES):
    out[name] = root / name
    checkpoint.save(out[name], CFG, make_tenant(base, t))
  return out


@pytest.fixture(scope="module")
def store(ckpts, tmp_path_factory):
  out = tmp_path_factory.mktemp("switch_store") / "store"
  consolidate(list(ckpts.items()), out, ConsolidateConfig(share_fraction=0.0))
  return load_store(out)


@pytest.fixture(scope="module")
def originals(ckpts):
  return {name: jaxmoe.load(path) for name, path in ckpts.items()}


def requests(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return [
    {
      "id": f"r{i}",
      "model": NAMES[i % len(NAMES)],
      "prompt_ids": rng.integers(0, 256, int(rng.integers(1, 9))).tolist(),
      "max_tokens": int(rng.integers(1, 9)),
    }
    for i in range(n)
  ]


def test_store_shares_only_identical_experts(store):
  unchanged = CFG.num_moe_layers * CFG.num_experts - len({p for v in CHANGED.values() for p in v})
  sel = store.metadata["selection"]
  # Two joins per unchanged position; one where a single tenant differs; none at (0, 2).
  assert sel["joins_applied"] == sel["joins_identical"] == 2 * unchanged + 2
  assert store.config == CFG and store.metadata["slots_per_layer"] == [6, 5, 5]
  assert isinstance(store.model("t1"), SwitchModel)
  b = store.metadata["bytes"]
  assert b["pool"] == sum(x.nbytes for x in jax.tree.leaves(store.pool)) == 16 * b["expert"]
  assert (store.path / "report.json").is_file()


def test_store_tenants_equal_their_checkpoints(store, ckpts):
  for name in NAMES:
    _, params = checkpoint.load(ckpts[name])
    jax.tree.map(np.testing.assert_array_equal, store.export_params(name), params)
    assert isinstance(store.model(name), SwitchModel)


@pytest.mark.parametrize("mode", list(Mode))
def test_every_mode_equals_each_tenants_own_model(store, originals, mode):
  reqs = requests(9)
  engine = Engine(store, EngineConfig(mode=mode, max_batch=2, max_seq_len=MAX_SEQ))
  for r in reqs:
    engine.submit(r)
  out = {o["id"]: o for o in engine.run_until_done()}
  for r in reqs:
    want = originals[r["model"]].generate(np.array([r["prompt_ids"]]), r["max_tokens"])[0, 1:]
    got = out[r["id"]]
    assert got["error"] is None and got["finish_reason"] in ("stop", "length")
    assert got["token_ids"] == want.tolist(), (mode, r["id"])
    assert got["usage"]["prompt_tokens"] == len(r["prompt_ids"])
  if mode is Mode.SWAP:
    assert engine.summary()["switches"] >= 1


def test_json_lines_answer_text_and_errors(store, originals):
  """jaxmoe-serve's path in process: JSON lines -> requests -> engine (no CLI module: its absl flags)."""
  lines = [
    json.dumps({"id": "a", "model": "t2", "prompt": "Hi!", "max_tokens": 5}).encode(),
    json.dumps({"id": "b", "model": "t0", "prompt_ids": [1] * (MAX_SEQ + 1)}).encode(),
    json.dumps({"id": "c", "model": "t1", "prompt_ids": [3], "max_tokens": MAX_SEQ}).encode(),
  ]
  engine = Engine(store, EngineConfig(mode=Mode.RESIDENT, max_batch=2, max_seq_len=MAX_SEQ))
  for n, line in enumerate(lines, start=1):
    engine.submit(req_lib.parse_line(line, n))
  out = {o["id"]: json.loads(json.dumps(o)) for o in engine.run_until_done()}
  want = originals["t2"].generate(np.array([store.tokenizer.encode("Hi!")]), 5)[0, 1:]
  assert out["a"]["token_ids"] == want.tolist() and out["a"]["text"] == store.tokenizer.decode(want)
  assert "prompt has 17 tokens; the maximum is 16" in out["b"]["error"]["message"]
  assert "'max_tokens'=16 is above the limit 15" in out["c"]["error"]["message"]
