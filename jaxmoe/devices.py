"""Where arrays live: the default device, pinned host memory, and freeing device buffers."""

from __future__ import annotations

import jax
import numpy as np


def default_sharding() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def to_device(tree):
  """Commits arrays to the default device, so every caller's arguments share one jit cache key."""
  return jax.device_put(tree, default_sharding())


def pinned_host_sharding() -> jax.sharding.Sharding | None:
  """Pinned host memory of the default device where it offers it (GPUs), else None."""
  dev = jax.devices()[0]
  if "pinned_host" in {m.kind for m in dev.addressable_memories()}:
    return jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
  return None


def to_host(x):
  """An array in pinned host memory where the device has it, else a numpy array."""
  host = pinned_host_sharding()
  return jax.device_put(x, host) if host is not None else np.asarray(x)


def free(tree) -> None:
  """Deletes the device buffers of a tree's jax arrays now, instead of at garbage collection."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and not leaf.is_deleted():
      leaf.delete()
