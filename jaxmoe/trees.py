"""Helpers over parameter pytrees shared by every layout: byte counts, shape trees, random leaves."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]


def tree_bytes(tree) -> int:
  """Bytes of every array leaf of `tree` (host or device), from shapes and dtypes."""
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def is_shape(x) -> bool:
  """A leaf of a shape tree: a tuple of ints."""
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def abstract(shapes, dtype) -> Any:
  """A shape tree as ShapeDtypeStructs of `dtype`."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.dtype(dtype)), shapes, is_leaf=is_shape)


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{"a/b/0": shape} of a tree of arrays, ShapeDtypeStructs or shape tuples."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_shape)[0]
  return {path_name(p): tuple(x) if is_shape(x) else tuple(x.shape) for p, x in flat}


def path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def random_leaves(shapes, rng: np.random.Generator, dtype, scale: float):
  """Normal * scale leaves for a shape tree, in its flattening order; leaves named *norm* near 1."""
  dtype = jnp.dtype(dtype)

  def make(path, shape):
    if "norm" in jax.tree_util.keystr(path):
      return (1.0 + 0.1 * rng.standard_normal(shape)).astype(dtype)
    return (scale * rng.standard_normal(shape)).astype(dtype)

  return jax.tree_util.tree_map_with_path(make, shapes, is_leaf=is_shape)


def stack(trees: list, axis: int = 0):
  """Leaves of equal-structured trees stacked along a new `axis` (host numpy)."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs], axis=axis), *trees)
