"""The matmul precision a model runs at."""

from __future__ import annotations

import contextlib

import jax


def precision(dtype: str):
  """Full float32 matmuls for float32 models (HF parity at 1e-4; GPUs would otherwise use TF32)."""
  if dtype == "float32":
    return jax.default_matmul_precision("float32")
  return contextlib.nullcontext()
