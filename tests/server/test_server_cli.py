"""jaxmoe-server as a command: binds loopback by default, answers, shuts down on SIGINT, exits 2 on a bad store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from tests.helpers import REPO


def server(*args: str) -> subprocess.Popen:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "jaxmoe.cli.server", *args]
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_server_command_serves_and_stops(store_dir):
  proc = server(f"--store={store_dir}", "--port=0", "--max_seq_len=64", "--api_key=k")
  try:
    line = proc.stdout.readline()
    assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    url = line.rsplit(" ", 1)[-1].strip()
    assert httpx.get(f"{url}/health", timeout=30).json()["tenants"] == ["tenant0", "tenant1", "tenant2"]
    assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
    models = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer k"}, timeout=30).json()
    assert [m["id"] for m in models["data"]] == ["tenant0", "tenant1", "tenant2"]
  finally:
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(60)
  assert rc == 0 and "Traceback" not in proc.stderr.read()


def test_server_command_fatal_errors_exit_2(tmp_path):
  no_store = server(f"--store={tmp_path / 'missing'}")
  assert no_store.wait(120) == 2 and "cannot read --store" in no_store.stderr.read()
