"""Shared fixtures: the committed HF fixtures, converted once per session."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np
import pytest

from tests.helpers import FIXTURES, HF_FIXTURES

_CACHE_ENV = {  # JAX's persistent compilation cache, every program kept however fast it compiled
  "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
_own_cache: str | None = None


def pytest_configure(config):
  """One compilation cache on disk for the whole run, the test processes and their subprocesses.

  Most of the suite's time is XLA compiling the same tiny programs again: in
  each module after `_release_compiled_programs`, and in every CLI subprocess.
  With the cache they are compiled once per run and read back after. A
  JAX_COMPILATION_CACHE_DIR already set is used as it is (and kept).
  """
  global _own_cache
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _own_cache = tempfile.mkdtemp(prefix="jaxmoe-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _own_cache
  for k, v in _CACHE_ENV.items():
    os.environ.setdefault(k, v)
  if "jax" in sys.modules:  # imported already (a plugin): its config read the environment before this
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
  if _own_cache is not None:
    shutil.rmtree(_own_cache, ignore_errors=True)


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


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops every compiled program after each test module.

  One process compiles thousands of small programs over the suite; each holds
  mapped code pages, and a long run can reach the kernel's limit on memory
  mappings (vm.max_map_count, 65530 here), after which XLA crashes in a compile.
  """
  yield
  import gc

  import jax

  jax.clear_caches()
  gc.collect()
