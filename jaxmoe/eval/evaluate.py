"""Quality of a model on held-out rows, and its fidelity to a reference model.

For rows [n, 1 + T] (BOS, then text) every position t < T predicts token t + 1:
  perplexity  exp(mean negative log-likelihood of the next token)
  kl          mean over positions of KL(reference || model) between next-token
              distributions: how far the model drifted from the reference
              (a tenant's original fine-tune)
  top1        fraction of positions where both models' most likely token agree
Rows run in fixed-size batches through one jitted program, so every model of
one config compiles once.

Axis names (jaxmoe/axes.py): B rows of one batch, T positions, V vocab; n rows in all.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.families.mixtral import model as mixtral
from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.nn.moe import Impl
from jaxmoe.trees import Params

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Scores:
  perplexity: float
  nll: float  # mean negative log-likelihood (nats per token)
  kl: float | None  # None without a reference
  top1: float | None
  tokens: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def log_probs(params: Params, rows, cfg: MixtralConfig, impl: Impl = Impl.AUTO):
  """rows [B, 1 + T] -> next-token log-probabilities [B, T, V] float32."""
  return jax.nn.log_softmax(mixtral.forward(params, rows[:, :-1], cfg, impl).astype(F32), axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def batch_sums(params: Params, rows, weight, ref_logp, cfg: MixtralConfig, impl: Impl = Impl.AUTO):
  """Sums over a batch of (nll, kl, agreement), each position weighted by its row's `weight` [B]."""
  logp = log_probs(params, rows, cfg, impl)  # [B, T, V]
  nll = -jnp.take_along_axis(logp, rows[:, 1:, None], axis=-1)[..., 0]  # [B, T]
  kl = jnp.sum(jnp.exp(ref_logp) * (ref_logp - logp), axis=-1)
  agree = (jnp.argmax(logp, -1) == jnp.argmax(ref_logp, -1)).astype(F32)
  w = weight[:, None]
  return jnp.sum(nll * w), jnp.sum(kl * w), jnp.sum(agree * w)


def _batches(rows: np.ndarray, batch: int):
  """(start, padded rows [batch, ...], weight [batch]) covering every row once."""
  for start in range(0, rows.shape[0], batch):
    chunk = rows[start : start + batch]
    weight = np.zeros(batch, np.float32)
    weight[: chunk.shape[0]] = 1.0
    if chunk.shape[0] < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - chunk.shape[0], axis=0)])
    yield start, chunk, weight


def reference_log_probs(
  params: Params, rows: np.ndarray, cfg: MixtralConfig, batch: int = 16, impl: Impl = Impl.AUTO
) -> np.ndarray:
  """The reference model's next-token log-probabilities [n, T, V] float32 (host)."""
  out = np.empty((rows.shape[0], rows.shape[1] - 1, cfg.vocab_size), np.float32)
  for start, chunk, weight in _batches(rows, batch):
    n = int(weight.sum())
    out[start : start + n] = np.asarray(log_probs(params, jnp.asarray(chunk), cfg, impl))[:n]
  return out


def evaluate(
  params: Params,
  rows: np.ndarray,
  cfg: MixtralConfig,
  reference: np.ndarray | None = None,
  batch: int = 16,
  impl: Impl = Impl.AUTO,
) -> Scores:
  """Scores a model on rows [n, 1 + T]; `reference` [n, T, V] from `reference_log_probs` adds kl/top1."""
  rows = np.asarray(rows, np.int32)
  ref_batch = np.zeros((batch, rows.shape[1] - 1, cfg.vocab_size), np.float32)  # stays 0 without a reference
  totals = np.zeros(3)
  for start, chunk, weight in _batches(rows, batch):
    n = int(weight.sum())
    if reference is not None:
      ref_batch[:n] = reference[start : start + n]
    sums = batch_sums(params, jnp.asarray(chunk), jnp.asarray(weight), jnp.asarray(ref_batch), cfg, impl)
    totals += np.asarray([float(s) for s in sums])
  count = rows.shape[0] * (rows.shape[1] - 1)
  nll, kl, top1 = (float(x) for x in totals / count)
  if reference is None:
    kl = top1 = None
  return Scores(perplexity=float(np.exp(nll)), nll=nll, kl=kl, top1=top1, tokens=count)
