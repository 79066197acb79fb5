"""Paths and small helpers shared by the tests (importable as tests.helpers)."""

from __future__ import annotations

import os
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
HF_FIXTURES = ("gqa4x2", "mqa4x1_window")
SWITCH_FIXTURES = ("switch_e4_tied", "switch_e8_capacity")
LEGACY = FIXTURES / "legacy_v1"


def max_abs(a, b) -> str:
  """Max-abs and relative error, for assertion messages."""
  err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return f"max-abs {err.max():.3g}, relative {err.max() / max(np.abs(np.asarray(b)).max(), 1e-30):.3g}"


def recorded_close(got, want) -> None:
  """Float outputs against ones recorded under XLA's default optimisation: the suite compiles with LLVM's
  cheap pipeline (tests/conftest.py), which may round float sums differently, so equal within float32
  rounding (a misread weight is off by far more). Token ids are still compared exactly."""
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-5, err_msg=max_abs(got, want))


def cpu_devices_env(devices: int) -> dict:
  """The environment of a subprocess with `devices` forced CPU devices, importing this checkout; the
  XLA flags already set (the suite's compile level) are kept."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  return env
