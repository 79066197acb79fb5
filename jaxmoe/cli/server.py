"""jaxmoe-server: an OpenAI-compatible HTTP server over a consolidated store.

  jaxmoe-server --store=STORE --mode=mixed --max_batch=8 [--host=127.0.0.1] [--port=8000] [--api_key=KEY]

`model` in a request names the tenant. Endpoints: /v1/completions,
/v1/chat/completions, /v1/models, /health, /metrics (README: "HTTP server").
The engine flags are jaxmoe-serve's, with the same names. Exit code 2 when the
store cannot be read, the flags do not fit the model, or the port cannot be
bound.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from jaxmoe.cli.common import define_engine_flags, engine_config, load_store, one_line_warnings, quiet_library_logs

FLAGS = flags.FLAGS
flags.DEFINE_string("store", None, "Store folder from jaxmoe-consolidate.")
define_engine_flags()
flags.DEFINE_string("host", "127.0.0.1", "Address to bind; the default answers this machine only.")
flags.DEFINE_integer("port", 8000, "Port to bind (0: a free one, printed at start).")
flags.DEFINE_string(
  "api_key",
  None,
  "Bearer key required on /v1/* (default: $JAXMOE_API_KEY if set, else none; /health, /metrics stay open).",
)
flags.DEFINE_integer("max_waiting", 128, "Accepted requests not yet generating; beyond it requests get 429.")
flags.DEFINE_float("request_timeout_s", 300.0, "Arrival to last token; a request past it gets 504 and is dropped.")
flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body; larger ones get 413.")
flags.DEFINE_float(
  "stream_interval_s",
  0.0,
  "0: a streamed event per engine step; > 0: after the first, at most one event per interval "
  "with the tokens of the steps between (less CPU per token when steps are short).",
)
flags.DEFINE_enum("log_level", "warning", ["critical", "error", "warning", "info", "debug"], "uvicorn's log level.")


def fatal(message: str) -> int:
  print(f"jaxmoe-server: fatal: {message}", file=sys.stderr)
  return 2


def main(argv) -> int:
  del argv
  quiet_library_logs()
  one_line_warnings("jaxmoe-server")
  from jaxmoe.cli import mesh_flags
  from jaxmoe.server import ServerConfig, create_app
  from jaxmoe.server.run import bind, uvicorn_config
  from jaxmoe.serving import Engine, distributed

  several_hosts = mesh_flags.start_distributed()  # before anything touches a device

  try:
    store = load_store(FLAGS.store)
  except (OSError, ValueError) as e:
    return fatal(f"cannot read --store: {e}")
  settings = engine_config(store)
  if several_hosts and not distributed.is_leader():  # no HTTP here: run process 0's steps on these devices
    distributed.follow(Engine(store, settings))
    return 0
  engines = []

  def make_engine(on_token):
    engines.append(distributed.lead(Engine(store, settings, on_token=on_token)))
    return engines[-1]

  try:
    config = ServerConfig(
      api_key=FLAGS.api_key or os.environ.get("JAXMOE_API_KEY") or None,
      max_waiting=FLAGS.max_waiting,
      request_timeout_s=FLAGS.request_timeout_s,
      max_body_bytes=FLAGS.max_body_bytes,
      stream_interval_s=FLAGS.stream_interval_s,
    )
    asgi = create_app(store, settings, config, make_engine)
  except ValueError as e:
    return fatal(str(e))
  try:
    sock = bind(FLAGS.host, FLAGS.port)
  except OSError as e:
    return fatal(f"cannot bind {FLAGS.host}:{FLAGS.port}: {e}")
  import uvicorn

  host, port = sock.getsockname()[:2]
  try:  # from the announcement on: a SIGINT right after it (a supervisor that read it) is a clean stop
    print(
      f"jaxmoe-server: {len(store.tenants)} tenants ({', '.join(store.tenants)}), mode {FLAGS.mode}, "
      f"listening on http://{host}:{port}",
      flush=True,
    )
    # The engine thread and the event loop share the GIL: a 1 ms switch interval (default 5 ms) lets
    # the engine thread take it back soon after each device call returns, so steps are not delayed.
    sys.setswitchinterval(0.001)
    uvicorn.Server(uvicorn_config(asgi, FLAGS.host, port, FLAGS.log_level)).run(sockets=[sock])
  except KeyboardInterrupt:  # a SIGINT before uvicorn took the signals, or the one it re-raised after a graceful stop
    pass
  finally:
    for engine in engines:  # the followers' loops end with process 0's
      distributed.stop(engine)
  return 0


def run():
  flags.mark_flags_as_required(["store"])
  app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
  run()
