"""Sharding declared once: logical axis names -> mesh axes, the mesh from a spec, layer-boundary constraints.

The model code never names a mesh axis. Arrays are described by logical axes
(`RULES`, after MaxText's `logical_axis_rules`, slimmed down), and the mesh a
deployment runs on (`"data:2,expert:4"`) decides which of them are split:

  batch    rows of a batch, and the tokens T flattened from them  -> data
  pool     expert-pool slots X (the pool is sharded by slot)      -> expert
  heads    attention heads N / M                                  -> model
  vocab    the LM head's output features V                        -> model
  pages    KV-cache pages (jaxmoe/nn/paged.py: a block per shard)  -> data
  others   embed D, mlp F, layers L, tenants A, experts E          -> replicated

A logical axis whose mesh axis is absent from the mesh (or has size 1) is
replicated, so one table serves every mesh, a single device included. The
`model` axis is declared for meshes that split attention and the LM head; the
serving engine keeps backbones replicated (they are small next to the pool)
and uses `data` and `expert` only.

Meshes use `AxisType.Auto`: XLA's partitioner propagates shardings from the
placed inputs and from the constraints at layer boundaries (the MoE boundary's
`shard_map`, jaxmoe/nn/moe.py); the model code is the single-device
code unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "expert", "model")

RULES: dict[str, str | None] = {
  "batch": "data",
  "pool": "expert",
  "heads": "model",
  "vocab": "model",
  "embed": None,
  "mlp": None,
  "layers": None,
  "tenants": None,
  "experts": None,
  "pages": "data",
}


def parse_mesh(spec: str | None) -> tuple[tuple[str, int], ...]:
  """'data:2,expert:4' -> (('data', 2), ('expert', 4)); '' or None -> ().

  The order is the spec's: the device grid's, outermost axis first. Devices
  are numbered process by process, so on several hosts the first axis is the
  one that spans them: 'data:2,expert:4' on two hosts of 4 devices keeps each
  expert all-reduce within a host (each host holds the whole pool), and
  'expert:2,data:4' splits the pool across the hosts (each holds half).
  """
  if not spec or not spec.strip():
    return ()
  sizes: dict[str, int] = {}
  for part in spec.split(","):
    name, sep, size = part.strip().partition(":")
    if not sep or not size.strip().isdigit() or int(size) < 1:
      raise ValueError(f"mesh entry {part!r} must be axis:size with size >= 1 (e.g. 'data:2,expert:4')")
    if name not in MESH_AXES:
      raise ValueError(f"unknown mesh axis {name!r} in {spec!r}; axes are {list(MESH_AXES)}")
    if name in sizes:
      raise ValueError(f"mesh axis {name!r} appears twice in {spec!r}")
    sizes[name] = int(size)
  return tuple(sizes.items())


def make_mesh(spec: str | Sequence[tuple[str, int]] | None, devices: Sequence | None = None) -> Mesh:
  """A mesh over `devices` (default: all of them, every process's) from a spec string or pairs.

  The first prod(sizes) devices are used (all of them on a full mesh); an
  empty spec is a one-device mesh. Devices are laid out by
  `jax.make_mesh` (which knows the platform's topology) when all are used.
  """
  axes = parse_mesh(spec) if isinstance(spec, str) or spec is None else tuple(spec)
  all_devices = list(devices) if devices is not None else jax.devices()
  if not axes:
    axes, all_devices = (("data", 1),), all_devices[:1]
  names = tuple(a for a, _ in axes)
  shape = tuple(n for _, n in axes)
  need = math.prod(shape)
  if need > len(all_devices):
    raise ValueError(f"mesh {dict(axes)} needs {need} devices; {len(all_devices)} are available")
  types = (AxisType.Auto,) * len(names)
  if devices is None and need == jax.device_count():
    return jax.make_mesh(shape, names, axis_types=types)
  return Mesh(np.asarray(all_devices[:need]).reshape(shape), names, axis_types=types)


def mesh_axis(logical: str | None, mesh) -> str | None:
  """The mesh axis a logical axis maps to on `mesh`, or None (replicated)."""
  if logical is None:
    return None
  if logical not in RULES:
    raise KeyError(f"unknown logical axis {logical!r}; known: {list(RULES)}")
  axis = RULES[logical]
  return axis if axis is not None and mesh.shape.get(axis, 1) > 1 else None


def spec(mesh, *logical: str | None) -> P:
  """PartitionSpec of an array whose dims carry these logical axes (None: replicated)."""
  return P(*(mesh_axis(name, mesh) for name in logical))


def named(mesh, *logical: str | None, memory_kind: str | None = None) -> NamedSharding:
  return NamedSharding(mesh, spec(mesh, *logical), memory_kind=memory_kind)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fitting(mesh, shape: tuple[int, ...], *logical: str | None) -> NamedSharding:
  """`named`, but a dim that its mesh axis does not divide is replicated (a batch of 1 on data:2)."""
  axes = []
  for dim, name in zip(shape, logical + (None,) * (len(shape) - len(logical))):
    axis = mesh_axis(name, mesh)
    axes.append(axis if axis is not None and dim % mesh.shape[axis] == 0 else None)
  return NamedSharding(mesh, P(*axes))


def context_mesh():
  """The mesh set by `jax.set_mesh` around the current trace or call, or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def axis_size(axis: str) -> int:
  """Size of mesh axis `axis` in the context mesh (1 when there is none or it lacks the axis)."""
  mesh = context_mesh()
  return 1 if mesh is None else mesh.shape.get(axis, 1)


def constrain(x, *logical: str | None):
  """A layer-boundary constraint: x sharded by its logical axes on the context mesh (a no-op without one)."""
  mesh = context_mesh()
  if mesh is None:
    return x
  axes = []
  for dim, name in zip(x.shape, logical + (None,) * (x.ndim - len(logical))):
    axis = mesh_axis(name, mesh)
    axes.append(axis if axis is not None and dim % mesh.shape[axis] == 0 else None)
  return jax.lax.with_sharding_constraint(x, P(*axes))
