"""The public model object: `jaxmoe.load(path)` -> `Model` with numpy in and out."""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import checkpoint, layouts, sampling
from jaxmoe.config import MixtralConfig
from jaxmoe.models import mixtral
from jaxmoe.moe import Impl
from jaxmoe.params import Params
from jaxmoe.tokenizer import Tokenizer, load_tokenizer

CACHE_BLOCK = 64  # cache lengths are rounded up to this: few compiled shapes


def round_up(n: int, block: int) -> int:
  return -(-n // block) * block


def prompt_bucket(n: int) -> int:
  """Prompt length padded to a power of two (>= 8) so prefill compiles O(log T) times."""
  return max(8, 1 << (n - 1).bit_length())


def pad_id(cfg) -> int:
  """What fills a row after its EOS: the pad id, else EOS, else 0."""
  return cfg.pad_token_id if cfg.pad_token_id is not None else (cfg.eos_token_id or 0)


def decode_loop(logits, cache, step, max_new_tokens: int, temperature: float, top_p: float, seed: int,
                eos: int | None, pad: int) -> np.ndarray:
  """Samples up to n tokens per row, calling `step(tokens [B], cache) -> (logits, cache)` between.

  Rows that produced `eos` are padded from then on; decoding stops early when
  every row has (HF `generate`). Returns int32 [B, n'] with n' <= n.
  """
  b = logits.shape[0]
  seeds = jnp.full((b,), seed, jnp.int32)
  temp = jnp.full((b,), temperature, jnp.float32)
  nucleus = jnp.full((b,), top_p, jnp.float32)
  new, done = [], np.zeros(b, bool)
  for i in range(max_new_tokens):
    nxt = np.asarray(sampling.sample(logits, seeds, jnp.full((b,), i, jnp.int32), temp, nucleus))
    nxt = np.where(done, pad, nxt).astype(np.int32)
    new.append(nxt)
    if eos is not None:
      done |= nxt == eos
    if done.all() or i == max_new_tokens - 1:
      break
    logits, cache = step(nxt, cache)
  return np.stack(new, axis=1)


class Model:
  """One model (one tenant): config, device parameters, optional tokenizer."""

  def __init__(self, cfg: MixtralConfig, params: Params, tokenizer: Tokenizer | None = None,
               impl: Impl = Impl.AUTO):
    layouts.layout(cfg).check_params(cfg, params)
    self.config = cfg
    self.params = jax.device_put(params)
    self.tokenizer = tokenizer
    self.impl = impl

  def _precision(self):
    # float32 checkpoints are compared with HF at 1e-4: keep full-precision matmuls
    # on GPUs, which would otherwise use TF32.
    if self.config.dtype == "float32":
      return jax.default_matmul_precision("float32")
    return contextlib.nullcontext()

  def logits(self, tokens) -> np.ndarray:
    """tokens [B, T] int -> float32 logits [B, T, V] (numpy)."""
    tokens = self._check_tokens(np.atleast_2d(np.asarray(tokens)))
    with self._precision():
      out = mixtral.forward(self.params, jnp.asarray(tokens, jnp.int32), self.config, self.impl)
    return np.asarray(out, np.float32)

  def generate(self, tokens, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0, lengths=None, stop_at_eos: bool = True) -> np.ndarray:
    """Continues prompts with KV-cache decoding.

    Args:
      tokens: [B, T] int prompts, right-padded when `lengths` is given; or a
        list of 1-D prompts of different lengths.
      max_new_tokens: n, tokens to add per row.
      temperature: 0 is greedy; > 0 samples (with `top_p` nucleus and `seed`).
      lengths: [B] prompt lengths for a right-padded batch (default: all T).
      stop_at_eos: like HF `generate`: a row that produced EOS is padded from
        then on, and decoding stops early when every row has.

    Returns:
      int32 [B, T + n'] with n' <= n: each row is its prompt, its new tokens,
      then padding (the pad id, else EOS).
    """
    tokens, lengths = self._batch(tokens, lengths)
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    cfg = self.config
    b, t = tokens.shape
    total = int(lengths.max()) + max_new_tokens
    if total > cfg.max_position_embeddings:
      raise ValueError(f"prompt + max_new_tokens = {total} exceeds max_position_embeddings={cfg.max_position_embeddings}")
    padded = np.zeros((b, prompt_bucket(t)), np.int32)
    padded[:, :t] = tokens
    cache = mixtral.init_cache(cfg, b, round_up(max(total, padded.shape[1]), CACHE_BLOCK))
    pad = pad_id(cfg)
    with self._precision():
      logits, cache = mixtral.prefill(self.params, jnp.asarray(padded), jnp.asarray(lengths), cache, cfg, self.impl)
      step = lambda nxt, cache: mixtral.decode_step(self.params, jnp.asarray(nxt), cache, cfg, self.impl)
      new = decode_loop(logits, cache, step, max_new_tokens, temperature, top_p, seed,
                        cfg.eos_token_id if stop_at_eos else None, pad)
    return self._assemble(tokens, lengths, new, pad)

  @staticmethod
  def _assemble(tokens, lengths, new, pad) -> np.ndarray:
    b, t = tokens.shape
    out = np.full((b, t + new.shape[1]), pad, np.int32)
    for i in range(b):
      n = int(lengths[i])
      out[i, :n] = tokens[i, :n]
      out[i, n : n + new.shape[1]] = new[i]
    return out

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


def model_for(cfg, params: Params, tokenizer: Tokenizer | None = None, impl: Impl = Impl.AUTO) -> Model:
  """The public model object of `cfg`'s architecture: `Model`, or `SwitchModel` for Switch."""
  if cfg.architecture == "switch":
    from jaxmoe.switch_api import SwitchModel

    return SwitchModel(cfg, params, tokenizer, impl)
  return Model(cfg, params, tokenizer, impl)


def load(path: str | os.PathLike, impl: Impl = Impl.AUTO, routing=None) -> Model:
  """Loads a jaxmoe checkpoint (from `jaxmoe-convert`) onto the default device.

  A Switch checkpoint gives a `jaxmoe.switch_api.SwitchModel` (encoder-decoder
  `logits` and `generate`); `routing` applies to Switch only: "hf_capacity"
  (the default here: transformers' expert capacity, so a converted model gives
  HF's numbers) or "dropless" (every token reaches its expert; the serving
  engine's default).
  """
  cfg, params = checkpoint.load(path)
  return model_for(single_model_config(cfg, routing, path), params, load_tokenizer(path, cfg), impl)


def single_model_config(cfg, routing=None, where=""):
  """The config a single-model API runs: Switch defaults to HF's capacity routing."""
  if cfg.architecture != "switch":
    if routing is not None:
      raise ValueError(f"routing={routing!r} applies to Switch models; {where} is {cfg.architecture}")
    return cfg
  from jaxmoe.switch_config import Routing

  return cfg.replace(routing=Routing(routing or Routing.HF_CAPACITY))
