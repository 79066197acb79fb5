"""Shared fixtures: the committed HF fixtures, converted once per session."""

from __future__ import annotations

import os

# The suite's programs are tiny and each runs a few times, so compiling dominates its time. On the
# CPU, LLVM's cheap pipeline compiles in about two thirds of the time, and XLA's older fusion emitters
# (LLVM IR built directly, not through MLIR) in about half of what remains, with the same values up to
# float rounding (tests against outputs recorded at the default level use tests.helpers.recorded_close).
# Set before jax is imported; subprocesses (the CLI tests) inherit it. JAXMOE_TEST_FULL_OPT=1 keeps
# XLA's defaults (bench/gpu_check.py sets it for the GPU tests).
if not os.environ.get("JAXMOE_TEST_FULL_OPT"):
  _CHEAP = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
  )
  if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_CHEAP}".strip()

import numpy as np
import pytest

from tests.helpers import FIXTURES, HF_FIXTURES


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
  """name -> folder of the jaxmoe checkpoint converted from tests/fixtures/<name>."""
  from jaxmoe.io.convert import convert

  root = tmp_path_factory.mktemp("converted")
  out = {}
  for name in HF_FIXTURES:
    convert(FIXTURES / name, root / name, dtype="float32", progress=False)
    out[name] = root / name
  return out


@pytest.fixture(scope="session")
def models(converted):
  """name -> loaded MixtralModel, shared so jitted programs compile once."""
  import jaxmoe

  return {name: jaxmoe.load(path) for name, path in converted.items()}


@pytest.fixture(scope="session")
def golden():
  return {name: dict(np.load(FIXTURES / name / "golden.npz")) for name in HF_FIXTURES}


def _mappings() -> int | None:
  """This process's memory mappings (Linux), or None where /proc does not say."""
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:
    return None


# A quarter of Linux's default vm.max_map_count (65530): far from it, yet rarely reached by one worker.
MAPPINGS_BEFORE_RELEASE = 16_000


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after a test module once the process has many memory mappings.

  One process compiles thousands of small programs over the suite; each holds
  mapped code pages, and a long run can reach the kernel's limit on memory
  mappings, after which XLA crashes in a compile. Releasing after every module
  costs about a second each and recompiles what later modules share, so it
  waits until the mappings pass MAPPINGS_BEFORE_RELEASE (always, where they
  cannot be counted).
  """
  yield
  count = _mappings()
  if count is not None and count < MAPPINGS_BEFORE_RELEASE:
    return
  import gc

  import jax

  jax.clear_caches()
  gc.collect()
