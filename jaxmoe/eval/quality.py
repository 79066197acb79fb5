"""Quality kept per tenant: originals, the base, merging baselines and consolidated stores.

Shared by `jaxmoe-demo` (a small held-out slice), `bench/quality.py` (the
Mixtral sweep) and `bench/quality_switch.py` (the Switch sweep). A Mixtral
tenant is scored on held-out text of its own domain against its original
fine-tune (`evaluate.py`): perplexity, KL to the original and top-1
agreement; a Switch tenant on held-out rows of its own task (`seq2seq.py`).

"Distinct experts" is the pool size as a fraction of the K * L * E experts of
K full copies: 100% shares only bitwise-identical experts, 25% with K = 4
keeps one expert per (layer, expert). A "share" is the fraction of the
L*E*(K-1) possible joins applied (0: none, 1: one expert per position), the
same meaning for every K. Consolidation keeps each tenant's own backbone and
router; a merging baseline is one model for every tenant.

The reconfiguration ablation (`averaged_backbones`) keeps each tenant's
experts exactly as consolidated (its slot map into the shared pool) but gives
every tenant ONE set of non-expert layers, the mean of the K backbones: what
serving would be without swapping per-tenant layers.
"""

from __future__ import annotations

import pathlib
import platform

import jax
import numpy as np

from jaxmoe.consolidate import ConsolidateConfig, Metric, Owner, consolidate
from jaxmoe.eval import evaluate, merging
from jaxmoe.eval.merging import MergeSpec, Method
from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.io.store import Store, expert_bytes
from jaxmoe.train import corpus
from jaxmoe.trees import Params

# The merging baselines scored; the best of them per tenant is what consolidation must beat.
MERGES = (
  MergeSpec(Method.AVERAGE),
  MergeSpec(Method.TASK_ARITHMETIC, lam=0.5),
  MergeSpec(Method.TASK_ARITHMETIC, lam=1.0),
  MergeSpec(Method.TIES, density=0.2, lam=0.5),
  MergeSpec(Method.TIES, density=0.2, lam=1.0),
  MergeSpec(Method.DARE, drop_rate=0.5, lam=0.5),
  MergeSpec(Method.DARE, drop_rate=0.9, lam=0.5),
)


def heldout(domains, rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """Per domain: `rows` held-out rows [rows, 1 + seq_len]."""
  return {d: corpus.heldout_rows(corpus.load(d, seq_len), rows) for d in domains}


class Suite:
  """Held-out rows of each tenant's domain and its original's next-token distributions."""

  def __init__(self, cfg: MixtralConfig, originals: dict[str, Params], rows: dict[str, np.ndarray], batch: int = 16):
    self.cfg, self.rows, self.batch = cfg, rows, batch
    self.references = {t: evaluate.reference_log_probs(p, rows[t], cfg, batch) for t, p in originals.items()}

  @property
  def tenants(self) -> list[str]:
    return list(self.references)

  def score(self, models: dict[str, Params]) -> dict[str, evaluate.Scores]:
    """Each tenant's scores on its own domain, tenant t served by models[t]."""
    return {
      t: evaluate.evaluate(models[t], self.rows[t], self.cfg, self.references[t], self.batch) for t in self.tenants
    }

  def score_shared(self, params: Params) -> dict[str, evaluate.Scores]:
    """Scores when one model (the base, a merge) serves every tenant."""
    return self.score({t: params for t in self.tenants})


def merged_models(base: Params, originals: dict[str, Params], specs=MERGES) -> dict[str, Params]:
  """label -> the one model each merging baseline makes of the K fine-tunes."""
  models = list(originals.values())
  return {spec.label: merging.merge(spec, base, models) for spec in specs}


def pool_budget_gb(cfg, num_tenants: int, distinct: float) -> float:
  """The pool budget (GB) that keeps round(distinct * K*L*E) experts."""
  keep = round(distinct * num_tenants * cfg.num_moe_layers * cfg.num_experts)
  keep = max(keep, cfg.num_moe_layers * cfg.num_experts)
  return (keep + 0.5) * expert_bytes(cfg) / 1e9  # half an expert of slack against float rounding


def consolidate_at(
  tenants: dict[str, pathlib.Path],
  out: pathlib.Path,
  cfg,
  distinct: float,
  metric: Metric,
  owner: Owner,
  calibration: str | None,
) -> dict:
  """Consolidates the tenants into a store at `out` keeping `distinct` of the experts; its header."""
  ccfg = ConsolidateConfig(
    metric=metric,
    owner=owner,
    budget_gb=pool_budget_gb(cfg, len(tenants), distinct),
    calibration_text=calibration if metric is Metric.OUTPUT else None,
  )
  return consolidate(list(tenants.items()), out, ccfg)


def consolidate_share(
  tenants: dict[str, pathlib.Path], out: pathlib.Path, share: float, metric: Metric, owner: Owner
) -> dict:
  """Consolidates the tenants into a store at `out` applying `share` of the possible joins; its header."""
  ccfg = ConsolidateConfig(metric=metric, owner=owner, share_fraction=share)
  return consolidate(list(tenants.items()), out, ccfg)


def averaged_backbones(models: dict[str, Params]) -> dict[str, Params]:
  """The no-reconfiguration ablation: each tenant's experts, every tenant on the mean backbone (float32 mean)."""
  backbones = [m["backbone"] for m in models.values()]

  def mean(*xs):
    return (sum(np.asarray(x, np.float32) for x in xs) / np.float32(len(xs))).astype(np.asarray(xs[0]).dtype)

  shared = jax.tree.map(mean, *backbones)
  return {t: {**m, "backbone": shared} for t, m in models.items()}


def tenant_models(store: Store) -> dict[str, Params]:
  """Tenant -> its plain params: own backbone and router, experts gathered from the shared pool.

  The same weights serving reaches through the slot map, so scoring them scores the store.
  """
  return {t: store.export_params(t) for t in store.tenants}


def memory(header: dict) -> dict:
  """Store bytes against K full copies, and the pool's share of distinct experts."""
  b, sel = header["bytes"], header["selection"]
  return {
    "store_bytes": b["total"],
    "full_copies_bytes": b["full_copies"],
    "memory_fraction": b["total"] / b["full_copies"],
    "distinct_experts": sel["unique_experts"] / sel["experts_before"],
    "unique_experts": sel["unique_experts"],
    "experts_before": sel["experts_before"],
  }


def environment() -> dict:
  """Versions and platform a result was measured with (bench READMEs)."""
  import numpy
  import optax

  return {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "numpy": numpy.__version__,
    "optax": optax.__version__,
    "platform": platform.platform(),
    "backend": jax.default_backend(),
  }
