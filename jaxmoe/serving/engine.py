"""The multi-tenant serving engine: continuous batching over a consolidated store.

A library object driven by a loop (`submit`, `step`, `run_until_done`), with
no global state, so the batch CLI and a later HTTP server drive the same code.

Each step admits waiting requests into free rows of a fixed [max_batch] batch
(one batched prefill into a small cache, then copied into the batch's KV
cache), runs one decode step for every active row, samples, and retires
finished rows. Shapes are static: prompts are padded to power-of-two length
buckets and admission groups to power-of-two sizes, so the number of compiled
programs is bounded by the bucket counts, not the number of requests.

Modes (`weights.py`): swap and resident batch one tenant at a time; the
scheduler keeps serving the current tenant while others wait at most
`max_wait_s`, then drains the batch and switches to the longest-waiting
tenant. Mixed batches any tenants together and never switches.

The model family is a narrow hook (its registry entry's `engine`): a
decoder-only family prefills prompts into the KV cache (Mixtral); an
encoder-decoder family encodes them and starts the decoder (Switch), so the
scheduler and the modes are shared.

Besides the loop, a small public surface for code that drives or measures an
engine: `stats()`, `num_running`, `num_waiting`, `free_rows`,
`next_step_load()` and `close()`.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe import buckets
from jaxmoe.devices import free, to_device
from jaxmoe.errors import RequestError
from jaxmoe.families import registry
from jaxmoe.nn import sampling
from jaxmoe.nn.moe import Impl
from jaxmoe.nn.tenancy import MixedTenants, SingleTenant
from jaxmoe.serving import requests as req_lib
from jaxmoe.serving.requests import Request
from jaxmoe.serving.scheduler import starving
from jaxmoe.serving.weights import Mode, make_weights
from jaxmoe.trees import tree_bytes

TokenCallback = Callable[[str, int, str], None]  # (request id, token id, text delta)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  mode: Mode = Mode.MIXED
  max_batch: int = 8
  max_seq_len: int = 256  # prompt + max_tokens must fit
  max_wait_s: float = 1.0  # swap/resident: how long another tenant may wait before a switch
  impl: Impl = Impl.AUTO


@dataclasses.dataclass
class Sequence:
  request: Request
  prompt: list[int]
  arrival: float
  admitted: float | None = None
  first_token: float | None = None
  tokens: list[int] = dataclasses.field(default_factory=list)
  text: str = ""
  finish_reason: str | None = None
  row: int = -1


class Engine:
  """Serves requests for the tenants of a store (see module docstring)."""

  def __init__(
    self,
    store,
    config: EngineConfig = EngineConfig(),
    tokenizer=None,
    on_token: TokenCallback | None = None,
    clock: Callable[[], float] = time.perf_counter,
  ):
    self.config, self.cfg, self.clock, self.on_token = config, store.config, clock, on_token
    if config.max_batch < 1 or config.max_seq_len < 2:
      raise ValueError(f"need max_batch >= 1 and max_seq_len >= 2, got {config}")
    max_positions = self.cfg.max_positions  # None: relative positions, no limit
    if max_positions is not None and config.max_seq_len > max_positions:
      raise ValueError(f"max_seq_len={config.max_seq_len} exceeds the model's max_position_embeddings={max_positions}")
    self.family = registry.of(self.cfg).engine
    self.tokenizer = tokenizer if tokenizer is not None else getattr(store, "tokenizer", None)
    self.weights = make_weights(config.mode, store)
    # Committed like the jitted steps' outputs, so the first step does not compile a second variant.
    self.cache = to_device(self.family.init_cache(self.cfg, config.max_batch, config.max_seq_len))
    self.rows: list[Sequence | None] = [None] * config.max_batch
    self._ids_on_device: dict[tuple[int, ...], jax.Array] = {}
    self.waiting: collections.deque[Sequence] = collections.deque()
    self.done: list[dict] = []
    self.served: list[dict] = []
    self.started = clock()
    self.decode_steps = 0
    self._compiled_at_start = compilations()

  # Requests in.
  def check(self, request: Request | dict, default_id: str = "request") -> tuple[Request, list[int]]:
    """Validates a request against this engine (fields, tenant, prompt, lengths) without queueing it.

    Returns (the Request, its prompt token ids); raises RequestError with the message an error
    response carries.
    """
    if isinstance(request, dict):
      request = req_lib.parse_request(request, default_id)
    elif not isinstance(request, Request):
      raise RequestError(f"a request must be a dict or a Request, got {type(request).__name__}")
    return request, self._prompt_ids(request)

  def submit(self, request: Request | dict, default_id: str = "request") -> str:
    """Queues a request; an invalid one is answered with an error response at the next step."""
    try:
      request, prompt = self.check(request, default_id)
    except RequestError as e:
      rid = request.id if isinstance(request, Request) else default_id
      model = request.model if isinstance(request, Request) else None
      if isinstance(request, dict):
        rid, model = str(request.get("id", default_id)), request.get("model")
      self.reject(rid, str(e), model if isinstance(model, str) else None)
      return rid
    self.waiting.append(Sequence(request, prompt, self.clock()))
    return request.id

  def cancel(self, request_id: str) -> bool:
    """Drops a waiting or running request (a client that went away): its row is free for the next
    step and no response is produced. False if no such request is in the engine."""
    for s in self.waiting:
      if s.request.id == request_id:
        self.waiting.remove(s)
        return True
    for i, s in enumerate(self.rows):
      if s is not None and s.request.id == request_id:
        self.rows[i] = None
        return True
    return False

  def reject(self, rid: str, message: str, model: str | None = None) -> None:
    self.done.append(req_lib.error_response(rid, model, message))

  def _prompt_ids(self, r: Request) -> list[int]:
    if r.model not in self.weights.index:
      raise RequestError(f"unknown model {r.model!r}; this store serves {self.weights.tenants}")
    if r.prompt is not None:
      if self.tokenizer is None:
        raise RequestError("this store has no tokenizer: send 'prompt_ids' instead of 'prompt'")
      ids = list(self.tokenizer.encode(r.prompt))
    else:
      ids = list(r.prompt_ids)
      bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
      if bad:
        raise RequestError(f"'prompt_ids' out of the vocabulary [0, {self.cfg.vocab_size}): {bad[:5]}")
    if not ids:
      raise RequestError("the prompt encodes to no tokens")
    self.family.check_lengths(len(ids), r.max_tokens, self.config.max_seq_len)
    return ids

  # The loop.
  @property
  def has_work(self) -> bool:
    return bool(self.waiting) or any(self.rows) or bool(self.done)

  def step(self) -> list[dict]:
    """Admits, prefills, decodes one token for every active row; returns finished responses."""
    free = [i for i, s in enumerate(self.rows) if s is None]
    admitted = self._admissions(len(free))
    if admitted:
      self._prefill(admitted, free[: len(admitted)])
    if any(self.rows):
      self._decode()
    out, self.done = self.done, []
    self.served.extend(out)
    return out

  def run_until_done(self) -> list[dict]:
    out = []
    while self.has_work:
      out.extend(self.step())
    return out

  # Scheduling.
  def _admissions(self, free: int) -> list[Sequence]:
    if not self.waiting or free == 0:
      return []
    if self.config.mode is Mode.MIXED:
      return [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
    running = [s.request.model for s in self.rows if s is not None]
    current = running[0] if running else self.weights.active
    starving = self._starving(current)
    if running:
      if starving is not None:
        self.weights.prefetch(starving)  # admit nothing: drain this batch, then switch
        return []
      tenant = current
    elif starving is not None:
      tenant = starving
    elif any(s.request.model == current for s in self.waiting):
      tenant = current
    else:
      tenant = self.waiting[0].request.model
    chosen = [s for s in self.waiting if s.request.model == tenant][:free]
    for s in chosen:
      self.waiting.remove(s)
    return chosen

  def _starving(self, current: str | None) -> str | None:
    return starving(((s.request.model, s.arrival) for s in self.waiting), current, self.clock(), self.config.max_wait_s)

  def _params_and_ops(self, seqs):
    if self.config.mode is Mode.MIXED:
      ids = tuple(self.weights.index[s.request.model] if s is not None else 0 for s in seqs)
      if ids not in self._ids_on_device:  # rows change tenants rarely: reuse the device copy
        if len(self._ids_on_device) > 64:
          self._ids_on_device.clear()
        self._ids_on_device[ids] = to_device(np.asarray(ids, np.int32))
      return self.weights.stacked, MixedTenants(self._ids_on_device[ids], len(self.weights.tenants))
    tenant = next(s.request.model for s in seqs if s is not None)
    return self.weights.params(tenant), SingleTenant()

  # Device work.
  def _prefill(self, seqs: list[Sequence], rows: list[int]) -> None:
    cfg, cap = self.config, self.config.max_batch
    nb = buckets.pow2(len(seqs), cap)
    tb = buckets.pow2(max(len(s.prompt) for s in seqs), cfg.max_seq_len, floor=8)
    tokens = np.zeros((nb, tb), np.int32)
    lengths = np.ones(nb, np.int32)
    targets = np.full(nb, cap, np.int32)  # padding rows land out of range and are dropped
    now = self.clock()
    for i, (s, row) in enumerate(zip(seqs, rows)):
      tokens[i, : len(s.prompt)] = s.prompt
      lengths[i], targets[i] = len(s.prompt), row
      s.admitted, s.row = now, row
      self.rows[row] = s
    params, ops = self._params_and_ops(list(seqs) + [None] * (nb - len(seqs)))
    logits, self.cache = self.family.admit(
      params, jnp.asarray(tokens), jnp.asarray(lengths), self.cache, jnp.asarray(targets), self.cfg, cfg.impl, ops
    )
    self._emit(seqs, logits)

  def _decode(self) -> None:
    tokens = np.zeros(self.config.max_batch, np.int32)
    for s in self.rows:
      if s is not None:
        tokens[s.row] = s.tokens[-1]
    params, ops = self._params_and_ops(self.rows)
    logits, self.cache = self.family.decode_step(
      params, jnp.asarray(tokens), self.cache, self.cfg, self.config.impl, ops
    )
    self.decode_steps += 1
    self._emit([s for s in self.rows if s is not None], logits, by_row=True)

  def _emit(self, seqs: list[Sequence], logits, by_row: bool = False) -> None:
    """Samples the next token of each sequence (logits row = s.row if by_row else position)."""
    n = logits.shape[0]
    seeds, steps = np.zeros(n, np.int32), np.zeros(n, np.int32)
    temp, top_p = np.zeros(n, np.float32), np.ones(n, np.float32)
    for i, s in enumerate(seqs):
      j = s.row if by_row else i
      r = s.request
      seeds[j], steps[j], temp[j], top_p[j] = r.seed, len(s.tokens), r.temperature, r.top_p
    picked = np.asarray(
      sampling.sample(logits, jnp.asarray(seeds), jnp.asarray(steps), jnp.asarray(temp), jnp.asarray(top_p))
    )
    now = self.clock()
    for i, s in enumerate(seqs):
      self._append(s, int(picked[s.row if by_row else i]), now)

  def _append(self, s: Sequence, token: int, now: float) -> None:
    if s.first_token is None:
      s.first_token = now
    s.tokens.append(token)
    eos = token == self.cfg.eos_token_id
    delta = ""
    if self.tokenizer is not None and not eos:
      text = self.tokenizer.decode(s.tokens)
      delta, s.text = text[len(s.text) :] if text.startswith(s.text) else text, text
      cut = min((s.text.find(stop) for stop in s.request.stop if stop in s.text), default=-1)
      if cut >= 0:
        s.text, s.finish_reason = s.text[:cut], "stop"
    if self.on_token is not None:
      self.on_token(s.request.id, token, delta)
    if eos:
      s.finish_reason = "stop"
    elif s.finish_reason is None and len(s.tokens) >= s.request.max_tokens:
      s.finish_reason = "length"
    if s.finish_reason is not None:
      self.rows[s.row] = None
      self.done.append(self._response(s, now))

  def _response(self, s: Sequence, now: float) -> dict:
    n = len(s.tokens)
    return {
      "id": s.request.id,
      "object": "text_completion",
      "model": s.request.model,
      "text": s.text,
      "token_ids": s.tokens,
      "finish_reason": s.finish_reason,
      "usage": {"prompt_tokens": len(s.prompt), "completion_tokens": n, "total_tokens": len(s.prompt) + n},
      "timings": {
        "queue_s": s.admitted - s.arrival,
        "ttft_s": s.first_token - s.arrival,
        "tpot_s": (now - s.first_token) / (n - 1) if n > 1 else 0.0,
        "turnaround_s": now - s.arrival,
      },
      "error": None,
    }

  # Public state, for code that drives or measures the engine.
  @property
  def num_running(self) -> int:
    return sum(s is not None for s in self.rows)

  @property
  def num_waiting(self) -> int:
    return len(self.waiting)

  @property
  def free_rows(self) -> int:
    return self.config.max_batch - self.num_running

  def next_step_load(self) -> tuple[int, int]:
    """(prompt tokens the next step would prefill, rows it would then decode), if no tenant switch
    intervenes: free rows are filled in arrival order."""
    admit = [s for _, s in zip(range(self.free_rows), self.waiting)]
    return sum(len(s.prompt) for s in admit), self.num_running + len(admit)

  def stats(self) -> dict:
    """Counters of the engine so far: tenant switches, device bytes, sequences."""
    st = self.weights.stats
    return {
      "switches": st.switches,
      "switch_bytes": st.bytes,
      "switch_s": st.seconds,
      "device_weight_bytes": self.weights.device_bytes(),
      "kv_bytes": tree_bytes(self.cache),
      "running": self.num_running,
      "waiting": self.num_waiting,
      "decode_steps": self.decode_steps,
    }

  def close(self) -> None:
    """Frees the engine's device buffers (cache and weights); the engine cannot step afterwards."""
    free(self.cache)
    self.weights.close()

  # Reporting.
  def summary(self) -> dict:
    ok = [r for r in self.served if r["error"] is None]
    wall = self.clock() - self.started
    tokens = sum(r["usage"]["completion_tokens"] for r in ok)

    def pct(key, q):
      vals = [r["timings"][key] for r in ok]
      return float(np.percentile(vals, q)) if vals else None

    stats = self.weights.stats
    return {
      "mode": self.config.mode.value,
      "requests": len(self.served),
      "completed": len(ok),
      "errors": len(self.served) - len(ok),
      "completion_tokens": tokens,
      "wall_s": wall,
      "tokens_per_s": tokens / wall if wall > 0 else 0.0,
      "ttft_p50_s": pct("ttft_s", 50),
      "ttft_p99_s": pct("ttft_s", 99),
      "turnaround_p50_s": pct("turnaround_s", 50),
      "turnaround_p99_s": pct("turnaround_s", 99),
      "switches": stats.switches,
      "switch_bytes": stats.bytes,
      "switch_s": stats.seconds,
      "decode_steps": self.decode_steps,
      "compilations": compilations() - self._compiled_at_start,
      "device_weight_bytes": self.weights.device_bytes(),
    }


def compilations() -> int:
  """Programs compiled so far by the serving path's jitted functions (this process)."""
  fns = [f for family in registry.FAMILIES for f in family.engine.jitted] + [sampling.sample]
  return sum(f._cache_size() for f in fns)
