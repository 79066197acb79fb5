"""What the families' public model objects share: input checks, the tokenizer, the sampling loop.

`jaxmoe.load(path)` returns one model object per family (MixtralModel,
SwitchModel), each a `ModelBase`: numpy in and out, parameters on the default
device. They share `generate(prompts, n)`; `logits` differs between a
decoder-only and an encoder-decoder model and is each family's own.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import buckets
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.nn import moe_ops
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


@functools.cache
def _decode_loop(hooks):
  """`hooks.decode` run on the device until `n` tokens per row or every row has ended: one program.

  Returns (tokens [S, B] int32 with S = n rounded up to a power of two, the
  count n' <= n of steps emitted, the cache). Step i emits the sampled token, or `pad`
  once the row has produced an EOS id (HF `generate` feeds pads back the
  same way); decoding stops after the step at which every row has ended.
  """

  def run(params, nxt, kv, rows, n, pad, eos_ids, cfg, impl, ops, size):
    def cond(state):
      i, done = state[0], state[4]
      return (i < n) & ~jnp.all(done)

    def body(state):
      i, nxt, kv, rows, done, out = state
      step = jnp.where(done, pad, nxt).astype(jnp.int32)
      done = done | jnp.isin(step, eos_ids)
      out = out.at[i].set(step)

      def more(args):
        return hooks.decode(params, step, *args, cfg, impl, ops)

      nxt, kv, rows = jax.lax.cond((i + 1 < n) & ~jnp.all(done), more, lambda args: (nxt, *args), (kv, rows))
      return i + 1, nxt, kv, rows, done, out

    b = nxt.shape[0]
    state = (jnp.int32(0), nxt, kv, rows, jnp.zeros(b, bool), jnp.zeros((size, b), jnp.int32))
    i, _, kv, _, _, out = jax.lax.while_loop(cond, body, state)
    return out, i, kv  # kv returned so that the donated cache is updated in place, not copied

  return jax.jit(run, static_argnames=("cfg", "impl", "size"), donate_argnames=("kv",))


class ModelBase:
  """One tenant's model: config, device parameters (served layout), optional tokenizer."""

  layout = None  # the family's layout module (subclasses set it)
  hooks = None  # the family's engine hooks: admit and decode, shared with the serving engine

  def __init__(self, cfg, params, tokenizer: Tokenizer | None = None, impl: Impl = Impl.AUTO):
    self.layout.check_params(cfg, params)
    self.config = cfg
    self.params = jax.device_put({**params, "experts": moe_ops.pack(params["experts"])})
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
    eos_ids = jnp.asarray(eos or (-1,), jnp.int32)
    out, count, _ = _decode_loop(hooks)(
      self.params, nxt, kv, rows, n, pad_id(cfg), eos_ids, cfg, self.impl, SingleTenant(), buckets.pow2(n)
    )
    return np.asarray(out)[: int(count)].T

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
