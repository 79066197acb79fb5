"""The OpenAI-compatible HTTP app over a serving Engine (FastAPI).

  POST /v1/completions        prompt (text or token ids), max_tokens, temperature, top_p, stop, seed, stream
  POST /v1/chat/completions   messages through the tenant's chat template
  GET  /v1/models             every tenant, with lineage, shared experts, residency, quality drift
  GET  /health, /metrics      liveness; Prometheus text

`model` names the tenant. The engine runs in its own thread (`loop.py`);
handlers reach it only through the hub (`hub.py`). Every error is an
OpenAI-style JSON body (`errors.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from jaxmoe.server import protocol
from jaxmoe.server.answer import ClientGone, stream_response, wait_response
from jaxmoe.server.chat import load_chats
from jaxmoe.server.errors import APIError, bad_request, error_body
from jaxmoe.server.hub import Hub
from jaxmoe.server.loop import EngineLoop
from jaxmoe.server.metrics import UNKNOWN, Metrics
from jaxmoe.server.middleware import Guard
from jaxmoe.server.tenants import Tenants

log = logging.getLogger("jaxmoe.server")
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}
OUTCOMES = {400: "invalid", 401: "unauthorized", 404: "not_found", 413: "too_large", 429: "rejected", 504: "timeout"}


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """What the server adds to the engine's config."""

  api_key: str | None = None  # bearer key required on /v1/*; None: open
  max_waiting: int = 128  # accepted requests without a first token; more get 429
  request_timeout_s: float = 300.0  # arrival to last token; then 504
  max_body_bytes: int = 1 << 20  # larger bodies get 413
  sse_ping_s: float = 15.0  # a keep-alive comment on every stream this often
  send_timeout_s: float = 30.0  # a stream whose client stops reading for this long is dropped, its row freed
  # 0: an event per engine step; > 0: after the first event, at most one per interval, holding the
  # tokens of the steps between (fewer sends: less CPU per token when steps are short).
  stream_interval_s: float = 0.0

  def __post_init__(self):
    positive = self.request_timeout_s > 0 and self.sse_ping_s > 0 and self.send_timeout_s > 0
    if self.max_waiting < 1 or not positive or self.max_body_bytes < 1 or self.stream_interval_s < 0:
      raise ValueError(
        "need max_waiting >= 1, request_timeout_s, sse_ping_s and send_timeout_s > 0, max_body_bytes >= 1, "
        f"stream_interval_s >= 0; got {self}"
      )


def validation_message(exc: RequestValidationError) -> str:
  """pydantic's errors as one OpenAI-style message naming the fields."""
  parts = []
  for err in exc.errors():
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    field = ".".join(loc)
    kind = err.get("type", "")
    if kind == "json_invalid":
      parts.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
    elif not field:
      parts.append("the body must be a JSON object")
    elif kind == "extra_forbidden":
      parts.append(f"unknown field '{field}'")
    elif kind == "missing":
      parts.append(f"'{field}' is required")
    else:
      parts.append(f"'{field}': {err.get('msg')}")
  return "; ".join(dict.fromkeys(parts)) or "invalid request body"


class Server:
  """The app's state: engine loop, hub, tenants, chat templates, metrics."""

  def __init__(self, store, engine_config, config: ServerConfig, make_engine=None):
    from jaxmoe.serving import Engine

    self.config, self.store = config, store
    self.metrics = Metrics()
    self.tenants = Tenants(store, engine_config.mode)
    self.chats = load_chats(store)
    make = make_engine or (lambda on_token: Engine(store, engine_config, on_token=on_token))
    self.hub = Hub(self.tenants, self.metrics, getattr(store, "tokenizer", None))
    # The inbox bounds what awaits validation besides the waiting queue: beyond it, 429 at once.
    inbox = 2 * (config.max_waiting + engine_config.max_batch) + 16
    self.loop = EngineLoop(make, self.hub.deliver, config.max_waiting, inbox)
    self.metrics.attach(self.loop, self.tenants)
    self.metrics.waiting.set_function(lambda: self.hub.waiting)
    self.metrics.inflight.set_function(lambda: len(self.hub.pending))
    if hasattr(self.loop.engine, "tokenizer"):
      self.hub.tokenizer = self.loop.engine.tokenizer  # the engine's, so streamed text matches its text

  def count_error(self, path: str, status: int, model: str = UNKNOWN) -> None:
    self.metrics.errors.labels(str(status)).inc()
    endpoint = ENDPOINTS.get(path)
    if endpoint is not None:
      outcome = OUTCOMES.get(status, "failed" if status >= 500 else "invalid")
      self.metrics.requests.labels(model, endpoint, outcome).inc()

  def label(self, model) -> str:
    return model if isinstance(model, str) and model in self.tenants.names else UNKNOWN

  async def answer(self, request: Request, endpoint: str, fields: dict, body: protocol._Common, fill: bool):
    aio = asyncio.get_running_loop()
    timeout = self.config.request_timeout_s
    deadline = aio.time() + timeout
    p = await self.hub.submit(endpoint, fields, deadline, fill)
    if body.stream:
      usage = body.stream_options is not None and body.stream_options.include_usage
      cfg = self.config
      return stream_response(self.hub, p, endpoint == "chat", usage, timeout, cfg)
    try:
      response = await wait_response(self.hub, p, request.receive, timeout)
    except ClientGone:
      return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    build = protocol.chat_body if endpoint == "chat" else protocol.completion_body
    return JSONResponse(build(p.rid, int(time.time()), response))

  def chat_fields(self, body: protocol.ChatCompletionRequest) -> dict:
    fields = protocol.engine_fields(body)
    model = body.model
    if self.label(model) == UNKNOWN:
      fields["prompt_ids"] = [0]  # never served: Engine.check refuses the model and names it
      return fields
    chat = self.chats.get(model)
    if chat is None:
      raise bad_request(
        f"model {model!r} has no chat template (no 'chat_template' in its tokenizer_config.json); "
        "use /v1/completions with a prompt",
        "model",
      )
    fields["prompt_ids"] = chat.prompt_ids(protocol.chat_messages(body.messages))
    return fields


def body_failure(exc: HTTPException) -> str | None:
  """What FastAPI's bare "error parsing the body" 400 was: json.loads raised other than a JSONDecodeError."""
  cause = exc.__cause__
  if isinstance(cause, UnicodeDecodeError):
    return f"the body is not valid UTF-8 ({cause.reason} at byte {cause.start})"
  if isinstance(cause, RecursionError):
    return "the body is not usable JSON: nested too deep"
  if isinstance(cause, ValueError):  # an integer literal beyond Python's digit limit
    return f"the body is not usable JSON: {str(cause).split(';')[0]}"
  return None


def _install_errors(app: FastAPI, server: Server) -> None:
  async def api_error(request: Request, exc: APIError):
    if not exc.counted:
      server.count_error(request.url.path, exc.status, getattr(request.state, "model", UNKNOWN))
    return exc.response()

  async def invalid_body(request: Request, exc: RequestValidationError):
    server.count_error(request.url.path, 400)
    return JSONResponse(error_body(400, validation_message(exc)), status_code=400)

  async def http_error(request: Request, exc: HTTPException):
    server.count_error(request.url.path, exc.status_code)
    message = body_failure(exc) or (exc.detail if isinstance(exc.detail, str) else str(exc.detail))
    if exc.status_code == 404:
      message = f"no route {request.method} {request.url.path}; see /docs"
    return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

  async def internal(request: Request, exc: Exception):
    log.exception("unhandled error on %s", request.url.path)
    server.count_error(request.url.path, 500)
    return JSONResponse(error_body(500, f"internal server error ({type(exc).__name__})"), status_code=500)

  app.add_exception_handler(APIError, api_error)
  app.add_exception_handler(RequestValidationError, invalid_body)
  app.add_exception_handler(HTTPException, http_error)
  app.add_exception_handler(Exception, internal)


def _install_routes(app: FastAPI, server: Server) -> None:
  @app.post("/v1/completions")
  async def completions(body: protocol.CompletionRequest, request: Request):
    request.state.model = server.label(body.model)
    protocol.check_completion(body)
    fields = {**protocol.engine_fields(body), **protocol.completion_prompt(body.prompt)}
    return await server.answer(request, "completions", fields, body, fill=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
    request.state.model = server.label(body.model)
    protocol.check_chat(body)
    fields = server.chat_fields(body)
    return await server.answer(request, "chat", fields, body, fill="max_tokens" not in fields)

  @app.get("/v1/models")
  async def models():
    return server.tenants.cards()

  @app.get("/v1/models/{model}")
  async def model(model: str):
    if model not in server.tenants.names:
      raise APIError(404, f"unknown model {model!r}; this store serves {server.tenants.names}", "model_not_found")
    return server.tenants.card(model)

  @app.get("/health")
  async def health():
    loop = server.loop
    body = {
      "status": "ok" if loop.alive else "engine stopped",
      "mode": server.tenants.mode.value,
      "tenants": server.tenants.names,
      "running": loop.stats.get("running"),
      "waiting": server.hub.waiting,
      "step_failures": loop.step_failures,
      "last_error": loop.last_error,
    }
    return JSONResponse(body, status_code=200 if loop.alive else 503)

  @app.get("/metrics")
  async def metrics():
    return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(store, engine_config, config: ServerConfig = ServerConfig(), make_engine=None) -> FastAPI:
  """The ASGI app serving `store` (the engine is built here; its thread starts with the app).

  Args:
    store: a loaded store (`jaxmoe.load_store`).
    engine_config: the `EngineConfig` of its engine.
    config: the server's limits and API key.
    make_engine: `on_token -> engine`, instead of `Engine(store, engine_config, on_token=...)`.
  """
  server = Server(store, engine_config, config, make_engine)

  @contextlib.asynccontextmanager
  async def lifespan(app):
    server.hub.bind(server.loop, asyncio.get_running_loop())
    server.loop.start()
    try:
      yield
    finally:
      server.loop.stop()

  app = FastAPI(title="jaxmoe", summary="OpenAI-compatible server over a jaxmoe store", lifespan=lifespan)
  app.state.server = server
  _install_errors(app, server)
  _install_routes(app, server)
  app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes, on_error=server.count_error)
  return app
