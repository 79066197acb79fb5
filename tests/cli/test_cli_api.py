"""Entry points, tokenizers and the HF exporter."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxmoe
from jaxmoe.families.mixtral import config, layout
from jaxmoe.families.mixtral.export import write_hf
from jaxmoe.io.convert import convert
from jaxmoe.io.tokenizer import ByteTokenizer
from tests.helpers import REPO as ROOT


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=300)


def test_generate_cli_with_text_and_ids(converted, models):
  ckpt = str(converted["gqa4x2"])
  model = models["gqa4x2"]
  text = run_module("jaxmoe.cli.generate", f"--ckpt={ckpt}", "--prompt=hello", "--max_new_tokens=5")
  assert text.returncode == 0, text.stderr
  ids = model.encode("hello")
  want = model.generate(np.asarray([ids]), 5)[0]
  assert f"ids: {','.join(map(str, want))}" in text.stdout
  assert "new:" in text.stdout
  by_ids = run_module("jaxmoe.cli.generate", f"--ckpt={ckpt}", "--prompt_ids=4,5,6", "--max_new_tokens=3")
  assert by_ids.returncode == 0, by_ids.stderr
  assert by_ids.stdout.startswith("ids: 4,5,6,")


def test_generate_cli_errors_are_one_clear_line(converted, tmp_path):
  bad = run_module("jaxmoe.cli.generate", f"--ckpt={converted['gqa4x2']}", "--prompt_ids=1,x")
  assert bad.returncode == 1 and "--prompt_ids must be comma-separated integers" in bad.stderr
  missing = run_module("jaxmoe.cli.generate", f"--ckpt={tmp_path}", "--prompt_ids=1")
  assert missing.returncode == 1 and "jaxmoe.json is missing" in missing.stderr
  no_text = run_module("jaxmoe.cli.generate", f"--ckpt={converted['mqa4x1_window']}", "--prompt=hi")
  assert no_text.returncode == 1 and "no tokenizer.json" in no_text.stderr


def test_quickstart_runs_end_to_end(tmp_path):
  out = run_module("jaxmoe.cli.quickstart", f"--workdir={tmp_path}", "--max_new_tokens=6")
  assert out.returncode == 0, out.stderr
  assert "KV-cache decoding agrees with a full forward pass: True" in out.stdout
  assert (tmp_path / "jaxmoe_tiny_mixtral" / "jaxmoe.json").is_file()


def test_hf_tokenizer_json_is_used(models):
  model = models["gqa4x2"]
  ids = model.encode("abc")
  assert ids == [ord(c) - 32 + 3 for c in "abc"]
  assert model.decode(ids) in ("abc", "a b c")


def test_byte_tokenizer_round_trip():
  tok = ByteTokenizer()
  text = "héllo, wörld ✓"
  ids = tok.encode(text)
  assert ids[0] == tok.bos_id and max(ids[1:]) < 256
  assert tok.decode(ids) == text


def test_export_then_convert_round_trips(tmp_path):
  cfg = config.preset("tiny")
  params = layout.init_params(cfg, seed=11)
  write_hf(cfg, params, tmp_path / "hf")
  convert(tmp_path / "hf", tmp_path / "ours", progress=False)
  model = jaxmoe.load(tmp_path / "ours")
  assert model.config == cfg
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(model.params), params)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 5))
  np.testing.assert_array_equal(model.logits(tokens), jaxmoe.MixtralModel(cfg, params).logits(tokens))


def test_load_refuses_a_non_checkpoint(tmp_path):
  from jaxmoe.errors import CheckpointError

  with pytest.raises(CheckpointError, match="not a jaxmoe checkpoint"):
    jaxmoe.load(tmp_path)
