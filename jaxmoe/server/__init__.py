"""The OpenAI-compatible HTTP server over the serving engine (`jaxmoe-server`).

`create_app(store, engine_config, ServerConfig(...))` is the ASGI app;
`run.serve_in_thread` starts it on a loopback port (tests, benchmarks).
"""

from jaxmoe.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
