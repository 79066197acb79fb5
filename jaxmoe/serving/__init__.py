"""Multi-tenant serving: requests, the continuous-batching engine, tenant weight modes."""

from jaxmoe.errors import RequestError
from jaxmoe.serving.config import EngineConfig
from jaxmoe.serving.engine import Engine, Mode
from jaxmoe.serving.requests import Request

__all__ = ["Engine", "EngineConfig", "Mode", "Request", "RequestError"]
