"""What the server tells about each tenant: lineage, shared experts, residency, quality drift.

Read once from the store (its store.json, slot maps and arrays); residency is
live: in swap mode the device holds the backbone of the tenant the engine last
produced a token for, in resident and mixed modes every backbone.
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from jaxmoe.serving.weights import Mode
from jaxmoe.trees import tree_bytes


def shared_fractions(slot_maps: dict[str, np.ndarray]) -> dict[str, float]:
  """Per tenant: the share of its (layer, expert) positions whose pool slot another tenant uses too."""
  maps = {t: np.asarray(m).ravel() for t, m in slot_maps.items()}
  if not maps:
    return {}
  users = np.bincount(np.concatenate([np.unique(m) for m in maps.values()]))
  return {t: float(np.mean(users[m] > 1)) if m.size else 0.0 for t, m in maps.items()}


def _quality(store) -> dict:
  """{tenant: drift} where the store records it: a `quality` entry of store.json or report.json."""
  meta = getattr(store, "metadata", None) or {}
  if isinstance(meta.get("quality"), dict):
    return meta["quality"]
  path = getattr(store, "path", None)
  report = pathlib.Path(path) / "report.json" if path is not None else None
  if report is not None and report.is_file():
    try:
      quality = json.loads(report.read_text()).get("quality")
    except ValueError:
      return {}
    return quality if isinstance(quality, dict) else {}
  return {}


class Tenants:
  """The store's tenants as the server reports them (in /v1/models and /metrics)."""

  def __init__(self, store, mode: Mode):
    self.names = list(store.tenants)
    self.mode = mode
    self.meta = getattr(store, "metadata", None) or {}
    self.architecture = store.config.architecture
    self.pool_bytes = store.pool_bytes() if hasattr(store, "pool_bytes") else tree_bytes(store.pool)
    self.backbone_bytes = {t: tree_bytes(store.backbones[t]) for t in self.names}
    self.shared_fraction = shared_fractions(store.slot_maps)
    self.experts = {t: int(np.asarray(store.slot_maps[t]).size) for t in self.names}
    self.quality = _quality(store)
    path = getattr(store, "path", None)
    header = pathlib.Path(path) / "store.json" if path is not None else None
    self.created = int(header.stat().st_mtime) if header is not None and header.is_file() else int(time.time())
    self.store_name = pathlib.Path(path).name if path is not None else None
    self.active: str | None = None  # swap mode: the tenant whose backbone the device holds

  def resident(self) -> set[str]:
    if self.mode is Mode.SWAP:
      return {self.active} if self.active is not None else set()
    return set(self.names)

  def card(self, t: str) -> dict:
    """The /v1/models entry of tenant `t`."""
    base = self.meta.get("base_tenant")
    sources = self.meta.get("sources") or {}
    return {
      "id": t,
      "object": "model",
      "created": self.created,
      "owned_by": "jaxmoe",
      "root": t,
      "parent": base if base not in (None, t) else None,
      "jaxmoe": {
        "architecture": self.architecture,
        "store": self.store_name,
        "consolidated_with": [o for o in self.names if o != t],
        "base_tenant": base,
        "owner_policy": self.meta.get("owner"),
        "metric": self.meta.get("metric"),
        "source": pathlib.PurePath(sources[t]).name if t in sources else None,  # no host paths over HTTP
        "experts": self.experts[t],
        "shared_expert_fraction": self.shared_fraction[t],
        "resident": t in self.resident(),
        "mode": self.mode.value,
        "backbone_bytes": self.backbone_bytes[t],
        "quality_drift": self.quality.get(t),
      },
    }

  def cards(self) -> dict:
    return {"object": "list", "data": [self.card(t) for t in self.names]}
