"""What every family provides, and the layout helpers they share.

Served layout (what the Flax modules' variables and the jitted functions take):

  {"backbone": tree, "experts": {leaf: [X, ...]}, "slot_map": [L, E] int32}

The backbone is the tenant's non-expert weights, its repeated blocks stacked
on a leading layer axis (the modules scan over it). The expert pool is one
array per expert leaf over all MoE layers; slot_map[l, e] is the pool slot of
MoE layer l's logical expert e. A single model has X = L * E and slot_map[l]
= l * E + arange(E).

Checkpoint parts (what checkpoints and stores hold on disk, one layer at a
time): "globals" plus one part per block, a block with an MoE layer holding its
own pool [X_l, ...] and, in the header, slot maps local to it. `join_pools` and
`split_pools` convert between the per-layer pools and the served pool.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from types import ModuleType
from typing import Any

import jax
import numpy as np

from jaxmoe import trees
from jaxmoe.errors import ConfigError, LayoutError

Params = trees.Params


class JsonConfig:
  """JSON round trip and `replace` for the frozen config dataclasses of every family."""

  def json_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.json_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str):
    data = json.loads(text)
    if not isinstance(data, dict):
      raise ConfigError(f"jaxmoe config: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
      raise ConfigError(f"jaxmoe config: unknown keys {unknown}")
    try:
      return cls(**data)
    except TypeError as e:
      raise ConfigError(f"jaxmoe config: {e}") from None

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family's entry in the registry."""

  name: str  # config.architecture
  hf_model_types: tuple[str, ...]  # config.json model_type values it converts
  config: type  # frozen dataclass with from_hf(dict, dtype) and from_json(text)
  layout: ModuleType  # param_shapes, EXPERT_NAMES, part_names, moe_parts, join_parts, split_parts, ...
  model: type  # the public model object `jaxmoe.load` returns
  engine: Any  # the serving engine's hooks (init_kv, check_lengths, admit, decode, jitted)
  hf_parts: Callable  # (cfg, tensor index, read) -> [(part name, tree)], checked before any read
  calibration_step: Callable | None = None  # one layer on calibration text (consolidation's output metric)


def identity_slot_map(num_layers: int, num_experts: int) -> np.ndarray:
  """[L, E] of a single model: layer l's expert e at pool slot l * E + e."""
  return np.arange(num_layers * num_experts, dtype=np.int32).reshape(num_layers, num_experts)


def local_identity_slot_map(num_layers: int, num_experts: int) -> np.ndarray:
  """[L, E] local to each layer's pool of a single model: expert e at slot e."""
  return np.tile(np.arange(num_experts, dtype=np.int32), (num_layers, 1))


def pool_offsets(slots_per_layer) -> np.ndarray:
  """[L] first served pool slot of each MoE layer's pool."""
  return np.concatenate([[0], np.cumsum(slots_per_layer)[:-1]]).astype(np.int32)


def global_slot_map(local_map, slots_per_layer) -> np.ndarray:
  """A slot map local to each layer's pool [L, E] -> slots of the served pool."""
  return (np.asarray(local_map, np.int32) + pool_offsets(slots_per_layer)[:, None]).astype(np.int32)


def join_pools(pools: list[dict], local_map: np.ndarray) -> tuple[dict, np.ndarray]:
  """Per-layer pools [X_l, ...] and slot maps local to them [L, E] -> (pool [X, ...], global slot map)."""
  sizes = [int(next(iter(p.values())).shape[0]) for p in pools]
  pool = {n: np.concatenate([np.asarray(p[n]) for p in pools]) for n in pools[0]}
  return pool, global_slot_map(local_map, sizes)


def plain_model(params: Params) -> Params:
  """A tenant over a shared pool as a single model: its experts gathered (X = L * E), identity slot map."""
  smap = np.asarray(params["slot_map"])
  experts = {n: np.asarray(w)[smap.reshape(-1)] for n, w in params["experts"].items()}
  return {"backbone": params["backbone"], "experts": experts, "slot_map": identity_slot_map(*smap.shape)}


def layer_slots(slot_map: np.ndarray) -> list[np.ndarray]:
  """The pool slots each MoE layer's map reaches, ascending: what its checkpoint part holds."""
  return [np.unique(row) for row in np.asarray(slot_map)]


def split_pools(pool: dict, slot_map: np.ndarray) -> tuple[list[dict], np.ndarray]:
  """The inverse of `join_pools`: (per-layer pools, slot maps local to them [L, E])."""
  pools, local = [], []
  for row, slots in zip(np.asarray(slot_map), layer_slots(slot_map)):
    pools.append({n: np.asarray(w)[slots] for n, w in pool.items()})
    local.append(np.searchsorted(slots, row))
  return pools, np.asarray(local, np.int32)


def check_tree(want_shapes, params, what: str = "parameter") -> None:
  """Raises LayoutError naming the first leaf of `params` missing, unexpected or of the wrong shape."""
  want = trees.flat_shapes(want_shapes)
  got = trees.flat_shapes(params)
  for key, shape in want.items():
    if key not in got:
      raise LayoutError(f"missing {what} {key}")
    if got[key] != shape:
      raise LayoutError(f"{what} {key}: shape {got[key]}, expected {shape}")
  extra = sorted(set(got) - set(want))
  if extra:
    raise LayoutError(f"unexpected {what} {extra[0]}")


def check_served(param_shapes: Callable, cfg, params: Params) -> None:
  """Checks a served tree against `param_shapes(cfg, num_slots)` and its slot map against the pool."""
  if set(params) != {"backbone", "experts", "slot_map"}:
    raise LayoutError(f"params must have backbone, experts and slot_map, got {sorted(params)}")
  pool = params["experts"]
  if not isinstance(pool, dict) or not pool:
    raise LayoutError("experts must be a dict of [X, ...] arrays")
  num = int(next(iter(pool.values())).shape[0])
  check_tree(param_shapes(cfg, num), params)
  smap = np.asarray(params["slot_map"])
  if smap.size and (smap.min() < 0 or smap.max() >= num):
    raise LayoutError(f"slot_map points outside the expert pool of {num} slots")


def abstract_served(shapes: Params, dtype: str) -> Params:
  """A served shape tree as ShapeDtypeStructs; the slot map is int32."""
  out = trees.abstract({k: v for k, v in shapes.items() if k != "slot_map"}, dtype)
  out["slot_map"] = jax.ShapeDtypeStruct(shapes["slot_map"], np.int32)
  return out


def stack_tenants(scanned: tuple[tuple[str, ...], ...], backbones: list[dict]) -> dict:
  """Backbones of A tenants -> one tree for batches that mix them: leaves [A, ...], or [L, A, ...]
  inside the `scanned` subtrees (the layer axis stays first, for the modules' scan)."""

  def stack(path, *leaves):
    keys = tuple(getattr(k, "key", None) for k in path)
    axis = 1 if any(keys[: len(prefix)] == prefix for prefix in scanned) else 0
    return np.stack([np.asarray(x) for x in leaves], axis=axis)

  return jax.tree_util.tree_map_with_path(stack, *backbones)
