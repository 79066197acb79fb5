"""Switch training: tasks from the corpora, span corruption, the masked balancing loss, a loss that goes down."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.families.switch import layout
from jaxmoe.families.switch import model as switch
from jaxmoe.io import checkpoint
from jaxmoe.train import build, recipes, seq2seq, tasks, trainer

RECIPE = recipes.recipe("switch-test")


def test_switch_recipes_registry_and_key():
  assert recipes.recipe("switch-demo").family == "switch" and recipes.recipe("demo").family == "mixtral"
  assert RECIPE.tenants == RECIPE.tasks
  other = dataclasses.replace(RECIPE, finetune=dataclasses.replace(RECIPE.finetune, seed=7))
  assert RECIPE.key == recipes.recipe("switch-test").key != other.key
  with pytest.raises(KeyError, match="unknown task"):
    dataclasses.replace(RECIPE, tasks=("arithmetic", "Arithmetic"))
  with pytest.raises(ValueError, match="dropless"):
    dataclasses.replace(RECIPE, model=RECIPE.model.replace(routing="hf_capacity"))


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_tasks_fit_their_shapes_and_split(name):
  spec = tasks.task(name)
  train, held = tasks.pairs(name, "train"), tasks.pairs(name, "heldout")
  assert len(train) > 500 and len(held) > 200
  for x, y in itertools.chain(train, held):
    assert 0 < len(x) < spec.enc_len and 0 < len(y) < spec.dec_len and not set(y) & set(tasks.SENTINELS)
  # Held-out inputs come from held-out text, less any that also occur among the training inputs.
  seen = {x for x, _ in train}
  assert not any(x in seen for x, _ in held)
  assert tasks.heldout_pairs(name, 5) == tasks.heldout_pairs(name, 5)


def test_task_pairs_are_what_the_docstring_says():
  pairs = dict(tasks.pairs("arithmetic", "heldout"))
  assert pairs[b"939-396=543"] == b"543+396=939"
  for x, y in list(pairs.items())[:300]:
    question, answer = x.decode().split("=")
    inverse, original = y.decode().split("=")
    assert eval(question) == int(answer) and eval(inverse.replace("/", "//")) == int(original)
    assert original == question.split("+")[0].split("*")[0].rsplit("-", 1)[0]
  summaries = dict(tasks.pairs("record-summary", "train"))
  assert summaries[b"1990-02-01,Thursday,February,32,5"] == b"Thursday 1 February 1990"
  params = dict(tasks.pairs("code-params", "heldout"))
  assert all(x.startswith(b"def ") or x.startswith(b"async def ") for x in params)
  assert all(y != b"self" and y.split(b", ")[0] in x.split(b"\n")[0] for x, y in params.items())
  open_, close = bytes([tasks.SENTINELS[0]]), bytes([tasks.SENTINELS[1]])
  for x, y in tasks.pairs("prose-reverse", "heldout")[:100]:
    assert x.count(open_) == 1 and x.split(open_)[1].split(close)[0] == y[::-1] and y.isalpha()
  for x, y in tasks.pairs("prose-lower", "heldout")[:100]:
    assert x.count(open_) == 1 and x.split(open_)[1].split(close)[0] == y.upper() and y.isalpha() and y.islower()


def test_span_corruption_restores_the_row():
  rng = np.random.default_rng(0)
  row = b"The quick brown fox jumps over the lazy dog, then runs far away from the farm."
  for _ in range(20):
    inp, out = tasks.span_corrupt(row, rng, 0.15, 3.0)
    # Put each span back in place of its sentinel.
    spans = {}
    cur = None
    for b in out:
      if b in tasks.SENTINELS:
        cur = b
        spans[cur] = bytearray()
      else:
        spans[cur].append(b)
    restored = b"".join(bytes(spans[b]) if b in spans else bytes([b]) for b in inp)
    assert restored == row
    assert sum(len(s) for s in spans.values()) == round(0.15 * len(row))
    assert (len(inp) + 1, len(out) + 1) == tasks.span_shapes(len(row), 0.15, 3.0)


def test_encode_layout():
  enc = tasks.encode([(b"ab", b"xyz")], enc_len=5, dec_len=5)
  assert enc["enc"].tolist() == [[tasks.BOS, 97, 98, tasks.PAD, tasks.PAD]] and enc["enc_len"].tolist() == [3]
  assert enc["dec"].tolist() == [[tasks.START, 120, 121, 122, tasks.PAD]]
  assert enc["target"].tolist() == [[120, 121, 122, tasks.EOS, tasks.PAD]]
  with pytest.raises(ValueError, match="exceed"):
    tasks.encode([(b"abcde", b"x")], enc_len=5, dec_len=5)


def test_masked_balance_matches_the_unmasked_loss():
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((12, 4)) * 2, jnp.float32)
  full = float(seq2seq.masked_balance(logits, jnp.ones(12)))
  assert full == pytest.approx(float(trainer.load_balancing_loss(logits, 1)), rel=1e-6)
  mask = jnp.asarray([1.0] * 5 + [0.0] * 7)
  assert float(seq2seq.masked_balance(logits, mask)) == pytest.approx(
    float(trainer.load_balancing_loss(logits[:5], 1)), rel=1e-6
  )


def test_router_capture_leaves_the_served_forward_unchanged():
  cfg = RECIPE.model
  params = layout.init_params(cfg, seed=0, scale=0.3)
  batch = jax.tree.map(jnp.asarray, next(tasks.TaskBatches("arithmetic", 3, seed=0)))
  logits, sown = seq2seq.forward_with_routers(params, batch, cfg)
  served = switch.forward(params, batch["enc"], batch["enc_len"], batch["dec"], cfg)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(served), rtol=1e-5, atol=1e-5)
  leaves = jax.tree.leaves(sown)
  assert sum(x.shape[0] for x in leaves) == cfg.num_moe_layers  # [G, B*T, E] per scanned block


def test_switch_loss_decreases_on_a_fixed_batch():
  cfg = RECIPE.model
  params = seq2seq.init_params(cfg, seed=0)
  batch = next(tasks.TaskBatches("arithmetic", 8, seed=0))
  phase = recipes.Phase(steps=12, peak_lr=1e-2, warmup_steps=1)
  out, history = trainer.train(
    params, itertools.repeat(batch), cfg, phase, 0.01, progress=False, log_every=1, step_factory=seq2seq.make_step
  )
  losses = [h["ce"] for h in history]
  assert losses[-1] < losses[0] - 0.5, losses
  assert all(np.isfinite(h["balance"]) and h["balance"] >= 1.0 - 1e-4 for h in history)
  np.testing.assert_array_equal(out["slot_map"], params["slot_map"])
  assert not np.array_equal(out["experts"]["wi"], params["experts"]["wi"])


def test_switch_build_trains_once_then_caches(tmp_path):
  small = dataclasses.replace(RECIPE, tasks=("arithmetic", "record-summary"))
  built = build.build(small, tmp_path, progress=False, log=lambda s: None)
  assert built.trained == ("base", "arithmetic", "record-summary")
  again = build.build(small, tmp_path, progress=False, log=lambda s: None)
  assert again.trained == () and again.tenants == built.tenants
  cfg, base = checkpoint.load(built.base)
  assert cfg == small.model
  _, tenant = checkpoint.load(built.tenants["arithmetic"])
  assert not np.array_equal(tenant["experts"]["wi"], base["experts"]["wi"])  # a full fine-tune
