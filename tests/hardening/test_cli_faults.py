"""The CLIs under faults: signals, kills, unwritable or dangerous outputs, bad flags.

Subprocesses only where the process is the thing tested (exit codes, signal
handlers, what is left on disk). Every case checks the destination is whole
or absent, nothing else was touched, and no temporary is left.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from jaxmoe.consolidate import ConsolidateConfig, consolidate
from jaxmoe.families.mixtral import config, layout
from jaxmoe.io import checkpoint, files
from jaxmoe.io.convert import convert
from jaxmoe.serving import requests as req_lib
from tests.helpers import REPO
from tests.io.test_convert import hf_config, hf_tensors, write_hf

CFG = config.preset("tiny").replace(max_position_embeddings=128)  # below jaxmoe-serve's default 512
ENV = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
# Runs a CLI, but first makes it announce (a file) and wait at its second part write, so a test can
# signal it mid-write, deterministically.
_PAUSED = """
import pathlib, sys, time
from jaxmoe.io import checkpoint, store
ready = pathlib.Path(sys.argv.pop(1))
for cls, name in ((checkpoint.Writer, "_save"), (store.StoreWriter, "_save")):
  def pause(self, *args, _orig=getattr(cls, name), _n=[0]):
    _orig(self, *args)
    _n[0] += 1
    if _n[0] == 2:
      ready.write_text("writing")
      time.sleep(60)
  setattr(cls, name, pause)
module = sys.argv.pop(1)
__import__(module, fromlist=["run"]).run()
"""


def cli(module: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout
  )


def temporaries(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
  lines = [x for x in proc.stderr.splitlines() if "error:" in x or "fatal:" in x]
  assert len(lines) == 1 and fragment in lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults")
  for i, name in enumerate(("a", "b")):
    checkpoint.save(root / name, CFG, layout.init_params(CFG, seed=i))
  consolidate([("a", root / "a"), ("b", root / "b")], root / "store", ConsolidateConfig(share_fraction=0.5))
  return root / "store"


@pytest.fixture
def requests_file(tmp_path) -> pathlib.Path:
  lines = [
    json.dumps({"id": "ok-1", "model": "a", "prompt": "hi", "max_tokens": 3}).encode(),
    b'{"id": "bad", "model": "a", "prompt": "ab\\ud800cd"}',
    b'{"model": "a", "prompt": "x", "max_tokens": ' + b"7" * 5000 + b"}",
    b"[" * 100_000 + b"]" * 100_000,
    json.dumps({"id": "ok-1", "model": "b", "prompt_ids": [1, 2], "max_tokens": 2}).encode(),
    json.dumps({"id": "ok-2", "model": "b", "prompt_ids": [1, 2], "max_tokens": 2}).encode(),
  ]
  path = tmp_path / "in.jsonl"
  path.write_bytes(req_lib.BOM + b"\n".join(lines) + b"\n")
  return path


def test_serve_answers_every_line_with_the_models_own_limit(store_dir, requests_file, tmp_path):
  out = tmp_path / "out.jsonl"
  out.write_text("the previous responses\n")
  proc = cli("jaxmoe.cli.serve", f"--store={store_dir}", f"--requests={requests_file}", f"--out={out}", "--noprogress")
  assert proc.returncode == 0, proc.stderr[-3000:]
  responses = [json.loads(line) for line in out.read_text().splitlines()]
  by_line = {r["line"]: r for r in responses}
  assert sorted(by_line) == [1, 2, 3, 4, 5, 6]  # the BOM did not cost line 1
  assert by_line[1]["error"] is None and by_line[6]["error"] is None
  assert "lone UTF-16 surrogate" in by_line[2]["error"]["message"]
  assert "not usable JSON" in by_line[3]["error"]["message"] and "nested too deep" in by_line[4]["error"]["message"]
  assert "duplicate id 'ok-1': line 1" in by_line[5]["error"]["message"]
  assert temporaries(tmp_path) == []


@pytest.mark.parametrize("case", ["out_is_requests", "bad_store", "max_seq_len_above_model", "mesh_model_axis"])
def test_serve_fatal_errors_destroy_nothing(store_dir, requests_file, tmp_path, case):
  out = tmp_path / "out.jsonl"
  out.write_text("the previous responses\n")
  store, extra = store_dir, []
  if case == "out_is_requests":  # with a typo in --store too: the requests must survive it
    out, store, fragment = requests_file, tmp_path / "no-such-store", "is the input"
  elif case == "bad_store":
    store, fragment = tmp_path / "no-such-store", "cannot read --store"
  elif case == "mesh_model_axis":  # refused before any device is asked for (this process has one)
    extra, fragment = ["--mesh=model:3"], "model:3 splits every expert's hidden features and must divide"
  else:
    extra, fragment = ["--max_seq_len=512"], "max_seq_len=512 exceeds the model's max_position_embeddings=128"
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
  proc = cli("jaxmoe.cli.serve", f"--store={store}", f"--requests={requests_file}", f"--out={out}", *extra)
  assert proc.returncode == 2
  one_line_error(proc, fragment)
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
  assert temporaries(tmp_path) == []


def test_serve_to_a_full_disk_exits_2_with_a_message(store_dir, requests_file):
  proc = cli("jaxmoe.cli.serve", f"--store={store_dir}", f"--requests={requests_file}", "--out=/dev/full")
  assert proc.returncode == 2
  one_line_error(proc, "cannot write --out")
  assert pathlib.Path("/dev/full").is_char_device()  # written to, never replaced


def test_server_defaults_follow_the_models_limit_and_an_explicit_one_above_is_refused(store_dir):
  proc = subprocess.Popen(
    [sys.executable, "-m", "jaxmoe.cli.server", f"--store={store_dir}", "--port=0"],
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    line = proc.stdout.readline()
    assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
  finally:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
  assert "Traceback" not in proc.stderr.read()
  refused = cli("jaxmoe.cli.server", f"--store={store_dir}", "--port=0", "--max_seq_len=512")
  assert refused.returncode == 2
  one_line_error(refused, "max_seq_len=512 exceeds the model's max_position_embeddings=128")


def start_paused(tmp_path: pathlib.Path, module: str, *args) -> tuple[subprocess.Popen, pathlib.Path]:
  ready = tmp_path / "ready"
  proc = subprocess.Popen(
    [sys.executable, "-c", _PAUSED, str(ready), module, *map(str, args)],
    env=ENV,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 240
  while not ready.exists():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.monotonic() < deadline, "the CLI never reached its second part"
    time.sleep(0.05)
  return proc, ready


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  hf = hf_config()
  return write_hf(tmp_path_factory.mktemp("hf") / "hf", hf_tensors(hf), hf)


def test_sigterm_during_conversion_leaves_nothing(hf_dir, tmp_path):
  out = tmp_path / "ckpt"
  proc, ready = start_paused(tmp_path, "jaxmoe.cli.convert", f"--hf_dir={hf_dir}", f"--out={out}")
  assert temporaries(tmp_path)  # the partial conversion exists while it runs
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130 and "interrupted by SIGTERM" in err, err[-2000:]
  assert not out.exists() and temporaries(tmp_path) == []


def test_a_sigkilled_conversion_is_cleaned_up_by_the_next_run(hf_dir, tmp_path):
  out = tmp_path / "ckpt"
  proc, ready = start_paused(tmp_path, "jaxmoe.cli.convert", f"--hf_dir={hf_dir}", f"--out={out}")
  proc.kill()
  proc.communicate(timeout=60)
  (left,) = temporaries(tmp_path)
  assert (tmp_path / left / files.LOCK_NAME).is_file() and not out.exists()
  convert(hf_dir, out, progress=False)  # the rerun
  assert temporaries(tmp_path) == [] and checkpoint.load(out)[0].num_layers == 2


def test_sigterm_during_consolidation_leaves_nothing(store_dir, tmp_path):
  root = store_dir.parent
  out = tmp_path / "store"
  args = ["--tenant=a=" + str(root / "a"), "--tenant=b=" + str(root / "b"), f"--out={out}", "--share_fraction=0.5"]
  proc, ready = start_paused(tmp_path, "jaxmoe.cli.consolidate", *args)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 130 and "interrupted by SIGTERM" in err, err[-2000:]
  assert not out.exists() and temporaries(tmp_path) == []


@pytest.mark.parametrize(
  "module, args, fragment",
  [
    ("jaxmoe.cli.consolidate", ["--budget_gb=inf"], "--budget_gb=inf must be a finite number"),
    ("jaxmoe.cli.generate", ["--top_p=0", "--prompt_ids=1"], "top_p=0.0 must be in (0, 1]"),
  ],
)
def test_bad_flags_are_one_line_and_write_nothing(store_dir, tmp_path, module, args, fragment):
  root = store_dir.parent
  if module.endswith("consolidate"):
    args = [*args, f"--tenant=a={root / 'a'}", f"--tenant=b={root / 'b'}", f"--out={tmp_path / 'store'}"]
  else:
    args = [*args, f"--ckpt={root / 'a'}"]
  proc = cli(module, *args)
  assert proc.returncode == 1
  one_line_error(proc, fragment)
  assert list(tmp_path.iterdir()) == []
