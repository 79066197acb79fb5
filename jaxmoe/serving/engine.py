"""The multi-tenant serving engine: continuous batching over a consolidated store, a paged KV cache.

A library object driven by a loop (`submit`, `step`, `run_until_done`), with
no global state, so the batch CLI and the HTTP server drive the same code.

Each step admits waiting requests into free rows of a fixed [max_batch] batch
(one batched prefill into their KV pages, which also samples each one's first
token), runs one decode step for every active row (sampling on the device: the
host receives token ids [B] only), and retires finished rows. On one device
without an expert cache the steps overlap (`EngineConfig.overlap`,
serving/overlap.py): step n+1 is dispatched before step n's ids are read, so
the host's bookkeeping runs while the device computes. Shapes are
static: prompts are padded to power-of-two length buckets, admission groups to
power-of-two sizes, and the pages a decode step attends over to a power of two
that covers the longest active row, so compiled programs are bounded by bucket
counts, and a step's attention costs what the rows' lengths need, not
max_seq_len.

KV memory is a pool of pages (`EngineConfig.kv_cache_gb`, default: enough for
max_batch rows of max_seq_len). A request reserves the pages of every position
it can fill when admitted and returns them when it ends; admission waits, in
order, while too few are free (jaxmoe/serving/pages.py).

Modes (`weights.py`): swap and resident batch one tenant at a time; the
scheduler keeps serving the current tenant while others wait at most
`max_wait_s`, then drains the batch and switches to the longest-waiting
tenant. Mixed batches any tenants together and never switches.

Failures stay with the request that caused them: a token callback or a
detokenizer that raises ends that request with an error response; a device step
that raises ends the requests of that step; the engine stays consistent and
keeps serving the others.

The model family is a narrow hook (its registry entry's `engine`): a
decoder-only family prefills prompts into the KV cache (Mixtral); an
encoder-decoder family encodes them and starts the decoder (Switch). Public
surface besides the loop: `check`, `cancel`, `stats()`, `num_running`,
`num_waiting`, `free_rows`, `next_step_load()`, `summary()` and `close()`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxmoe import buckets
from jaxmoe.devices import commit, free, to_device
from jaxmoe.errors import RequestError
from jaxmoe.families import registry
from jaxmoe.nn.sampling import SamplingParams
from jaxmoe.nn.tenancy import MixedTenants, SingleTenant
from jaxmoe.serving import config as config_lib
from jaxmoe.serving import mesh as mesh_lib
from jaxmoe.serving import offload
from jaxmoe.serving import overlap as overlap_lib
from jaxmoe.serving import requests as req_lib
from jaxmoe.serving.detok import TextStream
from jaxmoe.serving.pages import HostRows, PageAllocator, pages_for
from jaxmoe.serving.requests import Request
from jaxmoe.serving.scheduler import next_tenant
from jaxmoe.serving.sequence import Sequence
from jaxmoe.serving.stats import ServedStats, weight_counters
from jaxmoe.serving.weights import Mode, make_weights

TokenCallback = Callable[[str, int, str], None]  # (request id, token id, text delta)


class Engine:
  """Serves requests for the tenants of a store (see module docstring)."""

  def __init__(
    self,
    store,
    config: config_lib.EngineConfig = config_lib.EngineConfig(),
    tokenizer=None,
    on_token: TokenCallback | None = None,
    clock: Callable[[], float] = time.perf_counter,
  ):
    self.config, self.cfg, self.clock, self.on_token = config, store.config, clock, on_token
    config_lib.check_config(config, self.cfg)
    self.mesh = mesh_lib.EngineMesh.create(config.mesh, config.placement, config.split_backbones)  # None: one device
    self.family = mesh_lib.hooks(registry.of(self.cfg).engine, self.mesh)
    self.tokenizer = tokenizer if tokenizer is not None else getattr(store, "tokenizer", None)
    slots, need = offload.cache_budget(config, store, self.mesh)
    self.weights = make_weights(config.mode, store, slots, self.mesh)
    if self.weights.cache is not None:  # without a cache every expert stays anyway
      try:
        offload.check_shards(self.weights.cache, store, need, config.expert_cache_gb)
        if config.pinned_tenants:
          offload.pin(self.weights.cache, store, config.pinned_tenants, need)
      except ValueError:
        self.weights.close()
        raise
    q = config.page_size
    width = pages_for(config.max_seq_len, q)
    cross_width = width if self.family.cross else 0
    self.page_bytes = self.family.page_bytes(self.cfg, q)
    shards = 1 if self.mesh is None else self.mesh.data_shards  # KV pages split over `data`, rows with them
    self.rows_per_shard = config.max_batch // shards
    num_pages = config_lib.num_pages(config, self.page_bytes, width + cross_width, self.rows_per_shard)
    self.pages = PageAllocator(num_pages, shards)
    # Committed like the jitted steps' outputs, so the first step does not compile a second variant.
    self.kv = self._place_kv(self.family.init_kv(self.cfg, num_pages, q))
    self.host_rows = HostRows(config.max_batch, width, cross_width)
    self._rows_on_device, self._width_on_device = None, 0
    self.rows: list[Sequence | None] = [None] * config.max_batch
    self._ids_on_device: dict[tuple[int, ...], jax.Array] = {}
    self.waiting: collections.deque[Sequence] = collections.deque()
    self._in_flight: dict[str, Sequence] = {}
    self.done: list[dict] = []
    self.served = ServedStats(config.history)
    self.started = clock()
    self.decode_steps = 0
    self._compiled_at_start = compilations()
    # Overlapping needs the step's ids to stay on one device: a mesh's followers are sent host ids, and
    # the expert cache's stepped programs read the routing back every layer anyway.
    self.overlap = config.overlap and self.mesh is None and self.weights.cache is None
    self._pending: overlap_lib.Dispatched | None = None  # the decode step dispatched, not yet read
    self._last_ids = to_device(np.zeros(config.max_batch, np.int32))  # that step's ids, on the device

  # Requests in.
  def check(self, request: Request | dict, default_id: str = "request") -> tuple[Request, list[int]]:
    """Validates a request against this engine (fields, tenant, prompt, lengths, KV pages) without
    queueing it. Returns (the Request, its prompt token ids); raises RequestError with the message an
    error response carries."""
    if isinstance(request, Request):  # the same checks as a dict: fields may have been set by hand
      request = req_lib.parse_request(req_lib.as_dict(request), request.id)
    elif isinstance(request, dict):
      request = req_lib.parse_request(request, default_id)
    else:
      raise RequestError(f"a request must be a dict or a Request, got {type(request).__name__}")
    if request.id in self._in_flight:
      raise RequestError(f"request id {request.id!r} is already in the engine; ids must be unique")
    prompt = req_lib.prompt_ids(request, self.weights.tenants, self.tokenizer, self.cfg.vocab_size)
    self.family.check_lengths(len(prompt), request.max_tokens, self.config.max_seq_len)
    need = sum(self._pages_needed(len(prompt), request.max_tokens))
    if need > self.pages.largest:
      raise RequestError(
        f"the request needs {need} KV-cache pages of {self.config.page_size} positions; the "
        f"cache has {self.pages.largest}{' per data shard' if self.pages.shards > 1 else ''} (raise kv_cache_gb)"
      )
    return request, prompt

  def submit(self, request: Request | dict, default_id: str = "request", prompt: list[int] | None = None) -> str:
    """Queues a request; an invalid one is answered with an error response at the next step.

    `prompt`, the token ids `check` returned for this very Request, skips checking it again.
    """
    if prompt is not None and isinstance(request, Request):
      checked = request
    else:
      try:
        checked, prompt = self.check(request, default_id)
      except RequestError as e:
        rid, model = req_lib.id_and_model(request, default_id)
        self.reject(rid, str(e), model)
        return rid
    seq = Sequence(checked, prompt, self.clock())
    if self.tokenizer is not None:
      seq.stream = TextStream(self.tokenizer, checked.stop)
    self.waiting.append(seq)
    self._in_flight[checked.id] = seq
    return checked.id

  def reject(self, rid: str, message: str, model: str | None = None) -> None:
    self.done.append(req_lib.error_response(rid, model, message))

  def cancel(self, request_id: str) -> bool:
    """Drops a waiting or running request (a client that went away): its row and pages are free for the
    next step and no response is produced. False if no such request is in the engine."""
    seq = self._in_flight.pop(request_id, None)
    if seq is None:
      return False
    if seq.row >= 0:
      self._free_row(seq)
    else:
      self.waiting.remove(seq)
    return True

  def room(self, prompt_len: int) -> int:
    """The largest max_tokens a request with a prompt of `prompt_len` tokens may ask for (0: none)."""
    self_pos, enc_pos = self.family.positions(prompt_len, 0)
    if enc_pos:  # encoder-decoder: the prompt and the decoder positions are bounded apart
      return 0 if prompt_len > self.config.max_seq_len else self.config.max_seq_len - self_pos
    return max(0, self.config.max_seq_len - self_pos)

  def _pages_needed(self, prompt_len: int, max_tokens: int) -> tuple[int, int]:
    """(self-attention pages, encoder pages) of a request. Prefill's padding past them lands in the
    scratch page or in the request's own pages beyond its length, which nothing reads before overwriting."""
    self_pos, enc_pos = self.family.positions(prompt_len, max_tokens)
    return pages_for(self_pos, self.config.page_size), pages_for(enc_pos, self.config.page_size)

  # The loop.
  @property
  def has_work(self) -> bool:
    return bool(self.waiting) or any(self.rows) or bool(self.done) or self._pending is not None

  def step(self) -> list[dict]:
    """Admits, prefills, decodes one token for every active row; returns finished responses.

    Overlapped, the tokens this returns are those of the previous decode step (and of this step's
    prefill): this step's decode is read at the next call, while the one after it computes.
    """
    admitted = self._admissions()
    first = self._prefill(admitted) if admitted else None
    if first is not None and not self.overlap:
      self._take(first)  # the decode below starts from host ids: read the first tokens now
      first = None
    before, self._pending = self._pending, None
    failed = self._decode(first) if any(self.rows) else None
    if before is not None:
      self._take(before)
    if failed is not None:  # after `before`: rows that step finished are served, not failed
      self._device_failure([s for s in failed[0] if s.row >= 0], failed[1])
    if first is not None:
      self._take(first)
    if not self.overlap and self._pending is not None:
      this_step, self._pending = self._pending, None
      self._take(this_step)
    out, self.done = self.done, []
    for r in out:
      self.served.add(r)
    return out

  def run_until_done(self) -> list[dict]:
    out = []
    while self.has_work:
      out.extend(self.step())
    return out

  # Scheduling.
  def _admissions(self) -> list[Sequence]:
    """The waiting sequences to admit now, in order, with rows and pages reserved for each."""
    free_rows = [i for i, s in enumerate(self.rows) if s is None]
    chosen = []
    for s in self._candidates(len(free_rows)):
      need, cross = self._pages_needed(len(s.prompt), s.request.max_tokens)
      row = self._row_for(free_rows, need + cross)
      if row is None:
        break  # wait, in order, until running sequences return pages
      shard = row // self.rows_per_shard
      s.pages, s.cross_pages = self.pages.take(need, shard), self.pages.take(cross, shard)
      s.row = row
      free_rows.remove(row)
      chosen.append(s)
    for s in chosen:
      self.waiting.remove(s)
    return chosen

  def _row_for(self, free_rows: list[int], pages: int) -> int | None:
    """A free row whose data shard has `pages` free pages: in the shard with the most free pages, its
    first (one shard: the first free row), or None."""
    fits = [r for r in free_rows if self.pages.free_in(r // self.rows_per_shard) >= pages]
    return max(fits, key=lambda r: (self.pages.free_in(r // self.rows_per_shard), -r), default=None)

  def _candidates(self, free: int) -> list[Sequence]:
    if not self.waiting or free == 0:
      return []
    if self.config.mode is Mode.MIXED:
      return list(self.waiting)[:free]
    running = next((s.request.model for s in self.rows if s is not None), None)
    waiting = [(s.request.model, s.arrival) for s in self.waiting]
    tenant, prefetch = next_tenant(waiting, running, self.weights.active, self.clock(), self.config.max_wait_s)
    if prefetch is not None:
      self.weights.prefetch(prefetch)  # admit nothing: drain this batch, then switch
    if tenant is None:
      return []
    return [s for s in self.waiting if s.request.model == tenant][:free]

  def _params_and_ops(self, seqs):
    if self.config.mode is Mode.MIXED:
      ids = tuple(self.weights.index[s.request.model] if s is not None else 0 for s in seqs)
      if ids not in self._ids_on_device:  # rows change tenants rarely: reuse the device copy
        if len(self._ids_on_device) > 64:
          self._ids_on_device.clear()
        self._ids_on_device[ids] = commit(np.asarray(ids, np.int32))
      return self.weights.stacked, MixedTenants(self._ids_on_device[ids], len(self.weights.tenants))
    tenant = next(s.request.model for s in seqs if s is not None)
    return self.weights.params(tenant), SingleTenant()

  # Device work.
  def _prefill(self, seqs: list[Sequence]) -> overlap_lib.Dispatched | None:
    cfg, family = self.config, self.family
    nb = buckets.pow2(len(seqs), cfg.max_batch)
    tb = buckets.pow2(max(len(s.prompt) for s in seqs), cfg.max_seq_len, floor=8)
    tokens = np.zeros((nb, tb), np.int32)
    lengths = np.ones(nb, np.int32)
    rows = self.host_rows
    tables = np.zeros((nb, rows.tables.shape[1]), np.int32)  # padding rows write to the scratch page
    cross = np.zeros((nb, rows.cross_tables.shape[1]), np.int32) if rows.cross_tables is not None else None
    sp = SamplingParams.full(nb)
    for i, s in enumerate(seqs):
      tokens[i, : len(s.prompt)] = s.prompt
      lengths[i] = len(s.prompt)
      tables[i, : len(s.pages)] = s.pages
      if cross is not None:
        cross[i, : len(s.cross_pages)] = s.cross_pages
      r = s.request
      sp.seeds[i], sp.temperature[i], sp.top_p[i] = r.seed, r.temperature, r.top_p
    params, ops = self._params_and_ops(list(seqs) + [None] * (nb - len(seqs)))
    admission = commit(family.admission_rows(tables, cross, lengths, sp))
    try:
      first, self.kv, _ = family.admit(
        params, self._put(tokens), self.kv, admission, self.cfg, cfg.impl, ops, cache=self.weights.cache
      )
    except Exception as e:  # noqa: BLE001  a failed program fails its own requests, nothing else
      self._device_failure(seqs, e)
      return None
    now = self.clock()
    for s in seqs:
      s.admitted = now
      self.rows[s.row] = s
      r = s.request
      rows.set(
        s.row,
        s.pages,
        s.cross_pages,
        family.admitted_length(len(s.prompt)),
        len(s.prompt),
        r.seed,
        1,
        r.temperature,
        r.top_p,
      )
    return overlap_lib.Dispatched(tuple(seqs), first, tuple(range(len(seqs))))

  def _decode(self, first: overlap_lib.Dispatched | None) -> tuple[list[Sequence], Exception] | None:
    """Dispatches one decode step (`self._pending`); returns (its sequences, the error) if it failed."""
    running = [s for s in self.rows if s is not None]
    if self.overlap:  # the previous step's ids, this step's admissions merged in: all on the device
      tokens = self._last_ids
      if first is not None:
        rows = np.full(first.tokens.shape[0], self.config.max_batch, np.int32)
        rows[: len(first.seqs)] = [s.row for s in first.seqs]
        tokens = overlap_lib.merge(tokens, first.tokens, commit(rows))
    else:
      tokens = np.zeros(self.config.max_batch, np.int32)
      for s in running:
        tokens[s.row] = s.tokens[-1]
      tokens = self._put(tokens)
    width = self.host_rows.width_for(self.config.page_size)
    if self.host_rows.dirty or width != self._width_on_device:
      self._rows_on_device, self._width_on_device = self.host_rows.upload(width), width
    params, ops = self._params_and_ops(self.rows)
    try:
      nxt, self.kv, self._rows_on_device = self.family.decode(
        params,
        tokens,
        self.kv,
        self._rows_on_device,
        self.cfg,
        self.config.impl,
        ops,
        cache=self.weights.cache,
      )
    except Exception as e:  # noqa: BLE001  the step's rows cannot be told apart: all of them fail
      return running, e
    self.host_rows.advance()
    self.decode_steps += 1
    self._last_ids = nxt
    self._pending = overlap_lib.Dispatched(tuple(running), nxt, tuple(s.row for s in running))
    return None

  def _take(self, d: overlap_lib.Dispatched) -> None:
    """Reads a dispatched step's ids and appends each to its sequence, unless the sequence ended since
    (finished, failed or cancelled: its row is -1), which drops that token."""
    try:
      ids = np.asarray(d.tokens)
    except Exception as e:  # noqa: BLE001  the program failed while running: as if it failed to start
      self._device_failure([s for s in d.seqs if s.row >= 0], e)
      return
    now = self.clock()
    for s, i in zip(d.seqs, d.index):
      if s.row >= 0:
        self._append(s, int(ids[i]), now)

  def _append(self, s: Sequence, token: int, now: float) -> None:
    if s.first_token is None:
      s.first_token = now
    s.tokens.append(token)
    try:
      eos = token in self.cfg.eos_ids
      delta = s.stream.push(token) if s.stream is not None and not eos else ""
      if eos or (s.stream is not None and s.stream.stopped):
        s.finish_reason = "stop"
      elif len(s.tokens) >= s.request.max_tokens:
        s.finish_reason = "length"
      if s.finish_reason is not None and s.stream is not None:
        delta += s.stream.finish()
      if self.on_token is not None:
        self.on_token(s.request.id, token, delta)
    except Exception as e:  # noqa: BLE001  a callback or tokenizer failure ends this request only
      self._fail(s, f"request failed while emitting token {token}: {type(e).__name__}: {e}")
      return
    if s.finish_reason is not None:
      self._finish(s, s.response(now))

  def _finish(self, s: Sequence, response: dict) -> None:
    self._free_row(s)
    self._in_flight.pop(s.request.id, None)
    self.done.append(response)

  def _free_row(self, s: Sequence) -> None:
    if s.row >= 0 and self.rows[s.row] is s:
      self.rows[s.row] = None
      self.host_rows.clear(s.row)
    self.pages.give_back(s.pages + s.cross_pages)
    s.pages, s.cross_pages, s.row = [], [], -1

  def _fail(self, s: Sequence, message: str) -> None:
    self._finish(s, req_lib.error_response(s.request.id, s.request.model, message))

  def _device_failure(self, seqs: list[Sequence], error: Exception) -> None:
    """A jitted step raised: its sequences get an error; a cache it consumed is rebuilt, ending the rest."""
    message = f"the device step failed: {type(error).__name__}: {error}"
    for s in seqs:
      self._fail(s, message)
    if any(leaf.is_deleted() for leaf in jax.tree.leaves(self.kv)):
      for s in [s for s in self.rows if s is not None]:
        self._fail(s, message)
      q = self.config.page_size
      self.kv = self._place_kv(self.family.init_kv(self.cfg, self.pages.pages_per_shard, q))
    self.host_rows.dirty = True

  def _put(self, x):
    """A step's host input: committed to the default device (one cheap transfer, no eager op); on a mesh,
    left to the mesh hooks, which shard it."""
    return commit(x) if self.mesh is None else x

  def _place_kv(self, kv):
    return to_device(kv) if self.mesh is None else self.mesh.kv(kv)

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
    """Counters of the engine so far: tenant switches, device bytes, sequences, KV pages."""
    return {
      **weight_counters(self.weights, self.kv),
      "kv_pages": self.pages.usable,
      "kv_pages_free": self.pages.free,
      "running": self.num_running,
      "waiting": self.num_waiting,
      "resident": {t: int(self.weights.resident(t)) for t in self.weights.tenants},
      "decode_steps": self.decode_steps,
      "requests": self.served.requests,
      "errors": self.served.errors,
      "completion_tokens": self.served.completion_tokens,
    }

  def close(self) -> None:
    """Frees the engine's device buffers (cache and weights); the engine cannot step afterwards."""
    free(self.kv)
    self.weights.close()

  def summary(self) -> dict:
    """The engine's counters and latency percentiles (over the most recent `history` requests)."""
    return {
      "mode": self.config.mode.value,
      **self.served.summary(self.clock() - self.started),
      "decode_steps": self.decode_steps,
      "compilations": compilations() - self._compiled_at_start,
      **weight_counters(self.weights, self.kv),
    }


def compilations() -> int:
  """Programs compiled so far by the serving path's jitted functions (this process)."""
  return sum(f._cache_size() for family in registry.FAMILIES for f in family.engine.jitted)
