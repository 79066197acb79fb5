"""bench/gpu_check.py --dry_run: the GPU check's whole plan at tiny shapes, on the CPU, within its budget."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO


def test_dry_run_runs_every_step(tmp_path):
  cmd = [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--dry_run", f"--out={tmp_path}", "--budget_s=400"]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=450, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  doc = json.loads((tmp_path / "results.json").read_text())
  assert {"card", "date", "versions"} <= set(doc["environment"]) and doc["dry_run"]
  steps = doc["steps"]
  assert list(steps) == ["tests", "kernels", "decode", "swap", "mixed", "offload"]
  assert all(s["status"] == "ok" for s in steps.values()), {k: s.get("stderr_tail", s) for k, s in steps.items()}
  assert all(r["per_layer_ms"] > 0 for r in steps["decode"]["result"]["rows"])
  assert steps["swap"]["result"]["switch_s"] > 0 and steps["mixed"]["result"]["ratio"] > 0
  assert list(tmp_path.glob("kernels-*-small.json"))
  rows = steps["offload"]["result"]["rows"]
  assert all(r["tokens_per_s"] > 0 for r in rows) and any(r["expert_cache_misses"] for r in rows)
