"""Training Switch (encoder-decoder) tenants: target cross-entropy plus the router balancing loss.

A batch is `tasks.encode`'s tree: encoder input [B, U] of `enc_len` [B] valid
tokens, decoder input [B, T] and targets [B, T] (PAD where there is none). The
loss is the mean cross-entropy over the real target tokens plus
`balance_coef` times the Switch Transformer load-balancing loss (top-1),
averaged over the MoE layers, each layer's over its real tokens only: encoder
layers over the valid encoder positions, decoder layers over the target
positions. Router logits come from the model's "intermediates" collection
(`Block.feed_forward` sows them; serving never makes it mutable).

Routing is dropless, as serving runs it; the MoE strategy is the
differentiable `Impl.EXPERTS`. The optimizer, schedule and loop are the
Mixtral trainer's (`trainer.train(..., step_factory=make_step)`). Weights
start from T5's initialisation (`init_params`): without attention scaling
the projections' scales matter, and unit-scale embeddings carry the token
identity that copying tasks need (a flat 0.05 learns several times slower).

Axis names (jaxmoe/axes.py): B rows, U encoder tokens, T decoder tokens, E experts, G scanned groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmoe.families.switch import layout
from jaxmoe.families.switch import model as switch
from jaxmoe.families.switch.config import Routing, SwitchConfig
from jaxmoe.nn.moe import Impl
from jaxmoe.nn.tenancy import SingleTenant
from jaxmoe.train import trainer
from jaxmoe.trees import Params

TRAIN_IMPL = Impl.EXPERTS


def init_std(cfg: SwitchConfig) -> dict[str, float]:
  """T5's (transformers' SwitchTransformers) normal init std of each leaf name; norms start at 1."""
  d, f, h, n = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads
  q, kv, o = (d * h) ** -0.5, d**-0.5, (n * h) ** -0.5
  std = {"embed": 1.0, "lm_head": d**-0.5, "rel_bias": d**-0.5, "router": d**-0.5, "wi": d**-0.5, "wo": f**-0.5}
  return {**std, "q": q, "k": kv, "v": kv, "o": o, "cq": q, "ck": kv, "cv": kv, "co": o}


def init_params(cfg: SwitchConfig, seed: int = 0, factor: float = 1.0) -> Params:
  """A single model with T5's initialisation (std per leaf from `init_std`, times `factor`; norms 1)."""
  unit = layout.init_params(cfg, seed=seed, scale=1.0)
  std = init_std(cfg)

  def scale(path, x):
    name = path[-1].key
    return np.ones_like(x) if "norm" in name else (x * np.float32(factor * std[name])).astype(x.dtype)

  out = {k: jax.tree_util.tree_map_with_path(scale, unit[k]) for k in ("backbone", "experts")}
  return {**out, "slot_map": unit["slot_map"]}


def masked_balance(router_logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Top-1 load-balancing loss of one layer over the tokens where mask [N] is 1: logits [N, E] -> scalar.

  E * sum_e f_e * P_e with f_e the fraction of tokens routed to e and P_e the
  mean router probability of e; 1 when routing is uniform.
  """
  num_experts = router_logits.shape[-1]
  probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [N, E]
  w = mask.astype(jnp.float32)[:, None] / jnp.maximum(jnp.sum(mask), 1)
  fraction = jnp.sum(jax.nn.one_hot(jnp.argmax(probs, -1), num_experts) * w, axis=0)  # [E]
  return num_experts * jnp.sum(fraction * jnp.sum(probs * w, axis=0))


def _router_terms(intermediates: dict, enc_mask: jax.Array, dec_mask: jax.Array) -> list[jax.Array]:
  """One balancing loss per MoE layer from the sown router logits {stack: ... [G, B*U or B*T, E]}."""
  out = []
  for stack, mask in (("encoder", enc_mask), ("decoder", dec_mask)):
    for sown in jax.tree.leaves(intermediates.get(stack, {})):
      out += [masked_balance(sown[g], mask.reshape(-1)) for g in range(sown.shape[0])]
  return out


def forward_with_routers(params: Params, batch: dict, cfg: SwitchConfig, impl: Impl = TRAIN_IMPL):
  """Teacher-forced logits [B, T, V] float32 and the sown router logits of every MoE layer."""
  net = switch.Switch(cfg, impl, 0, write_cross=True)
  args = (batch["enc"], batch["enc_len"], batch["dec"], params["experts"], params["slot_map"], SingleTenant())
  logits, state = net.apply({"params": params["backbone"]}, *args, mutable=["intermediates"])
  return logits, state["intermediates"]


def loss_fn(trainable: Params, slot_map, batch: dict, cfg: SwitchConfig, balance_coef: float, impl: Impl = TRAIN_IMPL):
  """-> (loss, {"ce", "balance"}) of one batch (see module docstring)."""
  logits, sown = forward_with_routers({**trainable, "slot_map": slot_map}, batch, cfg, impl)
  dec_mask = (batch["target"] != cfg.pad_token_id).astype(jnp.float32)  # [B, T]
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target"])
  ce = jnp.sum(xent * dec_mask) / jnp.maximum(jnp.sum(dec_mask), 1.0)
  u = batch["enc"].shape[1]
  enc_mask = (jnp.arange(u)[None, :] < batch["enc_len"][:, None]).astype(jnp.float32)
  terms = _router_terms(sown, enc_mask, dec_mask)
  balance = jnp.mean(jnp.stack(terms)) if terms else jnp.float32(0.0)
  return ce + balance_coef * balance, {"ce": ce, "balance": balance}


@functools.lru_cache(maxsize=8)
def make_step(cfg: SwitchConfig, balance_coef: float, impl: Impl = TRAIN_IMPL):
  """The jitted update (trainable, opt_state, slot_map, batch, lr) -> (trainable, opt_state, metrics)."""
  if cfg.routing is not Routing.DROPLESS:
    raise ValueError("Switch tenants train dropless, as serving routes them")
  opt = trainer.make_optimizer()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(trainable, opt_state, slot_map, batch, lr):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, aux), grads = grad_fn(trainable, slot_map, batch, cfg, balance_coef, impl)
    updates, opt_state = opt.update(grads, trainer.set_hyperparams(opt_state, learning_rate=lr), trainable)
    metrics = {"loss": loss, **aux, "grad_norm": trainer.global_norm(grads)}
    return optax.apply_updates(trainable, updates), opt_state, metrics

  return step, opt
