"""Model merging baselines: K fine-tunes of one base -> ONE model serving every tenant.

Every weight is merged, experts and backbones (embeddings, attention, norms,
routers, LM head) alike; that is what sets these apart from consolidation,
which keeps each tenant's own backbone and router. With task vectors
tau_k = theta_k - theta_base:

  average          mean_k theta_k (plain weight averaging)
  task arithmetic  theta_base + lam * sum_k tau_k (Ilharco et al., 2023)
  TIES             trim each tau_k to its `density` largest magnitudes (per
                   tensor), elect a sign per entry (sign of the sum of the
                   trimmed values), average the trimmed values that agree with
                   it (disjoint mean), theta_base + lam * that (Yadav et al., 2023)
  DARE             drop each task-vector entry with probability p and rescale
                   the survivors by 1 / (1 - p), then task arithmetic
                   (Yu et al., 2024); seeded, so a merge is reproducible

Models are the served layout of plain models (X = L * E, identity slot maps);
a store's tenant becomes one with `Store.export_params`. Arithmetic is in
float32, results in the leaves' dtype.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

import jax
import numpy as np

from jaxmoe.trees import Params

F32 = np.float32


class Method(enum.Enum):
  AVERAGE = "average"
  TASK_ARITHMETIC = "task_arithmetic"
  TIES = "ties"
  DARE = "dare"


@dataclasses.dataclass(frozen=True)
class MergeSpec:
  """One merging baseline and its hyperparameters (those its method does not use are ignored)."""

  method: Method
  lam: float = 1.0  # scale of the merged task vector
  density: float = 0.2  # TIES: fraction of each task vector kept
  drop_rate: float = 0.9  # DARE: probability of dropping a task-vector entry
  seed: int = 0  # DARE

  @property
  def label(self) -> str:
    if self.method is Method.AVERAGE:
      return "average"
    if self.method is Method.TASK_ARITHMETIC:
      return f"task_arithmetic(lam={self.lam:g})"
    if self.method is Method.TIES:
      return f"ties(density={self.density:g},lam={self.lam:g})"
    return f"dare(drop={self.drop_rate:g},lam={self.lam:g})"


def _weights(model: Params) -> Params:
  smap = np.asarray(model["slot_map"])
  if not np.array_equal(smap, np.arange(smap.size).reshape(smap.shape)):
    raise ValueError("merging needs plain models (identity slot maps): use Store.export_params")
  return {k: v for k, v in model.items() if k != "slot_map"}


def _merged(like: Params, tree: Params) -> Params:
  """Casts float32 leaves back to `like`'s dtypes and adds its slot map."""
  out = jax.tree.map(lambda x, ref: np.asarray(x).astype(np.asarray(ref).dtype), tree, _weights(like))
  return {**out, "slot_map": np.asarray(like["slot_map"], np.int32).copy()}


def _task_vectors(base: Params, models: Sequence[Params]) -> list[Params]:
  b = _weights(base)
  return [jax.tree.map(lambda x, y: np.asarray(x, F32) - np.asarray(y, F32), _weights(m), b) for m in models]


def _add(base: Params, tau: Params, lam: float) -> Params:
  return _merged(base, jax.tree.map(lambda b, t: np.asarray(b, F32) + F32(lam) * t, _weights(base), tau))


def average(models: Sequence[Params]) -> Params:
  """Plain weight averaging: mean_k theta_k."""
  stacked = jax.tree.map(
    lambda *xs: np.mean(np.stack([np.asarray(x, F32) for x in xs]), axis=0), *[_weights(m) for m in models]
  )
  return _merged(models[0], stacked)


def task_arithmetic(base: Params, models: Sequence[Params], lam: float) -> Params:
  """theta_base + lam * sum_k (theta_k - theta_base)."""
  taus = _task_vectors(base, models)
  return _add(base, jax.tree.map(lambda *ts: sum(ts), *taus), lam)


def trim(tau: np.ndarray, density: float) -> np.ndarray:
  """Keeps the ceil(density * n) largest-magnitude entries of one tensor, zeroes the rest."""
  flat = tau.ravel()
  keep = int(np.ceil(density * flat.size))
  if keep >= flat.size:
    return tau.copy()
  out = np.zeros_like(flat)
  if keep > 0:
    top = np.argpartition(-np.abs(flat), keep - 1)[:keep]
    out[top] = flat[top]
  return out.reshape(tau.shape)


def ties_tensor(taus: Sequence[np.ndarray], density: float) -> np.ndarray:
  """TIES on one tensor: trim, elect sign, disjoint mean -> the merged task vector."""
  trimmed = np.stack([trim(t, density) for t in taus])  # [A, ...]
  sign = np.sign(trimmed.sum(axis=0))
  agree = (np.sign(trimmed) == sign) & (trimmed != 0)
  count = agree.sum(axis=0)
  total = np.where(agree, trimmed, 0.0).sum(axis=0)
  return np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(F32)


def ties(base: Params, models: Sequence[Params], density: float, lam: float) -> Params:
  """theta_base + lam * TIES(tau_1..tau_K)."""
  taus = _task_vectors(base, models)
  return _add(base, jax.tree.map(lambda *ts: ties_tensor(ts, density), *taus), lam)


def dare_tensor(tau: np.ndarray, drop_rate: float, rng: np.random.Generator) -> np.ndarray:
  """Drops entries with probability `drop_rate` and rescales the rest: E[result] = tau."""
  if not 0.0 <= drop_rate < 1.0:
    raise ValueError(f"drop_rate={drop_rate} must be in [0, 1)")
  keep = rng.random(tau.shape) >= drop_rate
  return np.where(keep, tau / F32(1.0 - drop_rate), 0.0).astype(F32)


def dare(base: Params, models: Sequence[Params], drop_rate: float, lam: float, seed: int = 0) -> Params:
  """theta_base + lam * sum_k DARE(tau_k); one seeded generator draws every mask in tree order."""
  rng = np.random.default_rng(seed)
  taus = [jax.tree.map(lambda t: dare_tensor(t, drop_rate, rng), tau) for tau in _task_vectors(base, models)]
  return _add(base, jax.tree.map(lambda *ts: sum(ts), *taus), lam)


def merge(spec: MergeSpec, base: Params, models: Sequence[Params]) -> Params:
  """The one model `spec` makes of the K fine-tunes `models` of `base`."""
  if spec.method is Method.AVERAGE:
    return average(models)
  if spec.method is Method.TASK_ARITHMETIC:
    return task_arithmetic(base, models, spec.lam)
  if spec.method is Method.TIES:
    return ties(base, models, spec.density, spec.lam)
  if spec.method is Method.DARE:
    return dare(base, models, spec.drop_rate, spec.lam, spec.seed)
  raise ValueError(f"unknown merging method {spec.method!r}")
