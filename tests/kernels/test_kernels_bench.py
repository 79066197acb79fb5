"""Smoke test of bench/kernels.py --small: tiny shapes, interpret-mode kernels, on any backend."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO as ROOT


def test_bench_small_writes_json(tmp_path):
  cmd = [
    sys.executable,
    str(ROOT / "bench" / "kernels.py"),
    "--small",
    "--tokens=8",
    "--variants=pallas",
    "--min_time_s=0",
    f"--out_dir={tmp_path}",
  ]
  run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  [path] = tmp_path.glob("kernels-*-small.json")
  report = json.loads(path.read_text())
  assert {"card", "date", "versions", "ceilings", "results"} <= set(report)
  assert [r["status"] for r in report["results"]] == ["ok"], report["results"]
  assert all(r["compile_s"] > 0 and r["gbps"] > 0 for r in report["results"])
