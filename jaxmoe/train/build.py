"""Builds (or finds cached) a recipe's base model and its K fine-tuned tenants (Mixtral or Switch).

Cache layout under `workdir / recipe.key` (the key hashes the recipe, the code
version and the Python version):
  recipe.json            the recipe, for people reading the folder
  base/                  jaxmoe checkpoint of the pretrained base
  tenants/<tenant>/      jaxmoe checkpoint of each full fine-tune (a domain, or a Switch task)
  logs/<name>.json       loss history of each training run
Checkpoints are written atomically, so an interrupted build resumes at the
first missing one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable

from jaxmoe.families.mixtral.layout import init_params
from jaxmoe.io import checkpoint
from jaxmoe.train import corpus, seq2seq, tasks, trainer


def default_workdir() -> pathlib.Path:
  """$XDG_CACHE_HOME/jaxmoe/demo, else ~/.cache/jaxmoe/demo."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(cache) / "jaxmoe" / "demo"


@dataclasses.dataclass(frozen=True)
class Built:
  root: pathlib.Path
  base: pathlib.Path
  tenants: dict[str, pathlib.Path]  # tenant name (its domain or task) -> checkpoint
  trained: tuple[str, ...]  # what this call trained; empty when all came from the cache
  seconds: float


def _base_init(recipe):
  if recipe.family == "switch":
    return seq2seq.init_params(recipe.model, seed=recipe.init_seed, factor=recipe.init_scale)
  return init_params(recipe.model, seed=recipe.init_seed, scale=recipe.init_scale)


def _batches(recipe, tenant: str | None, seed):
  """The training stream of the base (tenant None) or of one tenant."""
  if recipe.family == "switch":
    if tenant is None:
      return tasks.SpanBatches(
        recipe.domains, recipe.batch_size, recipe.span_len, recipe.noise_density, recipe.mean_span, seed
      )
    return tasks.TaskBatches(tenant, recipe.batch_size, seed)
  domains = recipe.domains if tenant is None else (tenant,)
  return corpus.Batches(domains, recipe.batch_size, recipe.seq_len, seed)


def _run(recipe, params, tenant, phase, seed, name: str, out: pathlib.Path, logs: pathlib.Path, progress: bool):
  factory = seq2seq.make_step if recipe.family == "switch" else trainer.make_step
  batches = _batches(recipe, tenant, seed)
  params, history = trainer.train(
    params, batches, recipe.model, phase, recipe.balance_coef, desc=name, progress=progress, step_factory=factory
  )
  checkpoint.save(out, recipe.model, params)
  logs.mkdir(parents=True, exist_ok=True)
  (logs / f"{name}.json").write_text(json.dumps(history, indent=1))
  return params


def build(recipe, workdir: str | pathlib.Path, progress: bool = True, log: Callable[[str], None] = print) -> Built:
  """Trains what is missing of the base and the tenants of a `Recipe` or `SwitchRecipe`; returns their folders."""
  start = time.perf_counter()
  root = pathlib.Path(workdir).expanduser().absolute() / recipe.key
  root.mkdir(parents=True, exist_ok=True)
  if not (root / "recipe.json").is_file():
    (root / "recipe.json").write_text(json.dumps(json.loads(recipe.to_json()), indent=1))
  base, logs = root / "base", root / "logs"
  tenants = {t: root / "tenants" / t for t in recipe.tenants}
  what = "with span corruption on " if recipe.family == "switch" else "on "
  trained = []
  base_params = None
  if not (base / checkpoint.HEADER).is_file():
    log(f"pretraining the base {what}{'+'.join(recipe.domains)} ({recipe.base.steps} steps)")
    params = _base_init(recipe)
    base_params = _run(recipe, params, None, recipe.base, recipe.base.seed, "base", base, logs, progress)
    trained.append("base")
  for i, (tenant, out) in enumerate(tenants.items()):
    if (out / checkpoint.HEADER).is_file():
      continue
    if base_params is None:
      _, base_params = checkpoint.load(base)
    log(
      f"fine-tuning tenant {tenant!r} on its {'task' if recipe.family == 'switch' else 'domain'} "
      f"({recipe.finetune.steps} steps)"
    )
    _run(recipe, base_params, tenant, recipe.finetune, (recipe.finetune.seed, i), tenant, out, logs, progress)
    trained.append(tenant)
  return Built(root, base, tenants, tuple(trained), time.perf_counter() - start)
