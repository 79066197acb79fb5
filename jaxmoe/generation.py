"""What the families' public model objects share: input checks, the tokenizer, the sampling loop.

`jaxmoe.load(path)` returns one model object per family (MixtralModel,
SwitchModel), each a `ModelBase`: numpy in and out, parameters on the default
device. They share `generate(prompts, n)`; `logits` differs between a
decoder-only and an encoder-decoder model and is each family's own.
"""

from __future__ import annotations

import collections
import math
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import buckets
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.nn import moe
from jaxmoe.nn.moe import Impl
from jaxmoe.nn.precision import precision
from jaxmoe.nn.sampling import SamplingParams
from jaxmoe.nn.tenancy import SingleTenant

PAGE_SIZE = 16  # positions per KV-cache page
PROMPT_FLOOR = 8  # prompts are padded to a power of two >= this: prefill compiles O(log T) times
SEED_RANGE = (0, 2**31)  # the sampler's seeds are int32: [0, 2^31)


def pad_id(cfg) -> int:
  """What fills a row after its EOS: the pad id, else the first EOS, else 0."""
  if cfg.pad_token_id is not None:
    return cfg.pad_token_id
  return cfg.eos_ids[0] if cfg.eos_ids else 0


def check_sampling(max_new_tokens, temperature, top_p, seed) -> None:
  """Raises ValueError naming the first argument `generate` cannot honour."""
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
  if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 is greedy)")
  if not (isinstance(top_p, (int, float, np.floating)) and 0 < top_p <= 1):
    raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
  lo, hi = SEED_RANGE
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not lo <= seed < hi:
    raise ValueError(f"seed={seed!r} must be an integer in [0, 2^31)")


def contiguous_tables(b: int, pages: int, first: int = 1) -> np.ndarray:
  """[b, pages] int32: row i owns pages first + i * pages ... (page 0 is the scratch page)."""
  return (first + np.arange(b * pages, dtype=np.int32)).reshape(b, pages)


@runtime_checkable
class Model(Protocol):
  """What every family's model object offers."""

  config: object
  tokenizer: Tokenizer | None

  def generate(
    self,
    tokens,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    lengths=None,
    stop_at_eos: bool = True,
  ) -> np.ndarray: ...

  def new_tokens(self, row: np.ndarray, prompt_len: int) -> np.ndarray: ...

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids) -> str: ...


@jax.jit
def _retire(nxt, done, pad, eos_ids):
  """The tokens a step emits (pad after a row's EOS, as HF `generate` feeds them back) and rows done since."""
  step = jnp.where(done, pad, nxt).astype(jnp.int32)
  return step, done | jnp.isin(step, eos_ids)


class Finished:
  """When every row has produced EOS, learnt without stalling the device.

  Each step's `done` flags start their copy to the host at once; the loop
  reads only copies that have arrived, so it stops a few steps late at most,
  and `length` cuts the output back to the step where the last row ended.
  """

  def __init__(self, active: bool):
    self.active, self.copies, self.at = active, collections.deque(), None

  def seen(self, i: int, done: jax.Array) -> bool:
    if not self.active:
      return False
    done.copy_to_host_async()
    self.copies.append((i, done))
    while self.copies and self.copies[0][1].is_ready():
      j, flags = self.copies.popleft()
      if np.asarray(flags).all():
        self.at = j
        return True
    return False

  def length(self, steps: int) -> int:
    if self.active and self.at is None:  # ended by max_new_tokens: an earlier step may have ended every row
      for j, flags in self.copies:
        if np.asarray(flags).all():
          self.at = j
          break
    return steps if self.at is None else self.at + 1


class ModelBase:
  """One tenant's model: config, device parameters (served layout), optional tokenizer."""

  layout = None  # the family's layout module (subclasses set it)
  hooks = None  # the family's engine hooks: admit and decode, shared with the serving engine

  def __init__(self, cfg, params, tokenizer: Tokenizer | None = None, impl: Impl = Impl.AUTO):
    self.layout.check_params(cfg, params)
    self.config = cfg
    self.params = jax.device_put({**params, "experts": moe.pack(params["experts"])})
    self.tokenizer = tokenizer
    self.impl = impl

  @classmethod
  def config_for(cls, cfg, routing=None):
    """The config this model object runs (`jaxmoe.load`'s `routing` applies to Switch only)."""
    if routing is not None:
      raise ValueError(f"routing={routing!r} applies to Switch models; this is {cfg.architecture}")
    return cfg

  def _precision(self):
    return precision(self.config.dtype)

  def generate(
    self,
    tokens,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    lengths=None,
    stop_at_eos: bool = True,
  ) -> np.ndarray:
    """Continues prompts with paged KV-cache decoding, sampling on the device.

    Args:
      tokens: [B, T] int prompts, right-padded when `lengths` is given; or a
        list of 1-D prompts of different lengths.
      max_new_tokens: n, tokens to add per row.
      temperature: 0 is greedy; > 0 samples (with `top_p` nucleus and `seed`).
      lengths: [B] prompt lengths for a right-padded batch (default: all T).
      stop_at_eos: like HF `generate`: a row that produced any EOS id
        (`config.eos_ids`) is padded from then on, and decoding stops early
        when every row has.

    Returns:
      int32 rows of the family's output (`new_tokens` picks the new ones):
      decoder-only, [B, T + n'] prompt then new tokens; encoder-decoder,
      [B, 1 + n'] the decoder start token then new tokens; n' <= n, padded
      after EOS.
    """
    tokens, lengths = self._batch(tokens, lengths)
    check_sampling(max_new_tokens, temperature, top_p, seed)
    self._check_generate(lengths, max_new_tokens)
    b, t = tokens.shape
    padded = np.zeros((b, buckets.pow2(t, floor=PROMPT_FLOOR)), np.int32)
    padded[:, :t] = tokens
    with self._precision():
      new = self._decode(
        padded,
        lengths,
        max_new_tokens,
        SamplingParams.full(b, seed, temperature, top_p),
        self.config.eos_ids if stop_at_eos else (),
      )
    return self._assemble(tokens, lengths, new)

  def _decode(self, padded, lengths, n: int, sp: SamplingParams, eos: tuple[int, ...]) -> np.ndarray:
    """Admits the padded prompts into fresh pages and decodes up to n tokens: int32 [B, n' <= n]."""
    hooks, cfg, b = self.hooks, self.config, padded.shape[0]
    self_pos, enc_pos = hooks.positions(padded.shape[1], n)
    width = buckets.pow2(-(-self_pos // PAGE_SIZE))
    cross_width = -(-enc_pos // PAGE_SIZE)
    tables = contiguous_tables(b, width)
    cross = contiguous_tables(b, cross_width, 1 + b * width) if cross_width else None
    kv = hooks.init_kv(cfg, 1 + b * (width + cross_width), PAGE_SIZE)
    rows = hooks.admission_rows(tables, cross, lengths, sp)
    nxt, kv, rows = hooks.admit(self.params, jnp.asarray(padded), kv, rows, cfg, self.impl, SingleTenant())
    # The tokens stay on the device: the host enqueues the next step without waiting for the last, and
    # learns that every row has ended from a copy it started steps earlier (`Finished`).
    pad, eos_ids = jnp.int32(pad_id(cfg)), jnp.asarray(eos or (-1,), jnp.int32)
    done, new, finished = jnp.zeros(b, bool), [], Finished(bool(eos))
    for i in range(n):
      step, done = _retire(nxt, done, pad, eos_ids)
      new.append(step)
      if i == n - 1 or finished.seen(i, done):
        break
      nxt, kv, rows = hooks.decode(self.params, step, kv, rows, cfg, self.impl, SingleTenant())
    out = np.stack(jax.device_get(new), axis=1)
    return out[:, : finished.length(out.shape[1])]

  def _check_generate(self, lengths, max_new_tokens: int) -> None:
    """Family limits on prompt and output lengths (raise ValueError)."""

  def _assemble(self, tokens, lengths, new) -> np.ndarray:
    raise NotImplementedError

  def _batch(self, tokens, lengths):
    if isinstance(tokens, (list, tuple)) and tokens and np.ndim(tokens[0]) == 1 and lengths is None:
      rows = [np.asarray(r) for r in tokens]
      lengths = np.array([len(r) for r in rows])
      tokens = np.zeros((len(rows), int(lengths.max())), np.int32)
      for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    tokens = self._check_tokens(np.atleast_2d(np.asarray(tokens)))
    if lengths is None:
      lengths = np.full(tokens.shape[0], tokens.shape[1])
    lengths = np.asarray(lengths, np.int32)
    if lengths.shape != (tokens.shape[0],) or lengths.min() < 1 or lengths.max() > tokens.shape[1]:
      raise ValueError(f"lengths {lengths.tolist()} do not fit tokens of shape {tokens.shape}")
    return tokens.astype(np.int32), lengths

  def _check_tokens(self, tokens: np.ndarray) -> np.ndarray:
    if tokens.ndim != 2 or tokens.shape[1] == 0:
      raise ValueError(f"tokens must be [B, T] with T >= 1, got shape {tokens.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
      raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got [{tokens.min()}, {tokens.max()}]")
    return tokens

  def encode(self, text: str) -> list[int]:
    if self.tokenizer is None:
      raise ValueError("this checkpoint has no tokenizer.json and no byte vocabulary: pass token ids")
    ids = self.tokenizer.encode(text)
    if not ids:
      raise ValueError("the prompt encodes to no tokens")
    return ids

  def decode(self, ids) -> str:
    if self.tokenizer is None:
      raise ValueError("this checkpoint has no tokenizer: cannot decode text")
    return self.tokenizer.decode(ids)
