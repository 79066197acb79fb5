"""Sharding declared once: logical axis names -> mesh axes, the mesh from a spec, layer-boundary constraints.

The model code never names a mesh axis. Arrays are described by logical axes
(`RULES`, after MaxText's `logical_axis_rules`, slimmed down), and the mesh a
deployment runs on (`"data:2,expert:4"`) decides which of them are split:

  batch    rows of a batch, and the tokens T flattened from them  -> data
  pool     expert-pool slots X (the pool is sharded by slot)      -> expert
  mlp      an expert's hidden features F (nn/expert_parallel.py)   -> model
  heads    attention heads N / M (q, k, v and the KV pages)      -> expert x model
  out      the attention output projection's output features D   -> expert x model
  vocab    the LM head's output features V                        -> expert x model
  pages    KV-cache pages (jaxmoe/nn/paged.py: a block per shard)  -> data
  others   embed D, layers L, tenants A, experts E                 -> replicated

A logical axis whose mesh axes are absent from the mesh (or have size 1) is
replicated; one mapped to several axes that do not divide the dim falls back
to the longest leading part of them that does, or to replicated. So one table
serves every mesh, a single device included.

Backbones, where the engine splits them (jaxmoe/serving/mesh.py), are split
over every device that splits the pool, over `expert` by slot and `model` by
features (all of expert x model): a device reads 1 / n of every tenant's attention
and LM head, where replicated backbones are each read whole by every device
(in mixed mode K of them per step). `PARAM_AXES` names the logical axes of
each backbone leaf (by its name, shared by the families). No contraction is
divided between devices: q, k and v are split by head and attention runs per
head; the attention output is gathered whole before the output projection,
which is split over its output features; its result and the logits are
gathered at the layer's boundary (`constrain`). Every element is thus the
same sum of the same products as on one device, but a matmul kernel of
another output width may add them in another order (XLA's CPU kernels do):
equal to float rounding, not bit for bit.

Meshes use `AxisType.Auto`: XLA's partitioner propagates shardings from the
placed inputs and from the constraints at layer boundaries (the MoE boundary's
`shard_map`, jaxmoe/nn/expert_parallel.py); the model code is the single-device code,
whose constraints are no-ops without a mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "expert", "model")

RULES: dict[str, str | tuple[str, ...] | None] = {
  "batch": "data",
  "pool": "expert",
  "heads": ("expert", "model"),
  "out": ("expert", "model"),
  "vocab": ("expert", "model"),
  "embed": None,
  "mlp": "model",
  "layers": None,
  "tenants": None,
  "experts": None,
  "pages": "data",
}

# Logical axes of a backbone leaf's trailing dims, by the leaf's name (leading dims, layers L and
# tenants A, are replicated); a leaf not named here is replicated.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
  **{name: ("embed", "heads", None) for name in ("q", "k", "v", "cq", "ck", "cv")},  # [D, N, H]
  **{name: (None, None, "out") for name in ("o", "co")},  # [N, H, D]
  "lm_head": ("embed", "vocab"),  # [D, V]
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


def mesh_axis(logical: str | None, mesh) -> str | tuple[str, ...] | None:
  """The mesh axis (or axes) a logical axis maps to on `mesh`, or None (replicated)."""
  if logical is None:
    return None
  if logical not in RULES:
    raise KeyError(f"unknown logical axis {logical!r}; known: {list(RULES)}")
  rule = RULES[logical]
  axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if mesh.shape.get(a, 1) > 1)
  return None if not axes else axes[0] if len(axes) == 1 else axes


def axes_size(mesh, axes: str | tuple[str, ...] | None) -> int:
  """Devices a dim mapped to `axes` is split over."""
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))


def spec(mesh, *logical: str | None) -> P:
  """PartitionSpec of an array whose dims carry these logical axes (None: replicated)."""
  return P(*(mesh_axis(name, mesh) for name in logical))


def named(mesh, *logical: str | None, memory_kind: str | None = None) -> NamedSharding:
  return NamedSharding(mesh, spec(mesh, *logical), memory_kind=memory_kind)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fitting_spec(mesh, shape: tuple[int, ...], logical: tuple) -> P:
  """The PartitionSpec of `fitting`."""
  axes = []
  for dim, name in zip(shape, logical + (None,) * (len(shape) - len(logical))):
    axis = mesh_axis(name, mesh)
    while isinstance(axis, tuple) and dim % axes_size(mesh, axis):  # the longest leading axes that divide
      axis = axis[:-1] if len(axis) > 2 else axis[0]
    axes.append(axis if axis is not None and dim % axes_size(mesh, axis) == 0 else None)
  return P(*axes)


def fitting(mesh, shape: tuple[int, ...], *logical: str | None) -> NamedSharding:
  """`named`, but a dim split over the longest leading part of its mesh axes that divides it, or else
  replicated (a batch of 1 on data:2; 2 KV heads on expert:2,model:2 are split over expert only)."""
  return NamedSharding(mesh, fitting_spec(mesh, shape, logical))


def param(mesh, name: str, shape: tuple[int, ...]) -> NamedSharding:
  """Where a backbone leaf called `name` lives: its trailing dims by PARAM_AXES, where they divide."""
  trailing = PARAM_AXES.get(name, ())
  return fitting(mesh, shape, *(None,) * (len(shape) - len(trailing)), *trailing)


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
  return jax.lax.with_sharding_constraint(x, fitting_spec(mesh, x.shape, logical))
