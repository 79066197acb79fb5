"""Distances between the A tenants' experts at one position (layer, logical expert).

Every metric gives a symmetric [A, A] matrix with a zero diagonal. Bitwise
identical experts get distance exactly 0 and are flagged in a separate [A, A]
boolean matrix, so they can be merged before anything else whatever the
metric's rounding does.

  l2      ||w_i - w_j||_2 over the flattened w1, w3, w2 (the paper; its score for
          A > 2 tenants is the sum over tenant pairs, see `pair_score`).
  cosine  1 - <w_i, w_j> / (|w_i| |w_j|) over the same flattened vectors.
  output  mean over calibration tokens and D of (f_i(x) - f_j(x))^2, where f is
          the expert (SwiGLU, or Switch's ReLU) and x runs over the hidden states that every tenant
          produced at this layer's MoE input on the calibration text.

Axis names (jaxmoe/axes.py): A tenants, E experts, T calibration tokens, D model dim, F ffn dim.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.io import files
from jaxmoe.nn.moe_ops import expert_kind

F32 = jnp.float32


class Metric(enum.Enum):
  L2 = "l2"
  COSINE = "cosine"
  OUTPUT = "output"


def _pairs(k: int) -> list[tuple[int, int]]:
  return [(i, j) for i in range(k) for j in range(i + 1, k)]


def _symmetric(k: int, values) -> jax.Array:
  out = jnp.zeros((k, k), F32)
  for (i, j), v in zip(_pairs(k), values):
    out = out.at[i, j].set(v).at[j, i].set(v)
  return out


@jax.jit
def _l2(w: dict) -> jax.Array:
  """w: {name: [A, ...]} -> [A, A]; differences taken directly (no Gram trick: it cancels)."""
  names = expert_kind(w)[0]
  k = len(w[names[0]])
  sq = [sum(jnp.sum(jnp.square(w[n][i].astype(F32) - w[n][j].astype(F32))) for n in names) for i, j in _pairs(k)]
  return _symmetric(k, [jnp.sqrt(s) for s in sq])


@jax.jit
def _cosine(w: dict) -> jax.Array:
  names = expert_kind(w)[0]
  k = len(w[names[0]])
  flat = [jnp.concatenate([w[n][i].astype(F32).ravel() for n in names]) for i in range(k)]
  norms = [jnp.sqrt(jnp.sum(jnp.square(v))) for v in flat]
  values = []
  for i, j in _pairs(k):
    denom = norms[i] * norms[j]
    cos = jnp.where(denom > 0, jnp.sum(flat[i] * flat[j]) / jnp.where(denom > 0, denom, 1.0), 0.0)
    values.append(jnp.clip(1.0 - cos, 0.0, 2.0))
  return _symmetric(k, values)


@jax.jit
def _output(w: dict, x: jax.Array) -> jax.Array:
  """x [T, D] hidden states; each tenant's expert applied to all of them."""
  names, expert = expert_kind(w)  # SwiGLU (Mixtral) or ReLU (Switch)
  k = len(w[names[0]])
  ys = [expert(x, *(w[n][i] for n in names)) for i in range(k)]  # A x [T, D] f32
  return _symmetric(k, [jnp.mean(jnp.square(ys[i] - ys[j])) for i, j in _pairs(k)])


def identical(w: dict) -> np.ndarray:
  """w: {name: [A, ...] or A arrays} -> [A, A] bool, True where two experts are equal bit for bit."""
  names = expert_kind(w)[0]
  k = len(w[names[0]])
  raw = {n: [np.ascontiguousarray(x).view(np.uint8).reshape(-1) for x in w[n]] for n in names}
  out = np.eye(k, dtype=bool)
  for i, j in _pairs(k):
    out[i, j] = out[j, i] = all(np.array_equal(raw[n][i], raw[n][j]) for n in names)
  return out


def pairwise(w: dict[str, np.ndarray], metric: Metric, inputs=None) -> tuple[np.ndarray, np.ndarray]:
  """Distances between the A tenants' experts of one position.

  Args:
    w: {"w1": [A, D, F], "w3": [A, D, F], "w2": [A, F, D]} (Switch: {"wi", "wo"}), tenant k's
      expert at k; or, per name, a list of the A tenants' arrays (views: no stacked copy).
    metric: which distance.
    inputs: [T, D] hidden states, needed by Metric.OUTPUT only.

  Returns:
    (dist [A, A] float64, same [A, A] bool); dist is exactly 0 where same is True.
  """
  with jax.default_matmul_precision("highest"):
    if metric is Metric.L2:
      dist = _l2(w)
    elif metric is Metric.COSINE:
      dist = _cosine(w)
    elif metric is Metric.OUTPUT:
      if inputs is None:
        raise ValueError("the output metric needs calibration hidden states")
      dist = _output(w, jnp.asarray(inputs))
    else:
      raise ValueError(f"unknown metric {metric!r}")
  same = identical(w)
  dist = np.where(same, 0.0, np.asarray(dist, np.float64))
  return dist, same


def layer_distances(experts: list[dict], metric: Metric, inputs=None) -> tuple[np.ndarray, np.ndarray]:
  """experts: A tenants' {name: [E, ...]} of one layer -> (dist [E, A, A], same [E, A, A])."""
  names = expert_kind(experts[0])[0]
  num_experts = experts[0][names[0]].shape[0]
  out = []
  for e in range(num_experts):
    out.append(pairwise({n: [t[n][e] for t in experts] for n in names}, metric, inputs))
    # XLA's worker threads copy each stack from their own malloc arenas, which keep the freed
    # pages: without a trim, a layer's positions leave about a layer of them behind.
    files.trim_heap()
  return np.stack([d for d, _ in out]), np.stack([s for _, s in out])


def pair_score(dist: np.ndarray) -> float:
  """The paper's per-position score: the sum of the distances over tenant pairs."""
  k = dist.shape[0]
  return float(sum(dist[i, j] for i, j in _pairs(k)))
