"""jaxmoe-convert: Hugging Face Mixtral safetensors -> jaxmoe checkpoint.

HF checkpoints are built here with numpy and `safetensors.numpy` (no torch),
under the names transformers 5 `save_pretrained` writes (per-expert) or holds
in memory (fused). The expected jaxmoe leaves are spelled out below from the
served layout (jaxmoe/families/mixtral/layout.py), independently of the
family's hf_keys.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxmoe.errors import ConfigError, ConversionError
from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.io import checkpoint
from jaxmoe.io.convert import convert
from tests.helpers import REPO

BF16 = np.dtype(ml_dtypes.bfloat16)


def hf_config(**changes) -> dict:
  # head_dim 6 != hidden_size / heads, so the head split cannot hide behind D.
  hf = {
    "model_type": "mixtral",
    "architectures": ["MixtralForCausalLM"],
    "vocab_size": 40,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 6,
    "num_local_experts": 3,
    "num_experts_per_tok": 2,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "dtype": "float32",
    "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"},
    "bos_token_id": 1,
    "eos_token_id": 2,
  }
  hf.update(changes)
  return {k: v for k, v in hf.items() if v is not None}


def _rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
  """Random values bounded away from zero, so a dropped or misplaced block shows."""
  return (rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)).astype(np.float32)


def hf_tensors(hf: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """A random checkpoint under the per-expert names `save_pretrained` writes."""
  rng = np.random.default_rng(seed)
  d, f, v, e = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"], hf["num_local_experts"]
  nh, mh = hf["num_attention_heads"] * hf["head_dim"], hf["num_key_value_heads"] * hf["head_dim"]
  t = {
    "model.embed_tokens.weight": _rand(rng, v, d),
    "model.norm.weight": _rand(rng, d),
    "lm_head.weight": _rand(rng, v, d),
  }
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t.update(
      {
        p + "input_layernorm.weight": _rand(rng, d),
        p + "post_attention_layernorm.weight": _rand(rng, d),
        p + "self_attn.q_proj.weight": _rand(rng, nh, d),
        p + "self_attn.k_proj.weight": _rand(rng, mh, d),
        p + "self_attn.v_proj.weight": _rand(rng, mh, d),
        p + "self_attn.o_proj.weight": _rand(rng, d, nh),
        p + "block_sparse_moe.gate.weight": _rand(rng, e, d),
      }
    )
    for j in range(e):
      q = f"{p}block_sparse_moe.experts.{j}."
      t.update(
        {q + "w1.weight": _rand(rng, f, d), q + "w3.weight": _rand(rng, f, d), q + "w2.weight": _rand(rng, d, f)}
      )
  return t


def fuse(t: dict[str, np.ndarray], hf: dict) -> dict[str, np.ndarray]:
  """The same weights under transformers-5 in-memory names (gate_up_proj = [w1; w3])."""
  e = hf["num_local_experts"]
  out = {k: v for k, v in t.items() if "block_sparse_moe" not in k}
  for i in range(hf["num_hidden_layers"]):
    p, x = f"model.layers.{i}.", f"model.layers.{i}.block_sparse_moe."
    out[p + "mlp.gate.weight"] = t[x + "gate.weight"]
    out[p + "mlp.experts.gate_up_proj"] = np.stack(
      [np.concatenate([t[f"{x}experts.{j}.w1.weight"], t[f"{x}experts.{j}.w3.weight"]]) for j in range(e)]
    )  # [E, 2F, D]
    out[p + "mlp.experts.down_proj"] = np.stack([t[f"{x}experts.{j}.w2.weight"] for j in range(e)])
  return out


def write_hf(folder: pathlib.Path, tensors: dict, hf: dict, shards: int = 1) -> pathlib.Path:
  """An HF folder: config.json, tokenizer.json and one or `shards` safetensors files."""
  folder.mkdir(parents=True)
  (folder / "config.json").write_text(json.dumps(hf))
  (folder / "tokenizer.json").write_text('{"model": "stub"}')
  if shards == 1:
    save_file(tensors, str(folder / "model.safetensors"))
    return folder
  names, weight_map = list(tensors), {}
  for i in range(shards):  # round robin, so every layer spans several shards
    shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    save_file({k: tensors[k] for k in names[i::shards]}, str(folder / shard))
    weight_map.update(dict.fromkeys(names[i::shards], shard))
  index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())}, "weight_map": weight_map}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  return folder


def expected_params(t: dict[str, np.ndarray], hf: dict) -> dict:
  """The jaxmoe tree (served layout) the HF tensors `t` must convert to."""
  d, h, f = hf["hidden_size"], hf["head_dim"], hf["intermediate_size"]
  n, m, e = hf["num_attention_heads"], hf["num_key_value_heads"], hf["num_local_experts"]
  layers, experts = [], []
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    layers.append(
      {
        "attn_norm": t[p + "input_layernorm.weight"],
        "q": t[p + "self_attn.q_proj.weight"].T.reshape(d, n, h),  # [D, N, H]
        "k": t[p + "self_attn.k_proj.weight"].T.reshape(d, m, h),  # [D, M, H]
        "v": t[p + "self_attn.v_proj.weight"].T.reshape(d, m, h),
        "o": t[p + "self_attn.o_proj.weight"].T.reshape(n, h, d),  # [N, H, D]
        "mlp_norm": t[p + "post_attention_layernorm.weight"],
        "router": t[p + "block_sparse_moe.gate.weight"].T,  # [D, E]
      }
    )
    x = p + "block_sparse_moe.experts."
    experts.append({w: np.stack([t[f"{x}{j}.{w}.weight"].T for j in range(e)]) for w in ("w1", "w3", "w2")})
    assert experts[-1]["w1"].shape == (e, d, f) and experts[-1]["w2"].shape == (e, f, d)
  num_layers = hf["num_hidden_layers"]
  return {
    "backbone": {
      "embed": t["model.embed_tokens.weight"],
      "norm": t["model.norm.weight"],
      "lm_head": t["lm_head.weight"].T,
      "layers": {k: np.stack([layer[k] for layer in layers]) for k in layers[0]},
    },  # [L, ...]
    "experts": {w: np.concatenate([x[w] for x in experts]) for w in ("w1", "w3", "w2")},  # [L * E, ...]
    "slot_map": np.arange(num_layers * e, dtype=np.int32).reshape(num_layers, e),
  }


def assert_trees_equal(got: dict, want: dict, dtype=None) -> None:
  """Same paths, and every leaf equal to `want` cast to `dtype` (exactly)."""
  got_flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(got)[0]}
  want_flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(want)[0]}
  assert sorted(got_flat) == sorted(want_flat)
  for path, w in want_flat.items():
    g = got_flat[path]
    w = w if dtype is None or path == "['slot_map']" else w.astype(dtype)
    assert g.dtype == w.dtype, f"{path}: dtype {g.dtype}, expected {w.dtype}"
    assert g.shape == w.shape, f"{path}: shape {g.shape}, expected {w.shape}"
    err = np.abs(g.astype(np.float64) - w.astype(np.float64)).max()
    assert np.array_equal(g, w), f"{path}: max abs error {err}"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """(hf config, tensors, folder) of one unsharded per-expert checkpoint."""
  hf = hf_config()
  tensors = hf_tensors(hf)
  return hf, tensors, write_hf(tmp_path_factory.mktemp("src") / "hf", tensors, hf)


@pytest.fixture(scope="module")
def tiny_ckpt(source, tmp_path_factory):
  """(config returned by convert, checkpoint folder) of `source`."""
  out = tmp_path_factory.mktemp("out") / "ckpt"
  return convert(source[2], out, progress=False), out


def test_round_trip_every_leaf(source, tiny_ckpt):
  hf, tensors, folder = source
  cfg, out = tiny_ckpt
  assert cfg == MixtralConfig.from_hf(hf, dtype="float32")
  loaded_cfg, params = checkpoint.load(out)
  assert loaded_cfg == cfg
  assert_trees_equal(params, expected_params(tensors, hf), np.float32)
  assert (out / "tokenizer.json").read_text() == (folder / "tokenizer.json").read_text()
  assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]  # no temporary folder left


def test_fused_layout_converts_like_per_expert(source, tiny_ckpt, tmp_path):
  hf, tensors, _ = source
  fused = fuse(tensors, hf)
  assert not any("block_sparse_moe" in k for k in fused)
  convert(write_hf(tmp_path / "hf", fused, hf), tmp_path / "out", progress=False)
  assert_trees_equal(checkpoint.load(tmp_path / "out")[1], checkpoint.load(tiny_ckpt[1])[1])


def test_sharded_index_converts_like_unsharded(source, tiny_ckpt, tmp_path):
  hf, tensors, _ = source
  folder = write_hf(tmp_path / "hf", tensors, hf, shards=3)
  assert not (folder / "model.safetensors").exists()
  cfg = convert(folder, tmp_path / "out", progress=True)
  assert cfg == tiny_ckpt[0]
  assert_trees_equal(checkpoint.load(tmp_path / "out")[1], checkpoint.load(tiny_ckpt[1])[1])


@pytest.mark.parametrize(
  "src_dtype, arg, config_dtype, want",
  [
    (np.float32, None, {"dtype": "bfloat16"}, "bfloat16"),
    (np.float32, None, {"dtype": None, "torch_dtype": "float16"}, "float16"),
    (np.float32, None, {"dtype": "int8"}, "float32"),
    (np.float32, "bfloat16", {}, "bfloat16"),
    (BF16, "float32", {"dtype": "bfloat16"}, "float32"),
    (BF16, None, {"dtype": "bfloat16"}, "bfloat16"),
  ],
)
def test_dtype(src_dtype, arg, config_dtype, want, tmp_path):
  hf = hf_config(**config_dtype)
  tensors = {k: v.astype(src_dtype) for k, v in hf_tensors(hf, seed=1).items()}
  cfg = convert(write_hf(tmp_path / "hf", tensors, hf), tmp_path / "out", dtype=arg, progress=False)
  assert cfg.dtype == want
  loaded_cfg, params = checkpoint.load(tmp_path / "out")
  assert loaded_cfg.dtype == want
  assert_trees_equal(params, expected_params(tensors, hf), np.dtype(jax.numpy.dtype(want)))


def test_unsupported_dtype_argument(source, tmp_path):
  with pytest.raises(ConversionError, match=r"dtype='int8' unsupported"):
    convert(source[2], tmp_path / "out", dtype="int8")
  assert list(tmp_path.iterdir()) == []


def test_rotary_inv_freq_buffers_are_ignored(source, tmp_path):
  hf, tensors, _ = source
  extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(3, np.float32) for i in range(2)}
  convert(write_hf(tmp_path / "hf", {**tensors, **extra}, hf), tmp_path / "out", progress=False)
  assert_trees_equal(checkpoint.load(tmp_path / "out")[1], expected_params(tensors, hf), np.float32)


class _Boobytrap:
  """Unpickling this creates `path`: proof that a checkpoint was unpickled."""

  def __init__(self, path: str):
    self.path = path

  def __reduce__(self):
    return open, (self.path, "w")


def test_pickle_next_to_safetensors_is_never_opened(source, tmp_path):
  hf, tensors, _ = source
  folder = write_hf(tmp_path / "hf", tensors, hf)
  sentinel = tmp_path / "unpickled"
  (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Boobytrap(str(sentinel))))
  convert(folder, tmp_path / "out", progress=False)
  assert not sentinel.exists()


def _pop(name):
  return lambda hf, t: t.pop(name)


def _set(name, *shape, dtype=np.float32):
  return lambda hf, t: t.__setitem__(name, np.full(shape, 3, dtype))


# name -> (what breaks the checkpoint: f(hf config, tensors), error, message regex)
BAD_CHECKPOINTS = {
  "missing_tensor": (
    _pop("model.layers.1.self_attn.k_proj.weight"),
    ConversionError,
    r"missing tensor\(s\) 'model\.layers\.1\.self_attn\.k_proj\.weight'",
  ),
  "missing_expert": (
    _pop("model.layers.0.block_sparse_moe.experts.2.w3.weight"),
    ConversionError,
    r"missing tensor\(s\) 'model\.layers\.0\.block_sparse_moe\.experts\.2\.w3\.weight'",
  ),
  "missing_lm_head": (_pop("lm_head.weight"), ConversionError, r"missing tensor\(s\) 'lm_head\.weight'"),
  "wrong_shape": (
    _set("model.layers.1.self_attn.q_proj.weight", 24, 15),
    ConversionError,
    r"'model\.layers\.1\.self_attn\.q_proj\.weight' has shape \(24, 15\), expected \(24, 16\)",
  ),
  "wrong_expert_shape": (
    _set("model.layers.0.block_sparse_moe.experts.1.w2.weight", 16, 23),
    ConversionError,
    r"'model\.layers\.0\.block_sparse_moe\.experts\.1\.w2\.weight' has shape \(16, 23\), "
    r"expected \(16, 24\)",
  ),
  "config_disagrees_with_weights": (
    lambda hf, t: hf.update(vocab_size=41),
    ConversionError,
    r"'model\.embed_tokens\.weight' has shape \(40, 16\), expected \(41, 16\)",
  ),
  "extra_tensor": (
    _set("model.layers.0.self_attn.q_norm.weight", 6),
    ConversionError,
    r"unexpected tensor\(s\) 'model\.layers\.0\.self_attn\.q_norm\.weight'",
  ),
  "extra_layer": (
    _set("model.layers.2.input_layernorm.weight", 16),
    ConversionError,
    r"unexpected tensor\(s\) 'model\.layers\.2\.input_layernorm\.weight'",
  ),
  "integer_tensor": (
    _set("model.norm.weight", 16, dtype=np.int32),
    ConversionError,
    r"'model\.norm\.weight' has dtype I32",
  ),
  "missing_config_key": (
    lambda hf, t: hf.pop("num_local_experts"),
    ConfigError,
    r"missing required key 'num_local_experts'",
  ),
  "not_mixtral": (lambda hf, t: hf.update(model_type="llama"), ConfigError, r"model_type='llama'"),
}


def _assert_nothing_written(outs: pathlib.Path) -> None:
  assert list(outs.iterdir()) == [], "a failed conversion left files behind"


@pytest.mark.parametrize("name", sorted(BAD_CHECKPOINTS))
def test_bad_checkpoint_raises_and_writes_nothing(name, tmp_path):
  breaks, error, message = BAD_CHECKPOINTS[name]
  hf = hf_config()
  tensors = hf_tensors(hf)
  breaks(hf, tensors)
  folder = write_hf(tmp_path / "hf", tensors, hf, shards=2)
  outs = tmp_path / "outs"
  outs.mkdir()
  with pytest.raises(error, match=message):
    convert(folder, outs / "ckpt")
  _assert_nothing_written(outs)


def _only_pickles(folder: pathlib.Path, trap: bytes) -> None:
  (folder / "pytorch_model.bin").write_bytes(trap)


def _sharded_pickles(folder: pathlib.Path, trap: bytes) -> None:
  (folder / "pytorch_model-00001-of-00001.bin").write_bytes(trap)
  index = {"weight_map": {"lm_head.weight": "pytorch_model-00001-of-00001.bin"}}
  (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def _index_of_pickles(folder: pathlib.Path, trap: bytes) -> None:
  (folder / "model-00001.bin").write_bytes(trap)
  index = {"weight_map": {"lm_head.weight": "model-00001.bin"}}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _index_missing_shard(folder: pathlib.Path, trap: bytes) -> None:
  index = {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _corrupt_safetensors(folder: pathlib.Path, trap: bytes) -> None:
  (folder / "model.safetensors").write_bytes(b"\xff" * 64)


# name -> (writes a broken folder's weights: f(folder, pickle bytes), message regex). The
# folder always has a valid config.json, except where the name says otherwise.
BAD_FOLDERS = {
  "pytorch_model_bin_only": (
    _only_pickles,
    r"only pickle-based weights \(pytorch_model\.bin\).*"
    r"safetensors is required",
  ),
  "sharded_bin_only": (
    _sharded_pickles,
    r"pickle-based weights.*pytorch_model\.bin\.index\.json.*"
    r"safetensors is required",
  ),
  "index_naming_bin_shards": (_index_of_pickles, r"'model-00001\.bin' is not a \.safetensors file"),
  "index_missing_shard": (_index_missing_shard, r"'model-00001-of-00002\.safetensors' not found"),
  "corrupt_safetensors": (_corrupt_safetensors, r"model\.safetensors: not a readable safetensors file"),
  "no_weights": (lambda folder, trap: None, r"neither model\.safetensors nor"),
  "no_config_json": (_only_pickles, r"config\.json not found"),
}


@pytest.mark.parametrize("name", sorted(BAD_FOLDERS))
def test_bad_folder_raises_and_writes_nothing(name, tmp_path):
  make, message = BAD_FOLDERS[name]
  folder = tmp_path / "hf"
  folder.mkdir()
  if name != "no_config_json":
    (folder / "config.json").write_text(json.dumps(hf_config()))
  sentinel = tmp_path / "unpickled"
  make(folder, pickle.dumps(_Boobytrap(str(sentinel))))
  outs = tmp_path / "outs"
  outs.mkdir()
  with pytest.raises(ConversionError, match=message):
    convert(folder, outs / "ckpt")
  _assert_nothing_written(outs)
  assert not sentinel.exists(), "a pickle was unpickled"


def test_missing_input_folder(tmp_path):
  with pytest.raises(ConversionError, match=r"is not a folder"):
    convert(tmp_path / "nope", tmp_path / "out")
  assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_and_kept(source, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(ConversionError, match=r"already exists"):
    convert(source[2], out)
  assert [p.name for p in out.iterdir()] == ["keep.txt"]
  assert list(tmp_path.iterdir()) == [out]


def test_failure_while_writing_leaves_no_output_or_temp_folder(source, tmp_path, monkeypatch):
  write_part = checkpoint.Writer.write_part

  def fail_on_layer_1(self, name, tree):
    if name == "layer_0001":
      raise OSError("disk full (simulated)")
    write_part(self, name, tree)

  monkeypatch.setattr(checkpoint.Writer, "write_part", fail_on_layer_1)
  outs = tmp_path / "outs"
  outs.mkdir()
  with pytest.raises(OSError, match="disk full"):
    convert(source[2], outs / "ckpt", progress=False)
  _assert_nothing_written(outs)


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "jaxmoe.cli.convert", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_converts(source, tmp_path):
  hf, tensors, folder = source
  proc = _cli(f"--hf_dir={folder}", f"--out={tmp_path / 'out'}", "--dtype=bfloat16")
  assert proc.returncode == 0, proc.stderr
  assert "wrote" in proc.stdout
  cfg, params = checkpoint.load(tmp_path / "out")
  assert cfg.dtype == "bfloat16"
  assert_trees_equal(params, expected_params(tensors, hf), BF16)


def test_cli_bad_checkpoint_exits_1_with_one_line(tmp_path):
  hf = hf_config()
  tensors = hf_tensors(hf)
  del tensors["model.layers.0.block_sparse_moe.gate.weight"]
  proc = _cli(f"--hf_dir={write_hf(tmp_path / 'hf', tensors, hf)}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("jaxmoe-convert: error: missing tensor(s)")
  assert "'model.layers.0.block_sparse_moe.gate.weight'" in lines[0]
  assert not (tmp_path / "out").exists()
