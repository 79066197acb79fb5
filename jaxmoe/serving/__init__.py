"""Multi-tenant serving: requests, the continuous-batching engine, tenant weight modes."""

from jaxmoe.serving.engine import Engine, EngineConfig, Mode
from jaxmoe.serving.requests import Request, RequestError

__all__ = ["Engine", "EngineConfig", "Mode", "Request", "RequestError"]
