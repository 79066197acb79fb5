"""consolidate(): K tenant checkpoints -> one store with a shared expert pool.

Two passes over the layers, so memory stays near one layer of all tenants:
  1. read layer l of every tenant, write its backbone part to the store,
     measure the distances at each (l, e) (running the tenants' layers on the
     calibration text for the output metric);
  2. after the global selection (select.py), build layer l's pool reading one
     tenant's layer at a time, and write it.
Everything goes to a temporary folder renamed into place at the end, so a
failure leaves no store.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from jaxmoe.consolidate import calibrate, report
from jaxmoe.consolidate.distance import Metric, layer_distances, pair_score
from jaxmoe.consolidate.select import GB, Owner, Plan, Selection, check_budget, select
from jaxmoe.consolidate.tenants import check_names, logical_experts, open_tenants, read_part
from jaxmoe.errors import ConsolidateError
from jaxmoe.families import registry
from jaxmoe.io import files
from jaxmoe.io.store import StoreWriter, expert_bytes, store_writer
from jaxmoe.io.tokenizer import load_tokenizer
from jaxmoe.nn.moe import Impl
from jaxmoe.nn.precision import precision
from jaxmoe.trees import tree_bytes


@dataclasses.dataclass(frozen=True)
class ConsolidateConfig:
  """What to measure, how much to share, and whose weights a shared expert keeps."""

  metric: Metric = Metric.L2
  owner: Owner = Owner.ROUND_ROBIN
  budget_gb: float | None = None  # bound on the pool (unique experts x expert bytes), 10^9 bytes
  share_fraction: float | None = None  # fraction of the L*E*(K-1) possible joins
  base_tenant: str | None = None  # Owner.BASE; default the first tenant
  calibration_text: str | None = None  # Metric.OUTPUT only
  calibration_tokens: int = 2048
  calibration_seq_len: int = 256
  impl: Impl = Impl.AUTO  # MoE strategy of the calibration forward passes

  def __post_init__(self):
    if (self.budget_gb is None) == (self.share_fraction is None):
      raise ConsolidateError("give exactly one of --budget_gb and --share_fraction")
    if self.budget_gb is not None and not (math.isfinite(self.budget_gb) and self.budget_gb >= 0):
      raise ConsolidateError(f"--budget_gb={self.budget_gb} must be a finite number >= 0")
    if (self.metric is Metric.OUTPUT) != (self.calibration_text is not None):
      raise ConsolidateError("--calibration text is needed by --metric=output, and used by nothing else")
    if self.calibration_text is not None and not self.calibration_text.strip():
      raise ConsolidateError("the --calibration text is empty: the output metric needs text to run the tenants on")
    if self.calibration_tokens < 1:
      raise ConsolidateError(f"--calibration_tokens={self.calibration_tokens} must be >= 1")
    if self.base_tenant is not None and self.owner is not Owner.BASE:
      raise ConsolidateError("--base_tenant is used by --owner=base only")

  @property
  def budget_bytes(self) -> int | None:
    return None if self.budget_gb is None else round(self.budget_gb * GB)

  def selection(self, names: list[str]) -> Selection:
    base = self.base_tenant if self.base_tenant is not None else names[0]
    if base not in names:
      raise ConsolidateError(f"--base_tenant={base!r} is not one of the tenants {names}")
    return Selection(self.budget_bytes, self.share_fraction, self.owner, names.index(base))


def consolidate(
  tenants: Sequence[tuple[str, str | os.PathLike]],
  out: str | os.PathLike,
  ccfg: ConsolidateConfig,
  verify_checksums: bool = True,
) -> dict:
  """Consolidates K >= 2 tenant checkpoints into one store.

  Args:
    tenants: (name, checkpoint folder) pairs, in the order the store lists them.
    out: store folder to create; it must not exist.
    ccfg: metric, budget or share fraction, owner policy, calibration text.
    verify_checksums: compare every part read with its recorded checksum and
      refuse non-finite weights (the store writer refuses them regardless).

  Returns:
    The store.json content (also what report.table prints).

  Raises:
    ConsolidateError (or CheckpointError, both ValueError) naming the bad input;
    no store is written then.
  """
  names = [name for name, _ in tenants]
  check_names(names)
  sel = ccfg.selection(names)
  out = pathlib.Path(out)
  if out.exists():
    raise ConsolidateError(f"output {out} already exists; remove it or choose another path")
  with open_tenants(dict(tenants), verify_checksums) as readers:
    cfg = readers[names[0]].config
    if sel.budget_bytes is not None:
      check_budget(sel.budget_bytes, cfg.num_moe_layers, cfg.num_experts, expert_bytes(cfg))
    with store_writer(out, cfg, names) as w:
      dist, same = _distance_pass(readers, w, ccfg)
      plan = select(dist, same, expert_bytes(cfg), sel)
      _pool_pass(readers, w, plan)
      for name, r in readers.items():
        w.copy_tokenizer(name, r.path)
      meta = describe(names, readers, ccfg, sel, plan, dist)
      header = w.finish({name: plan.slot_maps[i] for i, name in enumerate(names)}, meta)
      report.write(w.folder, header)
  return header


def _calibration_inputs(readers, ccfg: ConsolidateConfig, globs: dict) -> dict:
  """Per tenant: embedded calibration tokens [B, T, D] (the input of layer 0)."""
  out = {}
  for name, r in readers.items():
    tok = load_tokenizer(r.path, r.config)
    tokens = calibrate.calibration_tokens(
      ccfg.calibration_text, tok, r.config, ccfg.calibration_tokens, ccfg.calibration_seq_len
    )
    out[name] = calibrate.embed(globs[name], tokens)
  return out


def _distance_pass(readers, w: StoreWriter, ccfg: ConsolidateConfig) -> tuple[np.ndarray, np.ndarray]:
  """Writes the backbones part by part; returns (dist [L, E, K, K], same [L, E, K, K]) over MoE layers.

  Parts follow the checkpoint layout (Mixtral: layer_NNNN, each an MoE layer;
  Switch: encoder/decoder blocks, the sparse ones with a pool).
  """
  first = next(iter(readers.values()))
  cfg = first.config
  step = registry.of(cfg).calibration_step
  if ccfg.metric is Metric.OUTPUT and step is None:
    raise ConsolidateError(
      f"--metric=output runs one layer at a time, which {cfg.architecture} does not offer; use l2 or cosine"
    )
  globs = {}
  for name, r in readers.items():
    globs[name] = read_part(name, r, "globals")
    w.write_backbone_part(name, "globals", globs[name])
  xs = _calibration_inputs(readers, ccfg, globs) if ccfg.metric is Metric.OUTPUT else None
  del globs
  dists, sames = [], []
  moe_index = {part: i for i, part in enumerate(first.layout.moe_parts(cfg))}
  for part in first.part_names()[1:]:
    trees = {}
    for name, r in readers.items():  # one tenant's part at a time, written as soon as it is read
      trees[name] = read_part(name, r, part)
      w.write_backbone_part(name, part, trees[name]["backbone"])
    if part in moe_index:  # a dense block has its backbone only
      d, s = _layer_distances(readers, trees, moe_index[part], xs, step, ccfg)
      dists.append(d)
      sames.append(s)
    dropped = tree_bytes(trees)
    del trees  # before the next part is read: one layer of every tenant at a time
    files.release_memory(dropped)
  return np.stack(dists), np.stack(sames)


def _layer_distances(readers, trees: dict, i: int, xs, step, ccfg: ConsolidateConfig):
  """(dist [E, K, K], same [E, K, K]) of MoE layer i; advances the calibration states `xs`."""
  cfg = next(iter(readers.values())).config
  experts = [logical_experts(trees[name]["experts"], r.slot_map[i]) for name, r in readers.items()]
  inputs = None
  if xs is not None:
    hidden = []
    with precision(cfg.dtype):
      for name, r in readers.items():
        row = jnp.asarray(r.slot_map[i])
        xs[name], h = step(trees[name]["backbone"], trees[name]["experts"], row, xs[name], cfg, ccfg.impl)
        hidden.append(h.reshape(-1, cfg.hidden_size))
    inputs = jnp.concatenate(hidden)
    del hidden
  return layer_distances(experts, ccfg.metric, inputs)


def _fill_from(pool: dict, sums: dict, groups, t: int, experts: dict) -> None:
  """Copies tenant t's experts into the slots it owns and adds them to the averages it is in."""
  for s, g in enumerate(groups):
    if g.owner == t:
      for n in pool:
        pool[n][s] = experts[n][g.expert]
    elif g.owner is None and t in g.members:  # Owner.AVERAGE: float32 sum, members in increasing order
      acc = sums.setdefault(s, {})
      for n in pool:
        x = np.asarray(experts[n][g.expert], np.float32)
        acc[n] = x.copy() if n not in acc else acc[n] + x


def _layer_pool(readers, i: int, groups) -> dict[str, np.ndarray]:
  """MoE layer i's pool {name: [X, ...]}, reading one tenant's layer at a time.

  Holds the pool, one tenant's experts, and float32 sums of the averaged slots
  (Owner.AVERAGE only); the mean is taken in float32 and cast once.
  """
  pool: dict[str, np.ndarray] = {}
  sums: dict[int, dict[str, np.ndarray]] = {}
  for t, (name, r) in enumerate(readers.items()):
    pool_part = read_part(name, r, r.layout.moe_parts(r.config)[i])["experts"]
    experts = logical_experts(pool_part, r.slot_map[i])
    del pool_part
    if not pool:  # filled in place: one copy
      pool = {n: np.empty((len(groups), *w.shape[1:]), w.dtype) for n, w in experts.items()}
    _fill_from(pool, sums, groups, t, experts)
    del experts  # before the next tenant's layer is read
  for s, leaves in sums.items():
    for n, total in leaves.items():
      pool[n][s] = (total / np.float32(len(groups[s].members))).astype(pool[n].dtype)
  return pool


def _pool_pass(readers, w: StoreWriter, plan: Plan) -> None:
  for i, groups in enumerate(plan.layers):
    pool = _layer_pool(readers, i, groups)
    w.write_pool_layer(i, pool)
    dropped = tree_bytes(pool)
    del pool  # before the next layer is read
    files.release_memory(dropped)


def describe(names, readers, ccfg: ConsolidateConfig, sel: Selection, plan: Plan, dist) -> dict:
  """The consolidation part of store.json: policy, selection counts, every position."""
  cfg = readers[names[0]].config
  positions = []
  for l, groups in enumerate(plan.layers):
    for e in range(cfg.num_experts):
      positions.append(
        {
          "layer": l,
          "expert": e,
          "score": pair_score(dist[l, e]),
          "distances": dist[l, e].tolist(),
          "groups": [_group_json(g, s, names) for s, g in enumerate(groups) if g.expert == e],
        }
      )
  k = len(names)
  selection = {
    "mode": "budget" if sel.budget_bytes is not None else "fraction",
    "budget_gb": ccfg.budget_gb,
    "budget_bytes": sel.budget_bytes,
    "budget_counts": "pool",
    "share_fraction": ccfg.share_fraction,
    "experts_before": len(plan.layers) * cfg.num_experts * k,
    "unique_experts": plan.unique_experts,
    "joins_possible": plan.joins_possible,
    "joins_identical": plan.joins_identical,
    "joins_applied": plan.joins_applied,
  }
  return {
    "metric": ccfg.metric.value,
    "owner": ccfg.owner.value,
    "base_tenant": names[sel.base] if sel.owner is Owner.BASE else None,
    "selection": selection,
    "calibration_tokens": ccfg.calibration_tokens if ccfg.metric is Metric.OUTPUT else None,
    "sources": {name: str(readers[name].path) for name in names},
    "positions": positions,
  }


def _group_json(g, slot: int, names: list[str]) -> dict:
  return {
    "tenants": [names[t] for t in g.members],
    "slot": slot,
    "owner": "average" if g.owner is None else names[g.owner],
    "height": g.height,
    "identical": g.exact and len(g.members) > 1,
  }
