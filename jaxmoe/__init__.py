"""jaxmoe: serve many fine-tuned Mixture-of-Experts LLMs from one accelerator."""

from jaxmoe.api import Model, load
from jaxmoe.config import MixtralConfig
from jaxmoe.store import load_store

__all__ = ["Model", "MixtralConfig", "load", "load_store"]
__version__ = "0.1.0"
