"""Running the app under uvicorn: in the foreground (the CLI) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import uvicorn


def uvicorn_config(app, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
  return uvicorn.Config(
    app,
    host=host,
    port=port,
    log_level=log_level,
    access_log=False,  # one log line per request costs throughput; /metrics counts them
    proxy_headers=False,  # no proxy in front by default: one middleware layer less on every send
    timeout_keep_alive=30,
    timeout_graceful_shutdown=10,
  )


def bind(host: str, port: int) -> socket.socket:
  """A listening socket; port 0 picks a free one (read it back with `getsockname`)."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(2048)
  sock.setblocking(False)
  return sock


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 120.0) -> Iterator[str]:
  """Serves `app` from a background thread for the duration of the block; yields its base URL."""
  sock = bind(host, port)
  server = uvicorn.Server(uvicorn_config(app, host, port))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
  thread.start()
  start = time.monotonic()
  while not server.started:
    if not thread.is_alive() or time.monotonic() - start > timeout_s:
      raise RuntimeError("the server did not start")
    time.sleep(0.02)
  try:
    yield f"http://{host}:{sock.getsockname()[1]}"
  finally:
    server.should_exit = True
    thread.join(timeout_s)
    sock.close()
