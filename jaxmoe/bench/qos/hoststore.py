"""K synthetic fine-tunes of one random base, held in host memory, loaded per system.

`build_host_store(spec)` derives K tenants from one random base the way
fine-tunes relate (as `jaxmoe.serving.synthetic` does, but generated with
`jax.random` on the default device, one expert at a time, so Mixtral widths do
not go through host numpy): base weights are N(0, scale^2) (norms 1 +-
0.1); every tenant's backbone is the base plus noise * scale * N(0, 1); at a
random `own_fraction` of (layer, expert) positions tenants 1..K-1 each get
their own perturbed expert while tenant 0 keeps the base one. The store is
consolidated: an expert common to several tenants is held once.

Weights live on the host (each expert in pinned host memory where the device
offers it, else numpy); each benchmarked system copies in what it keeps on
the device and frees it on `close`, so one process can run systems whose
device footprints would not fit together:
  device_store()   the consolidated pool on the device, backbones on the host
                   (what the jaxmoe engine modes take)
  load_tenant(t)   one tenant's whole unconsolidated model on the device
                   (single model, full-model swap, static-partition slices)

"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.devices import default_sharding, free, to_host
from jaxmoe.families import base
from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.families.mixtral.layout import EXPERT_NAMES, backbone_shapes, expert_shapes, identity_slot_map
from jaxmoe.nn import moe_ops
from jaxmoe.serving.synthetic import MemoryStore, single_store
from jaxmoe.trees import is_shape, tree_bytes


@dataclasses.dataclass(frozen=True)
class StoreSpec:
  """The synthetic tenants: model shape, count, how much they differ."""

  model: MixtralConfig
  tenants: int = 4
  own_fraction: float = 0.25  # share of (layer, expert) positions where tenants 1..K-1 have their own
  noise: float = 0.05  # tenant perturbation, relative to `scale`
  scale: float = 0.1  # std of the base weights
  seed: int = 0


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _normal(key, shape, dtype, scale, offset):
  return (offset + scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _perturb(key, base, dtype, scale):
  return (base.astype(jnp.float32) + scale * jax.random.normal(key, base.shape, jnp.float32)).astype(dtype)


def _key(root, *ids: int):
  for i in ids:
    root = jax.random.fold_in(root, i)
  return root


@functools.partial(jax.jit, static_argnames=())
def _stack(parts):
  return jnp.stack(parts)


def stack_on_device(host_arrays) -> jax.Array:
  """[n host arrays of shape X] -> one device array [n, *X] (host-to-device copies, then one stack)."""
  parts = jax.device_put(list(host_arrays), default_sharding(), may_alias=False)
  out = _stack(parts)
  free(parts)
  return out


class HostStore:
  """Consolidated tenants in host memory (module docstring)."""

  def __init__(
    self,
    config: MixtralConfig,
    tenants: list[str],
    slots: list[dict[str, list]],
    backbones: dict[str, dict],
    slot_maps: dict[str, np.ndarray],
  ):
    self.config, self.tenants, self.slots = config, tenants, slots
    self.backbones, self.slot_maps = backbones, slot_maps

  @property
  def expert_bytes(self) -> int:
    return tree_bytes(expert_shapes_tree(self.config))

  @property
  def backbone_bytes(self) -> int:
    return tree_bytes(self.backbones[self.tenants[0]])

  @property
  def pool_bytes(self) -> int:
    return sum(len(layer["w1"]) for layer in self.slots) * self.expert_bytes

  @property
  def consolidated_bytes(self) -> int:
    """Weights a store holding every tenant needs: the pool once plus K backbones."""
    return self.pool_bytes + len(self.tenants) * self.backbone_bytes

  @property
  def tenant_bytes(self) -> int:
    """One tenant's whole model: its backbone and all L * E of its experts."""
    cfg = self.config
    return self.backbone_bytes + cfg.num_layers * cfg.num_experts * self.expert_bytes

  def expert_host(self, tenant: str, layer: int, expert: int) -> tuple:
    """The host arrays (w1, w3, w2) of `tenant`'s expert at (layer, expert)."""
    s = int(self.slot_maps[tenant][layer, expert])
    return tuple(self.slots[layer][w][s] for w in EXPERT_NAMES)

  def device_store(self) -> MemoryStore:
    """The consolidated pool on the device; backbones stay on the host for the engine's modes."""
    pool = moe_ops.pack({w: stack_on_device([x for layer in self.slots for x in layer[w]]) for w in EXPERT_NAMES})
    sizes = [len(layer[EXPERT_NAMES[0]]) for layer in self.slots]
    maps = {t: base.global_slot_map(m, sizes) for t, m in self.slot_maps.items()}
    return MemoryStore(self.config, list(self.tenants), pool, dict(self.backbones), maps)

  def host_memory_store(self) -> MemoryStore:
    """The consolidated pool left in host memory, for an engine with a device expert cache."""
    pool = {w: np.concatenate([np.stack(layer[w]) for layer in self.slots]) for w in EXPERT_NAMES}
    sizes = [len(layer[EXPERT_NAMES[0]]) for layer in self.slots]
    maps = {t: base.global_slot_map(m, sizes) for t, m in self.slot_maps.items()}
    return MemoryStore(self.config, list(self.tenants), pool, dict(self.backbones), maps)

  def load_tenant(self, tenant: str) -> dict:
    """`tenant`'s whole model copied onto the device (identity slot map); blocks until it is there."""
    smap = self.slot_maps[tenant]
    experts = moe_ops.pack(
      {w: stack_on_device([layer[w][s] for i, layer in enumerate(self.slots) for s in smap[i]]) for w in EXPERT_NAMES}
    )
    backbone = jax.device_put(self.backbones[tenant], default_sharding(), may_alias=False)
    params = {
      "backbone": backbone,
      "experts": experts,
      "slot_map": jax.device_put(identity_slot_map(self.config), default_sharding()),
    }
    return jax.block_until_ready(params)


def host_tenant(host: HostStore, tenant: str) -> dict:
  """`tenant`'s whole model in host memory (identity slot map), for an engine that offloads its experts."""
  smap = host.slot_maps[tenant]
  experts = {w: np.stack([layer[w][s] for i, layer in enumerate(host.slots) for s in smap[i]]) for w in EXPERT_NAMES}
  return {"backbone": host.backbones[tenant], "experts": experts, "slot_map": identity_slot_map(host.config)}


def expert_shapes_tree(cfg: MixtralConfig) -> dict:
  """One expert as ShapeDtypeStructs (for byte counts)."""
  dtype = jnp.dtype(cfg.dtype)
  return {w: jax.ShapeDtypeStruct(s[1:], dtype) for w, s in expert_shapes(cfg, 1).items()}


def tenant_model_store(params: dict, config: MixtralConfig, tenant: str) -> MemoryStore:
  """A one-tenant store around a loaded whole model (for an engine in resident mode)."""
  return single_store(config, params, tenant)


def _backbones(cfg: MixtralConfig, spec: StoreSpec, names: list[str], root) -> dict[str, dict]:
  dtype = jnp.dtype(cfg.dtype)
  flat, treedef = jax.tree_util.tree_flatten_with_path(backbone_shapes(cfg), is_leaf=is_shape)
  shapes, paths = [s for _, s in flat], [jax.tree_util.keystr(p) for p, _ in flat]
  out = {n: [] for n in names}
  for i, (shape, path) in enumerate(zip(shapes, paths)):
    norm = "norm" in path
    base = _normal(_key(root, 0, i), shape, dtype, 0.1 if norm else spec.scale, 1.0 if norm else 0.0)
    for t, n in enumerate(names):
      leaf = _perturb(_key(root, 1, i, t), base, dtype, spec.noise * (0.1 if norm else spec.scale))
      out[n].append(np.asarray(leaf))
    free(base)
  return {n: jax.tree.unflatten(treedef, leaves) for n, leaves in out.items()}


def _layer_experts(cfg: MixtralConfig, spec: StoreSpec, names: list[str], own, root, layer: int):
  """One layer's pool slots (host) and each tenant's slot map row."""
  dtype = jnp.dtype(cfg.dtype)
  shapes = {w: s[1:] for w, s in expert_shapes(cfg, 1).items()}
  slots = {w: [] for w in EXPERT_NAMES}
  rows = {n: np.arange(cfg.num_experts, dtype=np.int32) for n in names}
  extra = []
  for e in range(cfg.num_experts):
    for j, w in enumerate(EXPERT_NAMES):
      base = _normal(_key(root, 2, layer, e, j), shapes[w], dtype, spec.scale, 0.0)
      slots[w].append(to_host(base))
      if own[layer, e]:
        for t in range(1, len(names)):
          mine = _perturb(_key(root, 3, layer, e, t, j), base, dtype, spec.noise * spec.scale)
          extra.append((e, t, w, to_host(mine)))
          free(mine)
      free(base)
  for e, t, w, x in extra:  # own experts after the E base slots, in (expert, tenant) order
    if w == EXPERT_NAMES[0]:
      rows[names[t]][e] = len(slots[w])
    slots[w].append(x)
  return slots, rows


def build_host_store(spec: StoreSpec) -> HostStore:
  """K tenants derived from one random base (module docstring); deterministic in spec.seed."""
  cfg, names = spec.model, [f"tenant{i}" for i in range(spec.tenants)]
  own = np.random.default_rng(spec.seed).random((cfg.num_layers, cfg.num_experts)) < spec.own_fraction
  root = jax.random.key(spec.seed)
  backbones = _backbones(cfg, spec, names, root)
  slots, maps = [], {n: np.zeros((cfg.num_layers, cfg.num_experts), np.int32) for n in names}
  for layer in range(cfg.num_layers):
    layer_slots, rows = _layer_experts(cfg, spec, names, own, root, layer)
    slots.append(layer_slots)
    for n in names:
      maps[n][layer] = rows[n]
  return HostStore(cfg, names, slots, backbones, maps)
