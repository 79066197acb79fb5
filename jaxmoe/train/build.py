"""Builds (or finds cached) a recipe's base model and its K fine-tuned tenants.

Cache layout under `workdir / recipe.key` (the key hashes the recipe, the code
version and the Python version):
  recipe.json            the recipe, for people reading the folder
  base/                  jaxmoe checkpoint of the pretrained base
  tenants/<domain>/      jaxmoe checkpoint of each full fine-tune
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
from jaxmoe.train import corpus, trainer
from jaxmoe.train.recipes import Recipe


def default_workdir() -> pathlib.Path:
  """$XDG_CACHE_HOME/jaxmoe/demo, else ~/.cache/jaxmoe/demo."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(cache) / "jaxmoe" / "demo"


@dataclasses.dataclass(frozen=True)
class Built:
  root: pathlib.Path
  base: pathlib.Path
  tenants: dict[str, pathlib.Path]  # tenant name (its domain) -> checkpoint
  trained: tuple[str, ...]  # what this call trained; empty when all came from the cache
  seconds: float


def _run(
  recipe: Recipe, params, domains, phase, seed, name: str, out: pathlib.Path, logs: pathlib.Path, progress: bool
):
  batches = corpus.Batches(domains, recipe.batch_size, recipe.seq_len, seed)
  params, history = trainer.train(
    params, batches, recipe.model, phase, recipe.balance_coef, desc=name, progress=progress
  )
  checkpoint.save(out, recipe.model, params)
  logs.mkdir(parents=True, exist_ok=True)
  (logs / f"{name}.json").write_text(json.dumps(history, indent=1))
  return params


def build(
  recipe: Recipe, workdir: str | pathlib.Path, progress: bool = True, log: Callable[[str], None] = print
) -> Built:
  """Trains what is missing of the base and the tenants; returns their checkpoint folders."""
  start = time.perf_counter()
  root = pathlib.Path(workdir).expanduser().absolute() / recipe.key
  root.mkdir(parents=True, exist_ok=True)
  if not (root / "recipe.json").is_file():
    (root / "recipe.json").write_text(json.dumps(json.loads(recipe.to_json()), indent=1))
  base, logs = root / "base", root / "logs"
  tenants = {d: root / "tenants" / d for d in recipe.domains}
  trained = []
  base_params = None
  if not (base / checkpoint.HEADER).is_file():
    log(f"pretraining the base on {'+'.join(recipe.domains)} ({recipe.base.steps} steps)")
    params = init_params(recipe.model, seed=recipe.init_seed, scale=recipe.init_scale)
    base_params = _run(recipe, params, recipe.domains, recipe.base, recipe.base.seed, "base", base, logs, progress)
    trained.append("base")
  for i, (domain, out) in enumerate(tenants.items()):
    if (out / checkpoint.HEADER).is_file():
      continue
    if base_params is None:
      _, base_params = checkpoint.load(base)
    log(f"fine-tuning tenant {domain!r} on its domain ({recipe.finetune.steps} steps)")
    _run(recipe, base_params, (domain,), recipe.finetune, (recipe.finetune.seed, i), domain, out, logs, progress)
    trained.append(domain)
  return Built(root, base, tenants, tuple(trained), time.perf_counter() - start)
