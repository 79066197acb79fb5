"""Scores of a Switch (encoder-decoder) model on held-out rows of a text-to-text task.

For each row (encoder input, reference target):
  exact_match  the greedy output, cut at the first EOS, equals the reference
  rouge_l      ROUGE-L F1 of the output against the reference (`rouge-score`, its
               default tokenizer: lowercased runs of letters and digits, so
               punctuation and signs do not count; no stemming)
  perplexity   exp(mean negative log-likelihood of the reference's tokens and EOS),
               teacher-forced
Sentinel bytes (tasks.SENTINELS) are removed from outputs before comparing: a
span-corruption model (the base) answers a masked input as "<sentinel>span".
Outputs are greedy, decoded with the serving path's functions (encode, start,
decode_step over paged caches) in fixed-size batches, so every model of one config compiles once
per task shape. Routing is the config's (dropless for jaxmoe's tenants).

Axis names (jaxmoe/axes.py): B rows of one batch, U encoder tokens, T decoder tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.families.switch import model as switch
from jaxmoe.families.switch.config import SwitchConfig
from jaxmoe.generation import PAGE_SIZE, contiguous_tables
from jaxmoe.nn.moe import Impl
from jaxmoe.train import tasks
from jaxmoe.trees import Params

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TaskScores:
  exact_match: float
  rouge_l: float
  perplexity: float
  nll: float  # nats per reference token (EOS included)
  rows: int
  tokens: int

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "impl"))
def greedy(params: Params, enc, enc_len, cfg: SwitchConfig, steps: int, impl: Impl = Impl.AUTO):
  """Greedy decoding of `steps` tokens for encoder inputs [B, U] of `enc_len` [B] -> tokens [B, steps] int32."""
  b, u = enc.shape
  width, cross_width = -(-(1 + steps) // PAGE_SIZE), -(-u // PAGE_SIZE)  # pages per row: decoder, encoder
  kv = switch.init_kv(cfg, 1 + b * (width + cross_width), PAGE_SIZE)
  tables = jnp.asarray(contiguous_tables(b, width))
  cross = jnp.asarray(contiguous_tables(b, cross_width, 1 + b * width))
  out = switch.encode(params, enc, enc_len, cfg, impl)
  logits, kv = switch.start(params, out, enc_len, kv, tables, cross, cfg, impl)

  def body(carry, step):
    tok, kv = carry
    lengths = jnp.full((b,), step, jnp.int32)  # the decoder start token sits at position 0
    logits, kv = switch.decode_step(params, tok, kv, tables, cross, lengths, enc_len, cfg, impl)
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    return (nxt, kv), nxt

  first = jnp.argmax(logits, -1).astype(jnp.int32)
  _, rest = jax.lax.scan(body, (first, kv), jnp.arange(1, steps, dtype=jnp.int32))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "impl"))
def target_nll(params: Params, enc, enc_len, dec, target, cfg: SwitchConfig, impl: Impl = Impl.AUTO):
  """Per-row sums of the reference's negative log-likelihood [B] and its token counts [B] (PAD excluded)."""
  logp = jax.nn.log_softmax(switch.forward(params, enc, enc_len, dec, cfg, impl).astype(F32), axis=-1)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]  # [B, T]
  mask = (target != cfg.pad_token_id).astype(F32)
  return jnp.sum(nll * mask, axis=1), jnp.sum(mask, axis=1)


def output_text(ids, eos: int) -> str:
  """Generated ids -> text: cut at the first EOS, bytes only, sentinels removed."""
  keep = []
  for i in np.asarray(ids).tolist():
    if i == eos:
      break
    if i < 256 and i not in tasks.SENTINELS:
      keep.append(i)
  return bytes(keep).decode("utf-8", errors="replace")


@functools.cache
def _rouge():
  try:
    from rouge_score import rouge_scorer
  except ImportError:
    raise ImportError("ROUGE-L needs the rouge-score package: pip install 'jaxmoe[bench]'") from None
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, reference: str) -> float:
  """ROUGE-L F1 by rouge-score (default tokenizer, no stemming)."""
  return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


class TaskRows:
  """One task's held-out rows, encoded and padded to whole batches."""

  def __init__(self, task: str, count: int, batch: int):
    spec = tasks.task(task)
    self.task, self.batch, self.steps = task, batch, spec.max_new_tokens
    self.pairs = tasks.heldout_pairs(task, count)
    self.references = [y.decode("utf-8", errors="replace") for _, y in self.pairs]
    enc = tasks.encode(self.pairs, spec.enc_len, spec.dec_len)
    pad = -len(self.pairs) % batch
    self.arrays = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in enc.items()}

  @property
  def rows(self) -> int:
    return len(self.pairs)

  def chunks(self):
    for start in range(0, self.arrays["enc"].shape[0], self.batch):
      yield start, {k: jnp.asarray(v[start : start + self.batch]) for k, v in self.arrays.items()}


def generate(params: Params, rows: TaskRows, cfg: SwitchConfig, impl: Impl = Impl.AUTO) -> list[str]:
  """The model's greedy output text for every row."""
  out = []
  for _, c in rows.chunks():
    ids = np.asarray(greedy(params, c["enc"], c["enc_len"], cfg, rows.steps, impl))
    out += [output_text(r, cfg.eos_token_id) for r in ids]
  return out[: rows.rows]


def score(params: Params, rows: TaskRows, cfg: SwitchConfig, impl: Impl = Impl.AUTO) -> TaskScores:
  """Exact match, ROUGE-L and reference perplexity of one model on one task's rows."""
  predictions = generate(params, rows, cfg, impl)
  nll, count = np.zeros(0), np.zeros(0)
  for _, c in rows.chunks():
    s, n = target_nll(params, c["enc"], c["enc_len"], c["dec"], c["target"], cfg, impl)
    nll, count = np.append(nll, np.asarray(s)), np.append(count, np.asarray(n))
  nll, count = nll[: rows.rows], count[: rows.rows]
  mean_nll = float(nll.sum() / count.sum())
  pairs = list(zip(predictions, rows.references))
  return TaskScores(
    exact_match=float(np.mean([p == r for p, r in pairs])),
    rouge_l=float(np.mean([rouge_l(p, r) for p, r in pairs])),
    perplexity=float(np.exp(mean_nll)),
    nll=mean_nll,
    rows=rows.rows,
    tokens=int(count.sum()),
  )


class TaskSuite:
  """Held-out rows of each tenant's own task; scores models tenant by tenant."""

  def __init__(self, cfg: SwitchConfig, tenants, rows: int, batch: int = 64, impl: Impl = Impl.AUTO):
    self.cfg, self.impl = cfg, impl
    self.rows = {t: TaskRows(t, rows, batch) for t in tenants}

  @property
  def tenants(self) -> list[str]:
    return list(self.rows)

  def score(self, models: dict[str, Params]) -> dict[str, TaskScores]:
    """Tenant t's scores on its own task, served by models[t] (tenants missing from `models` are skipped)."""
    return {t: score(models[t], self.rows[t], self.cfg, self.impl) for t in self.tenants if t in models}

  def score_shared(self, params: Params, tenants=None) -> dict[str, TaskScores]:
    """Scores when one model (the base, a merge) serves every tenant (or those given)."""
    return self.score({t: params for t in (tenants or self.tenants)})
