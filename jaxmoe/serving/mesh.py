"""The engine on a `jax.sharding.Mesh`: where weights, the KV cache and each step's rows are placed.

`EngineMesh` is the only place the serving path decides shardings, through
the logical axes of jaxmoe/nn/sharding.py:
  pool        sharded by slot over `expert`, after a placement renumbers the
              slots (jaxmoe/serving/placement.py), and each slot by its
              hidden features over `model` (jaxmoe/nn/expert_parallel.py); each process
              builds only the shards of its own devices, reading only their
              slots
  slot maps   renumbered to the placed pool, replicated
  backbones   replicated (bit for bit the one-device engine's outputs); or,
              with `split_backbones` (implied by a `model` axis), attention
              (q, k, v by head, o by output feature) and the LM head (by
              vocabulary) split over the expert and model axes, the rest
              replicated (jaxmoe/nn/sharding.py: PARAM_AXES): each device
              reads 1 / n of them, and results equal one device's up to the
              rounding of projections computed at other widths (CPU and GPU
              matmul kernels pick their summation by shape); swap mode stages
              them in host memory as before
  batch rows  tokens, block tables, lengths, sampling settings and tenant
              ids over `data` where the axis divides the batch, else
              replicated (an admission of one)
  KV pages    over `data`: one block of pages per data shard (jaxmoe/nn/
              paged.py), which the rows of that shard (max_batch / data
              consecutive rows) take their pages from (the engine's
              allocator); each device holds its shard's block, and paged
              reads and writes run per shard; by head too where backbones
              are split
  expert      with an expert cache smaller than the pool: C cache slots per
  cache       device, split like the pool (jaxmoe/serving/experts.py), and
              written per shard (`cache_write`)

`MeshHooks` wraps a family's engine hooks (`admit`, `decode`): it places the
step's inputs, runs the jitted step (or, with an expert cache, the family's
stepped programs) under `jax.set_mesh` (which is how the MoE boundary finds
the `expert` and `model` axes and turns expert-parallel, jaxmoe/nn/expert_parallel.py),
and returns the sampled tokens replicated, so every process can read them.
Without a mesh the engine does none of this.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmoe.nn import expert_parallel, paged, sharding
from jaxmoe.serving import placement as placement_lib


class EngineMesh:
  """Shardings of the engine's arrays on one mesh (see module docstring)."""

  def __init__(self, mesh: jax.sharding.Mesh, policy: str = "round_robin", split_backbones: bool = False):
    self.mesh, self.policy = mesh, policy
    self.split_backbones = split_backbones or mesh.shape.get("model", 1) > 1
    self.expert_shards = mesh.shape.get("expert", 1)
    self.data_shards = mesh.shape.get("data", 1)
    self.placement: placement_lib.Placement | None = None
    self._replicated = sharding.replicated(mesh)
    self._devices = set(mesh.devices.flat)
    self._gather = jax.jit(lambda x: x, out_shardings=self._replicated)
    self._writers: dict = {}  # leaf names -> the expert cache's compiled write

  @classmethod
  def create(cls, spec: str | None, policy: str = "round_robin", split_backbones: bool = False) -> EngineMesh | None:
    """The mesh of a `--mesh` spec ('data:2,expert:4'), or None for '' (one device, no mesh)."""
    if not sharding.parse_mesh(spec):
      return None
    return cls(sharding.make_mesh(spec), policy, split_backbones)

  # Weights.
  def place(self, num_slots: int, slot_maps: dict) -> placement_lib.Placement:
    """Decides which expert shard holds each of the pool's slots (the pool or the expert cache follows)."""
    self.placement = placement_lib.make(self.policy, num_slots, self.expert_shards, slot_maps)
    return self.placement

  def _pool_sharding(self, name: str, stacked: bool = True) -> NamedSharding:
    slot_axis, feature_axis = sharding.mesh_axis("pool", self.mesh), sharding.mesh_axis("mlp", self.mesh)
    return NamedSharding(self.mesh, expert_parallel.pool_spec(name, slot_axis if stacked else None, feature_axis))

  def pool(self, pool: dict, slot_maps: dict) -> dict:
    """The pool placed over `expert` (host leaves [X, ...] in, sharded [n * Xl, ...] out)."""
    self.place(next(iter(pool.values())).shape[0], slot_maps)
    out = {}
    for name, leaf in pool.items():
      shape = (len(self.placement.order), *leaf.shape[1:])
      target = self._pool_sharding(name)

      def shard(index, leaf=leaf, shape=shape):
        rows = index[0]
        start, stop = rows.start or 0, shape[0] if rows.stop is None else rows.stop
        return self.placement.rows(leaf, start, stop)[(slice(None), *index[1:])]

      out[name] = jax.make_array_from_callback(shape, target, shard)
    return out

  def cache_buffers(self, zeros: dict) -> dict:
    """An expert cache's empty buffers [S * C, ...], split like the pool (C per expert shard)."""
    return {n: jax.jit(lambda z: z, out_shardings=self._pool_sharding(n))(z) for n, z in zeros.items()}

  def cache_write(self, buffers: dict, positions, experts: dict) -> dict:
    """Experts (per leaf, a list of [...] host arrays) into cache positions [m] of the donated buffers:
    each expert shard writes only those in its own block, each device only its features."""
    stacked = {n: np.stack([np.asarray(p) for p in parts]) for n, parts in experts.items()}
    staged = {n: self._put(w, self._pool_sharding(n, stacked=False)) for n, w in stacked.items()}
    names = tuple(buffers)
    if names not in self._writers:
      self._writers[names] = self._cache_writer(names)
    return self._writers[names](buffers, self.replicate(np.asarray(positions, np.int32)), staged)

  def _cache_writer(self, names: tuple[str, ...]):
    slot_axis = sharding.mesh_axis("pool", self.mesh)
    pool_specs = {n: self._pool_sharding(n).spec for n in names}
    part_specs = {n: self._pool_sharding(n, stacked=False).spec for n in names}

    def body(buffers, positions, experts):
      held = next(iter(buffers.values())).shape[0]
      lo = 0 if slot_axis is None else jax.lax.axis_index(slot_axis) * held
      local = jnp.where((positions >= lo) & (positions < lo + held), positions - lo, held)  # others: dropped
      return {n: buffers[n].at[local].set(experts[n], mode="drop") for n in buffers}

    run = jax.shard_map(
      body, mesh=self.mesh, in_specs=(pool_specs, P(), part_specs), out_specs=pool_specs, check_vma=False
    )
    return jax.jit(run, donate_argnums=0)

  def slot_map(self, slot_map) -> jax.Array:
    """A slot map in the store's slots -> renumbered to the placed pool, replicated."""
    if self.placement is None:
      raise RuntimeError("place the pool before its slot maps")
    return self.replicate(self.placement.remap(slot_map))

  def replicate(self, tree):
    return jax.tree.map(lambda x: self._put(x, self._replicated), tree)

  def backbone(self, tree):
    """A backbone (or K stacked): replicated, or leaf by leaf with attention and the LM head split."""
    if not self.split_backbones:
      return self.replicate(tree)

    def place(path, x):
      return self._put(x, sharding.param(self.mesh, path[-1].key, np.shape(x)))

    return jax.tree_util.tree_map_with_path(place, tree)

  def kv(self, kv):
    """An empty cache of one shard's pages -> that, once per data shard, split over `data` and by head."""
    return paged.placed(kv, self.mesh, self.data_shards, by_head=self.split_backbones)

  # Each step's rows.
  def batch(self, tree):
    """Per-row arrays (leading dim B) over `data` where it divides B; arrays already on the mesh stay."""

    def place(x):
      if isinstance(x, jax.Array) and x.sharding.device_set == self._devices:
        return x
      x = np.asarray(x)
      return self._put(x, sharding.fitting(self.mesh, x.shape, "batch"))

    return jax.tree.map(place, tree)

  def gather(self, x) -> jax.Array:
    """x replicated on every device, so that every process can read it."""
    return self._gather(x)

  def context(self):
    return jax.set_mesh(self.mesh)

  def _put(self, x, target):
    if isinstance(x, jax.Array) and x.sharding == target:
      return x
    x = np.asarray(x)  # a host value: every process builds its own devices' shards of it
    return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

  # Accounting.
  def held_slots(self, pool: dict) -> int:
    """How many of the store's slots this process's devices hold (its share of the pool)."""
    leaf = next(iter(pool.values()))
    held: set[int] = set()
    for shard in leaf.addressable_shards:
      rows = shard.index[0]
      src = self.placement.order[rows.start or 0 : leaf.shape[0] if rows.stop is None else rows.stop]
      held.update(int(s) for s in src if s >= 0)
    return len(held)

  def bytes_per_device(self, tree) -> dict:
    """{device id: bytes of the tree's shards it holds} over this process's devices."""
    out: dict[int, int] = {}
    for leaf in jax.tree.leaves(tree):
      if isinstance(leaf, jax.Array):
        for s in leaf.addressable_shards:
          out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
    return out


class MeshHooks:
  """A family's engine hooks run on the mesh; every other attribute is the family's own."""

  def __init__(self, family, mesh: EngineMesh):
    self.family, self.mesh = family, mesh
    self.observer = None  # multi-host leader: sees each step's inputs first (jaxmoe/serving/distributed.py)

  def __getattr__(self, name):
    return getattr(self.family, name)

  def admit(self, params, tokens, kv, rows, cfg, impl, ops, cache=None):
    return self.run("admit", params, tokens, kv, rows, cfg, impl, ops, cache)

  def decode(self, params, tokens, kv, rows, cfg, impl, ops, cache=None):
    return self.run("decode", params, tokens, kv, rows, cfg, impl, ops, cache)

  def run(self, op: str, params, tokens, kv, rows, cfg, impl, ops, cache=None):
    if self.observer is None:
      return self._run(op, params, tokens, kv, rows, cfg, impl, ops, cache)
    with self.observer.lock:  # the broadcast and the step's collectives, in the same order everywhere
      self.observer(op, tokens, rows, ops)
      out, kv, rows = self._run(op, params, tokens, kv, rows, cfg, impl, ops, cache)
      self.observer.returned(op, rows)
      return out, kv, rows

  def _run(self, op: str, params, tokens, kv, rows, cfg, impl, ops, cache=None):
    m = self.mesh
    tokens, rows, ops = m.batch(tokens), m.batch(rows), m.batch(ops)
    with m.context():  # with a cache, the family's stepped programs (jaxmoe/serving/experts.py)
      out, kv, rows = getattr(self.family, op)(params, tokens, kv, rows, cfg, impl, ops, cache=cache)
    return m.gather(out), kv, rows


def hooks(family, mesh: EngineMesh | None):
  return family if mesh is None else MeshHooks(family, mesh)


def context(mesh: EngineMesh | None):
  return contextlib.nullcontext() if mesh is None else mesh.context()
