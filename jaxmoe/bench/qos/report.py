"""Writing a QoS run: results.json, CSV tables, PNG plots and a README with the headline.

Files under the output folder:
  results.json     environment, profile, per-system memory, per-sweep capacity,
                   per-(system, rate) metrics, headline and goals
  metrics.csv      one row per (sweep, system, rate)
  capacity.csv     one row per (sweep, system): backlog throughput (saturation rate)
  requests.csv     one row per answered request
  turnaround_<sweep>.png   mean turnaround vs arrival rate per system (the paper's figure)
  overview_<sweep>.png     turnaround p50/p99, TTFT p50 and tokens/s vs arrival rate
  README.md        date, platform, versions, command, headline table
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import enum
import json
import os
import pathlib
import platform
import subprocess

from jaxmoe.bench.qos.metrics import JAXMOE_MODES

STYLE = {
  "single": ("black", "-"),
  "swap": ("tab:blue", "-"),
  "resident": ("tab:cyan", "-"),
  "mixed": ("tab:green", "-"),
  "mig": ("tab:red", "--"),
  "full-swap": ("tab:orange", "--"),
}


def environment(command: str) -> dict:
  import jax
  import jaxlib
  import numpy as np

  dev = jax.devices()[0]
  commit = _git_commit()
  return {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": command,
    "platform": platform.platform(),
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "backend": jax.default_backend(),
    "device": dev.device_kind,
    "device_count": jax.device_count(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "numpy": np.__version__,
    "git_commit": commit,
  }


def _git_commit() -> str | None:
  """HEAD's short hash, with "+dirty" when the working tree differs from it; None outside a checkout."""

  def git(*args):
    return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()

  try:
    commit = git("rev-parse", "--short", "HEAD")
    dirty = bool(commit) and bool(git("status", "--porcelain"))
  except (OSError, subprocess.SubprocessError):
    return None
  return (commit + ("+dirty" if dirty else "")) or None


def jsonable(x):
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
  if isinstance(x, enum.Enum):
    return x.value
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  return x


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
  keys = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)


def write(out_dir, profile, result: dict, env: dict) -> dict:
  """Writes every file (module docstring); returns the JSON document."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  host = result["host"]
  doc = {
    "meta": env | {"runtime_s": result["runtime_s"]},
    "profile": jsonable(profile),
    "store": {
      "tenants": host.tenants,
      "pool_slots_per_layer": [len(s["w1"]) for s in host.slots],
      "consolidated_bytes": host.consolidated_bytes,
      "tenant_bytes": host.tenant_bytes,
      "backbone_bytes": host.backbone_bytes,
      "expert_bytes": host.expert_bytes,
    },
    "systems": result["systems"],
    "sweeps": {},
    "headline": result["headline"],
  }
  metric_rows, cap_rows, req_rows = [], [], []
  for name, sw in result["sweeps"].items():
    doc["sweeps"][name] = {"rates": sw.rates, "capacity": sw.capacity, "runs": sw.runs}
    for system, runs in sw.runs.items():
      mem = result["systems"][system]["memory"]
      metric_rows += [{"sweep": name, "system": system, "rate": rate} | r | mem for rate, r in zip(sw.rates, runs)]
    cap_rows += [{"sweep": name, "system": s} | c for s, c in sw.capacity.items()]
    req_rows += [{"sweep": name, "system": s, "rate": rate} | dataclasses.asdict(r) for s, rate, r in sw.records]
    plot_sweep(out, profile.name, name, sw)
  (out / "results.json").write_text(json.dumps(doc, indent=1))
  write_csv(out / "metrics.csv", metric_rows)
  write_csv(out / "capacity.csv", cap_rows)
  write_csv(out / "requests.csv", req_rows)
  (out / "README.md").write_text(readme(doc))
  return doc


def plot_sweep(out: pathlib.Path, profile: str, sweep: str, sw) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def lines(ax, key, scale=1e3):
    for system, runs in sw.runs.items():
      color, style = STYLE.get(system, (None, "-"))
      ax.plot(sw.rates, [scale * r[key] for r in runs], style, color=color, marker="o", label=system)
    ax.set_xlabel("arrival rate (requests/s, all tenants)")
    ax.grid(True, alpha=0.3)

  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  lines(ax, "turnaround_mean_s")
  if "mig" in sw.capacity:
    ax.axvline(
      sw.capacity["mig"]["requests_per_s"], color=STYLE["mig"][0], linestyle=":", linewidth=1, label="mig saturation"
    )
  ax.set_yscale("log")
  ax.set_ylabel("average turnaround (ms)")
  ax.set_title(f"{profile} / {sweep}: turnaround vs arrival rate")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / f"turnaround_{sweep}.png", dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(2, 2, figsize=(11, 8))
  panels = [
    ("turnaround_p50_s", "turnaround p50 (ms)", True),
    ("turnaround_p99_s", "turnaround p99 (ms)", True),
    ("ttft_p50_s", "TTFT p50 (ms)", True),
    ("tokens_per_s", "throughput (tokens/s)", False),
  ]
  for ax, (key, label, log) in zip(axes.flat, panels):
    lines(ax, key, 1e3 if key.endswith("_s") and key != "tokens_per_s" else 1.0)
    ax.set_ylabel(label)
    if log:
      ax.set_yscale("log")
  axes.flat[0].legend()
  fig.suptitle(f"{profile} / {sweep}")
  fig.tight_layout()
  fig.savefig(out / f"overview_{sweep}.png", dpi=110)
  plt.close(fig)


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def _table(sw: dict, key: str, scale: float = 1e3) -> list[str]:
  runs = sw["runs"]
  out = ["| rate (req/s) | load | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
  for i, rate in enumerate(sw["rates"]):
    lf = next(iter(runs.values()))[i]["load_factor"]
    cells = [f"{scale * r[i][key]:.1f}" + ("*" if r[i]["saturated"] else "") for r in runs.values()]
    out.append(f"| {rate:.2f} | {lf:.2f} | " + " | ".join(cells) + " |")
  return out


def _sweep_section(name: str, sw: dict, h: dict) -> list[str]:
  lines = [f"## Sweep `{name}`", "", "Mean turnaround (ms; * = offered rate above the system's capacity):", ""]
  lines += _table(sw, "turnaround_mean_s") + ["", "Mean TTFT (ms):", ""] + _table(sw, "ttft_mean_s")
  lines += ["", "Turnaround reduction vs the MIG-style partition (per rate; average over the sweep):", ""]
  for mode in JAXMOE_MODES:
    red = h["turnaround_reduction_vs_mig"].get(mode)
    if red:
      lines.append(
        f"- {mode}: {', '.join(_pct(x) for x in red['per_rate'])}; average "
        f"**{_pct(red['average'])}** (mean of per-rate {_pct(red['mean_of_per_rate'])})"
      )
  lines += ["", "Capacity (backlog throughput = saturation rate) and ratio to the single model:", ""]
  for s, c in sw["capacity"].items():
    ratio = h["throughput_vs_single"].get(s)
    lines.append(
      f"- {s}: {c['requests_per_s']:.2f} req/s, {c['tokens_per_s']:.1f} tok/s "
      f"({'-' if ratio is None else f'{ratio:.3f}'}x single)"
    )
  met = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in h["goals"].items())
  return lines + ["", f"Goals: {met}", ""]


def readme(doc: dict) -> str:
  m, p = doc["meta"], doc["profile"]
  lines = [
    f"# QoS benchmark: {p['name']}",
    "",
    f"- date: {m['date']}",
    f"- command: `{m['command']}`",
    f"- platform: {m['platform']}, {m['cpu_count']} CPUs; backend {m['backend']} ({m['device']})",
    f"- versions: python {m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}, numpy {m['numpy']}, "
    f"git {m['git_commit']}",
    f"- runtime: {m['runtime_s']:.0f} s (building, compiling and running every system)",
    f"- clock: {p['timer']} (jaxmoe/bench/qos/driver.py)",
    "",
    p["description"] + ".",
    "",
  ]
  for name, sw in doc["sweeps"].items():
    lines += _sweep_section(name, sw, doc["headline"][name])
  lines += [
    "Device weight bytes per system: "
    + ", ".join(f"{s} {v['memory']['device_weight_bytes'] / 2**20:.2f} MiB" for s, v in doc["systems"].items()),
    "",
  ]
  lines += [
    "Files: results.json (everything), metrics.csv, capacity.csv, requests.csv, "
    "turnaround_<sweep>.png, overview_<sweep>.png.",
    "How each system is emulated: jaxmoe/bench/qos/README.md.",
    "",
  ]
  return "\n".join(lines)
