"""Training: corpora, the balancing loss, the optimizer chain, and a loss that goes down."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxmoe.families.mixtral.layout import init_params
from jaxmoe.io import checkpoint
from jaxmoe.train import build, corpus, recipes, trainer

RECIPE = recipes.recipe("test")


def test_recipes_exact_name_and_key():
  assert recipes.recipe("demo").name == "demo"
  with pytest.raises(KeyError, match="unknown recipe"):
    recipes.recipe("Demo")
  other = dataclasses.replace(RECIPE, finetune=dataclasses.replace(RECIPE.finetune, peak_lr=2e-3))
  assert RECIPE.key == recipes.recipe("test").key != other.key
  assert RECIPE.key.startswith("test-")


@pytest.mark.parametrize("domain", corpus.DOMAINS)
def test_corpus_is_deterministic_and_split(domain):
  c = corpus.load(domain, RECIPE.seq_len)
  assert c.train.size > 10_000 and c.heldout.size > 1_000
  rows = corpus.heldout_rows(c, 4)
  assert rows.shape == (4, RECIPE.seq_len + 1) and np.all(rows[:, 0] == corpus.BOS)
  assert np.all(rows[:, 1:] < 256)
  np.testing.assert_array_equal(rows, corpus.heldout_rows(c, 4))
  a = next(corpus.Batches((domain,), 3, 16, seed=5))
  np.testing.assert_array_equal(a, next(corpus.Batches((domain,), 3, 16, seed=5)))
  # Every row starts at a line start of the train text.
  assert np.all(c.train[c.train_starts[1:] - 1] == ord("\n"))


def test_heldout_text_is_not_training_text():
  held = bytes(corpus.load("arithmetic", 32).heldout[:2000]).decode().splitlines()[1:-1]
  train = set(bytes(corpus.load("arithmetic", 32).train).decode().splitlines())
  # Generated from another seed: most held-out lines never occur in training.
  assert sum(line in train for line in held) < 0.5 * len(held)


def _numpy_balance(logits, top_k):
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  chosen = np.argsort(-p, axis=-1, kind="stable")[:, :top_k]
  f = np.bincount(chosen.ravel(), minlength=logits.shape[-1]) / chosen.size
  return logits.shape[-1] * np.sum(f * p.mean(0))


def test_load_balancing_loss():
  e, k = 4, 2
  # Half the tokens to experts (0, 1), half to (2, 3): uniform use.
  uniform = np.tile(np.array([[9.0, 9.0, 0.0, 0.0], [0.0, 0.0, 9.0, 9.0]]), (8, 1))
  collapsed = np.tile(np.array([[9.0, 5.0, 0.0, 0.0]]), (16, 1))
  lu = float(trainer.load_balancing_loss(jnp.asarray(uniform), k))
  lc = float(trainer.load_balancing_loss(jnp.asarray(collapsed), k))
  assert lu == pytest.approx(1.0, abs=1e-3)
  assert lc > 1.5 * lu
  rand = np.random.default_rng(0).standard_normal((2, 5, e)) * 2
  got = float(trainer.load_balancing_loss(jnp.asarray(rand), k))
  assert got == pytest.approx(_numpy_balance(rand.reshape(-1, e), k), rel=1e-5)


def test_optimizer_clips_warms_up_and_decays():
  phase = recipes.Phase(steps=100, peak_lr=1e-2, warmup_steps=10, end_lr_ratio=0.1, clip_norm=0.5)
  lr = trainer.schedule(phase)
  assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1e-2)
  assert float(lr(100)) == pytest.approx(1e-3)
  values = [float(lr(i)) for i in range(10, 101, 10)]
  assert all(a > b for a, b in itertools.pairwise(values))  # cosine: decreasing after warmup
  opt = trainer.make_optimizer()
  params = {"w": jnp.ones((3, 3)), "norm": jnp.ones(3)}
  state = trainer.init_optimizer(opt, params, phase)
  assert float(state[0].hyperparams["max_norm"]) == 0.5
  # The first link clips the global norm: a gradient of norm 300 enters Adam at norm 0.5.
  grads = {"w": jnp.full((3, 3), 100.0), "norm": jnp.zeros(3)}
  clip = optax.clip_by_global_norm(0.5)
  clipped, _ = clip.update(grads, clip.init(params))
  assert float(trainer.global_norm(clipped)) == pytest.approx(0.5, rel=1e-5)
  state = trainer.set_hyperparams(state, learning_rate=1e-2)
  updates, state = opt.update(grads, state, params)
  # Adam's first step moves each weight by ~lr; weight decay (0 here) would add to matrices only.
  np.testing.assert_allclose(np.asarray(updates["w"]), -1e-2, rtol=1e-3)
  assert float(jnp.abs(updates["norm"]).max()) == 0.0


def test_weight_decay_skips_vectors():
  phase = recipes.Phase(steps=10, peak_lr=1e-2, warmup_steps=1, weight_decay=0.5)
  opt = trainer.make_optimizer()
  params = {"w": jnp.ones((2, 2)), "norm": jnp.ones(2)}
  state = trainer.set_hyperparams(trainer.init_optimizer(opt, params, phase), learning_rate=1e-2)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zero, state, params)
  np.testing.assert_allclose(np.asarray(updates["w"]), -1e-2 * 0.5)
  np.testing.assert_array_equal(np.asarray(updates["norm"]), 0.0)


def test_loss_decreases_on_a_fixed_batch():
  cfg = RECIPE.model
  params = init_params(cfg, seed=0)
  batch = next(corpus.Batches(corpus.DOMAINS, 4, RECIPE.seq_len, seed=0))
  phase = recipes.Phase(steps=12, peak_lr=1e-2, warmup_steps=1)
  out, history = trainer.train(params, itertools.repeat(batch), cfg, phase, 0.01, progress=False, log_every=1)
  losses = [h["ce"] for h in history]
  assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
  assert all(np.isfinite(h["grad_norm"]) for h in history)
  np.testing.assert_array_equal(out["slot_map"], params["slot_map"])
  before, after = jax.tree.leaves(params["experts"]), jax.tree.leaves(out["experts"])
  assert all(not np.array_equal(a, b) for a, b in zip(before, after))  # experts and routers train too
  assert not np.array_equal(out["backbone"]["layers"]["router"][0], params["backbone"]["layers"]["router"][0])


def test_build_trains_once_then_caches(tmp_path):
  built = build.build(RECIPE, tmp_path, progress=False, log=lambda s: None)
  assert built.trained == ("base", *RECIPE.domains)
  again = build.build(RECIPE, tmp_path, progress=False, log=lambda s: None)
  assert again.trained == () and again.tenants == built.tenants
  cfg, base = checkpoint.load(built.base)
  assert cfg == RECIPE.model
  _, tenant = checkpoint.load(built.tenants["code"])
  assert not np.array_equal(tenant["experts"]["w1"][:4], base["experts"]["w1"][:4])  # a full fine-tune
