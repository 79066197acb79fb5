"""Runs tests/mesh/mesh_cases.py on 8 forced host devices, in a subprocess (jax fixes its device count at start)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO, cpu_devices_env


def test_mesh_cases_on_8_host_devices():
  env = cpu_devices_env(8)
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/mesh/mesh_cases.py"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
  assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
