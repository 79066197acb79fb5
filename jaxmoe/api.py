"""`jaxmoe.load(path)`: a checkpoint -> its family's model object on the default device."""

from __future__ import annotations

import os

from jaxmoe.families import registry
from jaxmoe.io import checkpoint
from jaxmoe.io.tokenizer import load_tokenizer
from jaxmoe.nn.moe import Impl


def load(path: str | os.PathLike, impl: Impl = Impl.AUTO, routing=None, verify_checksums: bool = True):
  """Loads a jaxmoe checkpoint (from `jaxmoe-convert`) onto the default device.

  Returns the family's model object: `MixtralModel` (decoder-only `logits`,
  `generate`) or `SwitchModel` (encoder-decoder). `routing` applies to Switch
  only: "hf_capacity" (the default here: transformers' expert capacity, so a
  converted model gives HF's numbers) or "dropless" (every token reaches its
  expert; the serving engine's default). `verify_checksums` (default on)
  compares every part with the checksum recorded at write time and refuses
  non-finite weights; False skips that pass over the weights.
  """
  cfg, params = checkpoint.load(path, verify_checksums)
  cls = registry.of(cfg).model
  return cls(cls.config_for(cfg, routing), params, load_tokenizer(path, cfg), impl)
