"""Training: next-token cross-entropy plus the router load-balancing loss, with optax.

The loss of a batch of rows [B, 1 + T] is the mean cross-entropy of predicting
tokens 1..T from 0..T-1, plus `balance_coef` times the Switch Transformer /
Mixtral load-balancing loss averaged over layers:

  balance = E * sum_e f_e * P_e

where f_e is the fraction of the (token, k) assignments that went to expert e
and P_e the mean router probability of e. It is 1 when routing is uniform and
approaches E when every token goes to one expert. Every weight trains,
routers included; only the slot map is fixed.

The optimizer clips the global gradient norm, then AdamW (decay on matrices
only) with a linear warmup and cosine decay of the learning rate. Its numbers
sit in the optimizer state, so the base and every fine-tune share one
compiled step.

Axis names (jaxmoe/axes.py): B rows, T tokens, E experts, K top-k, V vocab, L layers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxmoe.families.mixtral import model as mixtral
from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.nn.moe import Impl
from jaxmoe.train.recipes import Phase
from jaxmoe.trees import Params

# Every logical expert on every token: on CPUs the fastest differentiable strategy at these sizes
# (plain products instead of a sort and a ragged matmul).
TRAIN_IMPL = Impl.EXPERTS


def load_balancing_loss(router_logits: jax.Array, top_k: int) -> jax.Array:
  """Switch/Mixtral auxiliary loss of one layer: router_logits [..., E] -> scalar (1 when uniform)."""
  num_experts = router_logits.shape[-1]
  logits = router_logits.reshape(-1, num_experts).astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)  # [N, E]
  _, chosen = jax.lax.top_k(probs, top_k)  # [N, K]
  fraction = jnp.mean(jax.nn.one_hot(chosen, num_experts, dtype=jnp.float32), axis=(0, 1))  # [E], sums to 1
  return num_experts * jnp.sum(fraction * jnp.mean(probs, axis=0))


def loss_fn(trainable: Params, slot_map, rows, cfg: MixtralConfig, balance_coef: float, impl: Impl = TRAIN_IMPL):
  """rows [B, 1 + T] int32 -> (loss, {"ce", "balance"})."""
  params = {**trainable, "slot_map": slot_map}
  logits, captured = mixtral.forward(params, rows[:, :-1], cfg, impl, capture=True)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, 1:]).mean()
  routers = captured["router_logits"]  # [L, B, T, E]
  balance = jnp.mean(jnp.stack([load_balancing_loss(routers[i], cfg.top_k) for i in range(cfg.num_layers)]))
  return ce + balance_coef * balance, {"ce": ce, "balance": balance}


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def schedule(phase: Phase) -> optax.Schedule:
  """Linear warmup from 0 to peak_lr, then cosine decay to peak_lr * end_lr_ratio at the last step."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=phase.peak_lr,
    warmup_steps=phase.warmup_steps,
    decay_steps=phase.steps,
    end_value=phase.peak_lr * phase.end_lr_ratio,
  )


def _matrices(tree):
  """Weight-decay mask: matrices decay, norm weights (vectors per layer) do not."""
  return jax.tree_util.tree_map_with_path(lambda path, x: "norm" not in jax.tree_util.keystr(path), tree)


def make_optimizer() -> optax.GradientTransformation:
  """clip_by_global_norm, then AdamW (decay on matrices only).

  Every number (clip norm, learning rate, betas, weight decay) lives in the
  optimizer state (`optax.inject_hyperparams`): `init_optimizer` sets a
  phase's values and the step sets each step's scheduled learning rate, so
  every phase runs one compiled step.
  """
  return optax.chain(
    optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=1.0),
    optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=0.0, b1=0.9, b2=0.95, weight_decay=0.0, mask=_matrices
    ),
  )


def set_hyperparams(state, **values):
  """The chain's state with named hyperparameters replaced (clip: max_norm; adamw: the rest)."""
  clip, adam = state
  pick = lambda hp: {k: jnp.asarray(values[k], hp[k].dtype) if k in values else hp[k] for k in hp}
  return clip._replace(hyperparams=pick(clip.hyperparams)), adam._replace(hyperparams=pick(adam.hyperparams))


def init_optimizer(opt: optax.GradientTransformation, trainable: Params, phase: Phase):
  return set_hyperparams(
    opt.init(trainable),
    max_norm=phase.clip_norm,
    learning_rate=0.0,
    b1=phase.b1,
    b2=phase.b2,
    weight_decay=phase.weight_decay,
  )


@functools.lru_cache(maxsize=8)
def make_step(cfg: MixtralConfig, balance_coef: float, impl: Impl = TRAIN_IMPL):
  """The jitted update (trainable, opt_state, slot_map, rows, lr) -> (trainable, opt_state, metrics).

  Cached: the base and the K fine-tunes compile it once.
  """
  opt = make_optimizer()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(trainable, opt_state, slot_map, rows, lr):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(trainable, slot_map, rows, cfg, balance_coef, impl)
    updates, opt_state = opt.update(grads, set_hyperparams(opt_state, learning_rate=lr), trainable)
    metrics = {"loss": loss, **aux, "grad_norm": global_norm(grads)}
    return optax.apply_updates(trainable, updates), opt_state, metrics

  return step, opt


def train(
  params: Params,
  batches: Iterator[np.ndarray],
  cfg: MixtralConfig,
  phase: Phase,
  balance_coef: float,
  desc: str = "train",
  progress: bool = True,
  log_every: int = 10,
  step_factory: Callable = make_step,
):
  """Runs `phase.steps` updates of every weight but the slot map.

  Args:
    params: the served layout of a single model, host or device arrays.
    batches: yields int32 rows [B, 1 + T] (or what `step_factory`'s step takes, a tree of arrays).
    cfg, phase, balance_coef: model, optimizer settings, balancing-loss weight.
    desc: progress bar label; progress: show a tqdm bar.
    step_factory: (cfg, balance_coef) -> (jitted step, optimizer); default Mixtral's
      `make_step` (Switch: `seq2seq.make_step`).

  Returns:
    (params as host numpy arrays, history: [{"step", "loss", "ce", "balance", "grad_norm", "lr"}]).
  """
  step, opt = step_factory(cfg, balance_coef)
  slot_map = jnp.asarray(params["slot_map"], jnp.int32)
  trainable = jax.tree.map(lambda x: jnp.array(x, copy=True), {k: v for k, v in params.items() if k != "slot_map"})
  opt_state = init_optimizer(opt, trainable, phase)
  lr, history = schedule(phase), []
  with tqdm(total=phase.steps, desc=desc, disable=not progress, unit="step", leave=True) as bar:
    for i in range(phase.steps):
      rate = jnp.float32(lr(i))
      batch = jax.tree.map(jnp.asarray, next(batches))
      trainable, opt_state, metrics = step(trainable, opt_state, slot_map, batch, rate)
      if (i + 1) % log_every == 0 or i + 1 == phase.steps:
        row = {"step": i + 1, **{k: float(v) for k, v in metrics.items()}, "lr": float(rate)}
        history.append(row)
        bar.set_postfix(loss=f"{row['ce']:.3f}", bal=f"{row['balance']:.2f}")
      bar.update(1)
  out = jax.tree.map(np.asarray, jax.device_get(trainable))
  return {**out, "slot_map": np.asarray(params["slot_map"], np.int32)}, history
