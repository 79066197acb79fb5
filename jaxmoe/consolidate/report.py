"""What a consolidation saved: report.json, similarity.png and a printed table.

Memory per tenant "after" charges each pool expert to the tenants that share
it, split evenly, plus the tenant's own backbone, so the column sums to the
store's total.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np

from jaxmoe.errors import ConsolidateError
from jaxmoe.io import files


def per_tenant(header: dict) -> list[dict]:
  """[{tenant, before, after, saving}] in bytes; `saving` is a fraction of `before`."""
  tenants, b = header["tenants"], header["bytes"]
  maps = np.stack([np.asarray(header["slot_maps"][t]) for t in tenants])  # [A, L, E]
  after = {t: float(b["backbones"][t]) for t in tenants}
  for l, slots in enumerate(header["slots_per_layer"]):
    users = np.bincount(maps[:, l].ravel(), minlength=slots)  # tenants per slot
    for k, t in enumerate(tenants):
      after[t] += float(np.sum(b["expert"] / users[maps[k, l]]))
  rows = []
  for t in tenants:
    before = b["full_copy"][t]
    rows.append({"tenant": t, "before": before, "after": after[t], "saving": 1.0 - after[t] / before})
  return rows


def summary(header: dict) -> dict:
  b = header["bytes"]
  return {
    "tenants": header["tenants"],
    "metric": header["metric"],
    "owner": header["owner"],
    "base_tenant": header.get("base_tenant"),
    "selection": header["selection"],
    "bytes": b,
    "saving": 1.0 - b["total"] / b["full_copies"],
    "per_tenant": per_tenant(header),
    "slots_per_layer": header["slots_per_layer"],
    "positions": header["positions"],
  }


def human(n: float) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def table(header: dict) -> str:
  """Memory per tenant before (own full copy) and after (own backbone + its share of the pool)."""
  rows = per_tenant(header)
  b, sel = header["bytes"], header["selection"]
  width = max(12, *(len(r["tenant"]) for r in rows))
  lines = [f"{'tenant':<{width}}  {'before':>11}  {'after':>11}  {'saving':>7}"]
  for r in rows:
    lines.append(
      f"{r['tenant']:<{width}}  {human(r['before']):>11}  {human(r['after']):>11}  {100 * r['saving']:6.1f}%"
    )
  total_saving = 1.0 - b["total"] / b["full_copies"]
  lines.append(
    f"{'total':<{width}}  {human(b['full_copies']):>11}  {human(b['total']):>11}  {100 * total_saving:6.1f}%"
  )
  budget = f", budget {human(sel['budget_bytes'])} (pool only)" if sel["budget_bytes"] is not None else ""
  lines.append(
    f"pool: {sel['unique_experts']} of {sel['experts_before']} experts, {human(b['pool'])}{budget}; "
    f"backbones: {human(b['backbones_total'])}; metric {header['metric']}, owner {header['owner']}"
  )
  return "\n".join(lines)


def _grids(header: dict) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
  cfg = header["config"]
  shape = (len(header["slots_per_layer"]), cfg["num_experts"])  # MoE layers
  score, copies = np.zeros(shape), np.zeros(shape, int)
  labels = [["" for _ in range(shape[1])] for _ in range(shape[0])]
  index = {t: str(i) for i, t in enumerate(header["tenants"])}
  for p in header["positions"]:
    l, e = p["layer"], p["expert"]
    score[l, e] = p["score"]
    copies[l, e] = len(p["groups"])
    labels[l][e] = "|".join("".join(index[t] for t in g["tenants"]) for g in p["groups"])
  return score, copies, labels


def plot(header: dict, path: pathlib.Path) -> None:
  """Layers x experts: the paper's score (distance summed over tenant pairs) and copies kept."""
  from matplotlib.figure import Figure  # Agg canvas; no pyplot global state

  score, copies, labels = _grids(header)
  num_layers, num_experts = score.shape
  k = len(header["tenants"])
  fig = Figure(figsize=(4 + 1.2 * num_experts, 2.5 + 0.35 * num_layers), layout="constrained")
  left, right = fig.subplots(1, 2)
  im = left.imshow(score, aspect="auto", cmap="viridis")
  left.set_title(f"{header['metric']} distance (sum over tenant pairs)")
  fig.colorbar(im, ax=left)
  im = right.imshow(copies, aspect="auto", cmap="RdYlGn_r", vmin=1, vmax=max(k, 2))
  right.set_title("copies kept (groups of tenant indices)")
  fig.colorbar(im, ax=right, ticks=range(1, k + 1))
  for ax in (left, right):
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_experts))
    ax.set_yticks(range(0, num_layers, max(1, num_layers // 16)))
  if num_layers * num_experts <= 512:
    for l in range(num_layers):
      for e in range(num_experts):
        right.text(e, l, labels[l][e], ha="center", va="center", fontsize=7)
  legend = ", ".join(f"{i}={t}" for i, t in enumerate(header["tenants"]))
  fig.suptitle(f"tenants {legend}; owner {header['owner']}", fontsize=9)
  fig.savefig(path, dpi=100, metadata={"Software": None})


def write(folder: pathlib.Path, header: dict) -> list[str]:
  """report.json, and similarity.png where matplotlib is installed (the `plot` extra); the names written."""
  folder = pathlib.Path(folder)
  files.write_json(folder / "report.json", summary(header), ConsolidateError, indent=1)
  if importlib.util.find_spec("matplotlib") is None:
    return ["report.json"]
  plot(header, folder / "similarity.png")
  return ["report.json", "similarity.png"]
