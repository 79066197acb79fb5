"""The K input checkpoints: names, validation, and reading them one layer at a time."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
from collections.abc import Iterator

import numpy as np

from jaxmoe.errors import ConsolidateError
from jaxmoe.io import checkpoint, integrity
from jaxmoe.io.store import StoreError, check_tenant_names


def parse_tenant(text: str) -> tuple[str, str]:
  """'NAME=CKPT' -> (NAME, CKPT)."""
  name, sep, path = text.partition("=")
  if not sep or not name or not path:
    raise ConsolidateError(f"--tenant={text!r}: expected NAME=CHECKPOINT_DIR")
  return name, path


def check_names(names: list[str]) -> None:
  if len(names) < 2:
    raise ConsolidateError(f"need at least 2 tenants to consolidate, got {len(names)}")
  try:
    check_tenant_names(names)
  except StoreError as e:
    raise ConsolidateError(str(e)) from None


def _first_config_difference(a, b) -> str | None:
  for field in dataclasses.fields(a):
    va, vb = getattr(a, field.name), getattr(b, field.name)
    if va != vb:
      return f"config field {field.name}: {va!r} vs {vb!r}"
  return None


def _first_tensor_difference(r: checkpoint.Reader) -> str | None:
  for part in r.part_names():
    try:
      got = r.part_shapes(part)
    except checkpoint.CheckpointError as e:  # a damaged _METADATA
      return str(e)
    diff = integrity.shape_difference(got, r.expected_shapes(part), f"{part}/")
    if diff:
      return diff
  return None


def check_same_architecture(readers: dict[str, checkpoint.Reader]) -> None:
  """Raises ConsolidateError naming the first config field or tensor that differs."""
  names = list(readers)
  first = readers[names[0]]
  for name in names[1:]:
    diff = _first_config_difference(first.config, readers[name].config)
    if diff:
      raise ConsolidateError(f"tenant {name!r} has a different architecture from {names[0]!r}: {diff}")
  for name in names:
    diff = _first_tensor_difference(readers[name])
    if diff:
      raise ConsolidateError(f"tenant {name!r} ({readers[name].path}): {diff}")


@contextlib.contextmanager
def open_tenants(
  tenants: dict[str, str | os.PathLike], verify_checksums: bool = True
) -> Iterator[dict[str, checkpoint.Reader]]:
  """Validated part-wise readers, in the given order of tenants."""
  check_names(list(tenants))
  with contextlib.ExitStack() as stack:
    readers = {}
    for name, path in tenants.items():
      try:
        readers[name] = stack.enter_context(checkpoint.reader(pathlib.Path(path), verify_checksums))
      except (checkpoint.CheckpointError, ValueError, OSError) as e:
        raise ConsolidateError(f"tenant {name!r}: {e}") from None
    check_same_architecture(readers)
    yield readers


def read_part(name: str, r: checkpoint.Reader, part: str) -> dict:
  """Tenant `name`'s checkpoint part; a damaged or non-finite one is a ConsolidateError naming the tenant."""
  try:
    return r.read_part(part)
  except checkpoint.CheckpointError as e:
    raise ConsolidateError(f"tenant {name!r}: {e}") from None


def logical_experts(pool: dict, slot_map_row: np.ndarray) -> dict[str, np.ndarray]:
  """A layer's pool [X, ...] and slot map row [E] -> logical experts {name: [E, ...]}."""
  if np.array_equal(slot_map_row, np.arange(next(iter(pool.values())).shape[0])):
    return {n: np.asarray(w) for n, w in pool.items()}  # a plain checkpoint: no copy
  return {n: np.asarray(w)[slot_map_row] for n, w in pool.items()}
