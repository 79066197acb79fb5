"""Conversion and consolidation hold about one layer per input, not the model: peak RSS at a width where 2x shows.

Each run is a subprocess that reports its own peak RSS, VmHWM of
/proc/self/status (ru_maxrss would not do: Linux carries it across exec, so a
child of a big pytest process reports at least the parent's RSS). A tiny run
gives the baseline (Python, jax, orbax, tensorstore). The model has two layers
of about 100 MB each, so one extra layer (a write buffer, a previous layer
still referenced, a pool built beside the old one) exceeds the bounds:
  conversion     1 layer read + bounded buffers: at most 1.5 layers over the baseline
                 (before the fix: 2.2 layers, tensorstore's compressed write buffer);
  consolidation  K tenants' layer + one pool layer + bounded buffers, K = 2 and a
                 pool of one layer (share_fraction=1): at most K + 1.5 layers
                 (before: about 5.5, the previous layer's trees alive while the
                 next was read and the pool pass building its list beside the old).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.helpers import REPO

_PEAK = """
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(status["VmHWM"].split()[0])  # KiB
"""
_CONVERT = (
  """
import sys
from jaxmoe.io.convert import convert
convert(sys.argv[1], sys.argv[2], progress=False)
"""
  + _PEAK
)
_CONSOLIDATE = (
  """
import sys
from jaxmoe.consolidate import ConsolidateConfig, consolidate
consolidate([("a", sys.argv[1]), ("b", sys.argv[2])], sys.argv[3], ConsolidateConfig(share_fraction=1.0))
"""
  + _PEAK
)


def _hf_config(d, f, e, layers, heads, kv_heads, head_dim, vocab) -> dict:
  return {
    "model_type": "mixtral",
    "vocab_size": vocab,
    "hidden_size": d,
    "intermediate_size": f,
    "num_hidden_layers": layers,
    "num_attention_heads": heads,
    "num_key_value_heads": kv_heads,
    "head_dim": head_dim,
    "num_local_experts": e,
    "num_experts_per_tok": 2,
    "dtype": "float32",
  }


def _write_sharded(folder: pathlib.Path, hf: dict, seed: int = 0) -> int:
  """Writes a per-expert HF checkpoint one shard per layer; returns its tensor bytes."""
  rng = np.random.default_rng(seed)
  d, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
  q, kv = hf["num_attention_heads"] * hf["head_dim"], hf["num_key_value_heads"] * hf["head_dim"]

  def rand(*shape: int) -> np.ndarray:
    return rng.random(shape, dtype=np.float32) + 0.5  # never zero

  folder.mkdir()
  (folder / "config.json").write_text(json.dumps(hf))
  layers = hf["num_hidden_layers"]
  weight_map, total = {}, 0

  def shard(n: int, tensors: dict) -> None:
    nonlocal total
    name = f"model-{n + 1:05d}-of-{layers + 1:05d}.safetensors"
    save_file(tensors, str(folder / name))
    weight_map.update(dict.fromkeys(tensors, name))
    total += sum(t.nbytes for t in tensors.values())

  shard(0, {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": rand(d), "lm_head.weight": rand(v, d)})
  for i in range(layers):
    p = f"model.layers.{i}."
    t = {
      p + "input_layernorm.weight": rand(d),
      p + "post_attention_layernorm.weight": rand(d),
      p + "self_attn.q_proj.weight": rand(q, d),
      p + "self_attn.k_proj.weight": rand(kv, d),
      p + "self_attn.v_proj.weight": rand(kv, d),
      p + "self_attn.o_proj.weight": rand(d, q),
      p + "block_sparse_moe.gate.weight": rand(hf["num_local_experts"], d),
    }
    for e in range(hf["num_local_experts"]):
      x = f"{p}block_sparse_moe.experts.{e}."
      t.update({x + "w1.weight": rand(f, d), x + "w3.weight": rand(f, d), x + "w2.weight": rand(d, f)})
    shard(i + 1, t)
    del t
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  return total


def _peak_rss_bytes(script: str, *args) -> int:
  proc = subprocess.run(
    [sys.executable, "-c", script, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return int(proc.stdout.split()[-1]) * 1024


def _mib(n: float) -> str:
  return f"{n / 2**20:.0f} MiB"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """HF folders, tiny and big (two layers of ~100 MB), converted in measured subprocesses."""
  root = tmp_path_factory.mktemp("memory")
  big = _hf_config(d=640, f=1664, e=8, layers=2, heads=8, kv_heads=2, head_dim=80, vocab=1024)
  _write_sharded(root / "big", big)
  tiny = _hf_config(d=16, f=24, e=4, layers=2, heads=4, kv_heads=2, head_dim=4, vocab=32)
  _write_sharded(root / "tiny", tiny)
  peaks = {name: _peak_rss_bytes(_CONVERT, root / name, root / f"{name}_a") for name in ("tiny", "big")}
  d, f, e = big["hidden_size"], big["intermediate_size"], big["num_local_experts"]
  layer = 3 * e * d * f * 4  # the experts of one layer, float32: the bulk of a layer
  return root, peaks, layer


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_conversion_peak_memory_is_about_one_layer(runs):
  root, peaks, layer = runs
  extra = peaks["big"] - peaks["tiny"]
  report = f"layer {_mib(layer)}: conversion peak RSS {_mib(peaks['big'])}, tiny {_mib(peaks['tiny'])}"
  print(f"{report}, {extra / layer:.2f} layers over the baseline")
  assert (root / "big_a" / "jaxmoe.json").is_file()
  assert extra < 1.5 * layer, report


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_consolidation_peak_memory_is_one_layer_per_tenant_plus_the_pool(runs):
  root, _, layer = runs
  peaks = {}
  for name in ("tiny", "big"):
    shutil.copytree(root / f"{name}_a", root / f"{name}_b")  # a second tenant: the same reads and writes
    peaks[name] = _peak_rss_bytes(_CONSOLIDATE, root / f"{name}_a", root / f"{name}_b", root / f"{name}_store")
  extra = peaks["big"] - peaks["tiny"]
  report = f"layer {_mib(layer)}: consolidation peak RSS {_mib(peaks['big'])}, tiny {_mib(peaks['tiny'])}"
  print(f"{report}, {extra / layer:.2f} layers over the baseline")
  assert json.loads((root / "big_store" / "store.json").read_text())["slots_per_layer"] == [8, 8]
  assert extra < (2 + 1.5) * layer, report
