"""Mixtral (decoder-only, top-k SwiGLU experts)."""

from jaxmoe.families.base import Family
from jaxmoe.families.mixtral import layout, model
from jaxmoe.families.mixtral.api import MixtralModel
from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.families.mixtral.convert import hf_parts
from jaxmoe.families.mixtral.engine import DecoderOnly

FAMILY = Family(
  name="mixtral",
  hf_model_types=("mixtral",),
  config=MixtralConfig,
  layout=layout,
  model=MixtralModel,
  engine=DecoderOnly(),
  hf_parts=hf_parts,
  calibration_step=model.layer_step,
)

__all__ = ["FAMILY", "MixtralConfig", "MixtralModel"]
