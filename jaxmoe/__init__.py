"""jaxmoe: serve many fine-tuned Mixture-of-Experts LLMs from one accelerator."""

from jaxmoe.api import Model, load
from jaxmoe.config import MixtralConfig

__all__ = ["Model", "MixtralConfig", "load"]
__version__ = "0.1.0"
