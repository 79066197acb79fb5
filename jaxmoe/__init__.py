"""jaxmoe: serve many fine-tuned Mixture-of-Experts LLMs from one accelerator."""

from jaxmoe.api import Model, load
from jaxmoe.config import MixtralConfig
from jaxmoe.store import load_store
from jaxmoe.switch_api import SwitchModel
from jaxmoe.switch_config import SwitchConfig

__all__ = ["Model", "MixtralConfig", "SwitchConfig", "SwitchModel", "load", "load_store"]
__version__ = "0.1.0"
