"""The converter holds about one layer, not the model: peak RSS of a ~490 MB conversion.

Each conversion runs in its own subprocess that reports its own peak RSS,
VmHWM of /proc/self/status: the high-water mark of the process's own address
space. (ru_maxrss would not do: Linux carries it across exec, so a child
started from a big pytest process reports at least the parent's RSS.)
A tiny conversion gives the baseline (Python, jax, orbax, tensorstore); the
big one may exceed it by at most a third of its size.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.helpers import REPO

_CHILD = """
import sys
from jaxmoe.io.convert import convert
convert(sys.argv[1], sys.argv[2], progress=False)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(status["VmHWM"].split()[0])  # KiB
"""


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


def _peak_rss_bytes(hf_dir: pathlib.Path, out: pathlib.Path) -> int:
  proc = subprocess.run(
    [sys.executable, "-c", _CHILD, str(hf_dir), str(out)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=240,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return int(proc.stdout.split()[-1]) * 1024


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_conversion_peak_memory_is_about_one_layer(tmp_path):
  big = _hf_config(d=512, f=768, e=8, layers=12, heads=8, kv_heads=2, head_dim=64, vocab=1024)
  size = _write_sharded(tmp_path / "big", big)
  assert size >= 400e6
  tiny = _hf_config(d=16, f=24, e=4, layers=2, heads=4, kv_heads=2, head_dim=4, vocab=32)
  _write_sharded(tmp_path / "tiny", tiny)

  peak_tiny = _peak_rss_bytes(tmp_path / "tiny", tmp_path / "tiny_out")
  peak_big = _peak_rss_bytes(tmp_path / "big", tmp_path / "big_out")

  def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"

  report = f"checkpoint {mib(size)}: peak RSS big {mib(peak_big)}, tiny {mib(peak_tiny)}"
  print(report)
  assert (tmp_path / "big_out" / "jaxmoe.json").is_file()
  assert peak_big - peak_tiny < size / 3, report
