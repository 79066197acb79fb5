"""Switch Transformer (T5-style encoder-decoder, top-1 ReLU experts)."""

from jaxmoe.families.base import Family
from jaxmoe.families.switch import layout
from jaxmoe.families.switch.api import SwitchModel
from jaxmoe.families.switch.config import SwitchConfig
from jaxmoe.families.switch.convert import hf_parts
from jaxmoe.families.switch.engine import EncoderDecoder

FAMILY = Family(
  name="switch",
  hf_model_types=("switch_transformers",),
  config=SwitchConfig,
  layout=layout,
  model=SwitchModel,
  engine=EncoderDecoder(),
  hf_parts=hf_parts,
)

__all__ = ["FAMILY", "SwitchConfig", "SwitchModel"]
