"""jaxmoe: serve many fine-tuned Mixture-of-Experts LLMs from one accelerator."""

from jaxmoe.api import load
from jaxmoe.families.mixtral import MixtralConfig, MixtralModel
from jaxmoe.families.switch import SwitchConfig, SwitchModel
from jaxmoe.generation import Model
from jaxmoe.io.store import load_store

__all__ = ["MixtralConfig", "MixtralModel", "Model", "SwitchConfig", "SwitchModel", "load", "load_store"]
__version__ = "0.2.0"
