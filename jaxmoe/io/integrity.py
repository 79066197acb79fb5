"""Checksums and finiteness of parameter trees, and reading one orbax tree without trusting it.

A part's checksum is a SHA-256 over its leaves in key order: each leaf's key,
dtype and shape, then its bytes. It is taken from the arrays, not the files,
so it is independent of how orbax lays them out, and at load it is compared
against the arrays restored (orbax's compressed chunks carry no checksum of
their own: flipped bytes decode silently into other numbers). The same pass
refuses NaN and infinite values, naming the leaf.
"""

from __future__ import annotations

import hashlib
import pathlib
import warnings

import jax
import numpy as np

from jaxmoe import trees

ALGORITHM = "sha256"
CHUNK_BYTES = 64 << 20  # hash and finiteness are taken in chunks: bounded temporaries


class UnverifiedWarning(UserWarning):
  """A checkpoint or store written before jaxmoe recorded checksums, loaded unverified."""


def _flat(tree) -> list[tuple[str, np.ndarray]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return sorted((trees.path_name(p), np.asarray(x)) for p, x in flat)


def _chunks(a: np.ndarray):
  flat = np.ascontiguousarray(a).reshape(-1)
  step = max(1, CHUNK_BYTES // max(1, flat.itemsize))
  for start in range(0, flat.size, step):
    yield flat[start : start + step]


def digest(tree, what: str, error: type[Exception]) -> str:
  """The tree's checksum; raises `error` naming `what`/leaf if a float leaf is not finite."""
  h = hashlib.sha256()
  for key, a in _flat(tree):
    h.update(f"{key}:{a.dtype.name}:{list(a.shape)};".encode())
    floating = np.issubdtype(a.dtype, np.floating) or a.dtype.kind == "V"  # ml_dtypes floats are kind V
    for chunk in _chunks(a):
      h.update(chunk.view(np.uint8))
      if floating and not np.isfinite(chunk).all():
        raise error(f"{what}: {key} holds NaN or infinite values; refusing non-finite weights")
  return f"{ALGORITHM}:{h.hexdigest()}"


def one_line(e: BaseException, limit: int = 300) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def stored_shapes(ckptr, folder: pathlib.Path) -> dict:
  """{"a/b": (shape, dtype name)} of one orbax tree, from its metadata only ({} if unreadable)."""
  meta = ckptr.metadata(folder).item_metadata
  if meta is None:
    return {}
  flat = jax.tree_util.tree_flatten_with_path(getattr(meta, "tree", meta))[0]
  return {trees.path_name(p): (tuple(m.shape), np.dtype(m.dtype).name) for p, m in flat}


def target_shapes(target) -> dict:
  """{"a/b": (shape, dtype name)} of a tree of ShapeDtypeStructs."""
  flat = jax.tree_util.tree_flatten_with_path(target)[0]
  return {trees.path_name(p): (tuple(s.shape), np.dtype(s.dtype).name) for p, s in flat}


def shape_difference(got: dict, want: dict, prefix: str = "") -> str | None:
  """The first leaf that is missing, unexpected, or of another shape or dtype; None if all agree."""
  for key in sorted(set(got) | set(want)):
    if key not in got:
      return f"tensor {prefix}{key} is missing"
    if key not in want:
      return f"tensor {prefix}{key} is unexpected"
    if got[key] != want[key]:
      (gs, gd), (ws, wd) = got[key], want[key]
      return f"tensor {prefix}{key} is {gd}{list(gs)} on disk, the header says {wd}{list(ws)}"
  return None


def read_tree(ckptr, folder: pathlib.Path, target, recorded: str | None, verify: bool, error: type[Exception]):
  """One orbax tree as host numpy arrays, checked before use.

  Its stored shapes and dtypes must be the target's (never a silent cast);
  with `verify`, its values must be finite and match the `recorded` checksum
  (None: written before checksums, nothing to compare). Every failure raises
  `error` naming the folder.
  """
  try:
    got = stored_shapes(ckptr, folder)
  except Exception as e:  # orbax raises whatever its parsers raise on a damaged file
    raise error(f"{folder}: unreadable metadata ({one_line(e)})") from None
  if not got:
    raise error(f"{folder}: no readable orbax metadata (_METADATA missing or damaged)")
  diff = shape_difference(got, target_shapes(target))
  if diff:
    raise error(f"{folder}: {diff}")
  try:
    tree = jax.tree.map(np.asarray, ckptr.restore(folder, target))
  except Exception as e:
    raise error(f"{folder}: cannot be read ({one_line(e)})") from None
  if verify:
    found = digest(tree, str(folder), error)
    if recorded is not None and found != recorded:
      raise error(
        f"{folder}: checksum mismatch (recorded {recorded[:23]}..., read {found[:23]}...): the data is "
        "damaged; re-create it, or skip the check with verify_checksums=False / --noverify_checksums"
      )
  return tree


def warn_unverified(path: pathlib.Path, what: str) -> None:
  warnings.warn(
    f"{path}: {what} written before jaxmoe recorded checksums, so only finiteness is checked (write it again to add them)",
    UnverifiedWarning,
    stacklevel=3,
  )
