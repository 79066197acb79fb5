"""config.json and generation_config.json: typed keys with one-line errors, every EOS id kept and honoured."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import jaxmoe
from jaxmoe.errors import ConfigError, ConversionError
from jaxmoe.families.mixtral import MixtralModel, config, layout
from jaxmoe.families.mixtral.config import MixtralConfig
from jaxmoe.families.switch import SwitchModel
from jaxmoe.families.switch import config as switch_config
from jaxmoe.families.switch import layout as switch_layout
from jaxmoe.families.switch.config import SwitchConfig
from jaxmoe.generation import check_sampling
from jaxmoe.io import checkpoint
from jaxmoe.io.convert import convert
from tests.io.test_convert import hf_config, hf_tensors, write_hf

BAD_MIXTRAL = {
  "heads_string": ({"num_attention_heads": "4"}, "num_attention_heads='4' must be an integer"),
  "heads_zero": ({"num_attention_heads": 0}, "num_attention_heads=0 must be >= 1"),
  "heads_float": ({"num_attention_heads": 4.0}, "num_attention_heads=4.0 must be an integer"),
  "heads_bool": ({"num_attention_heads": True}, "num_attention_heads=True must be an integer"),
  "kv_heads_zero": ({"num_key_value_heads": 0}, "num_key_value_heads=0 must be >= 1"),
  "hidden_negative": ({"hidden_size": -16}, "hidden_size=-16 must be >= 1"),
  "rope_theta_string": ({"rope_parameters": None, "rope_theta": "abc"}, "rope_theta='abc' must be a finite number"),
  "rope_theta_nan": ({"rope_parameters": {"rope_theta": float("nan")}}, "rope_theta=nan must be a finite number"),
  "rope_theta_zero": ({"rope_parameters": None, "rope_theta": 0}, "rope_theta=0 must be > 0"),
  "rope_parameters_string": ({"rope_parameters": "yarn"}, "rope_parameters='yarn' must be an object"),
  "rms_eps_string": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps='1e-5' must be a finite number"),
  "sliding_window_string": ({"sliding_window": "4096"}, "sliding_window='4096' must be an integer"),
  "max_positions_zero": ({"max_position_embeddings": 0}, "max_position_embeddings=0 must be >= 1"),
  "tie_string": ({"tie_word_embeddings": "false"}, "tie_word_embeddings='false' must be true or false"),
  "eos_string": ({"eos_token_id": "2"}, "eos_token_id='2' must be an integer or a list of integers"),
  "eos_list_of_strings": ({"eos_token_id": ["2"]}, "eos_token_id=['2'] must be an integer or a list"),
  "bos_list": ({"bos_token_id": [1, 2]}, "bos_token_id=[1, 2] must be an integer"),
  "hidden_act_gelu": ({"hidden_act": "gelu"}, "hidden_act='gelu' unsupported"),
  "experts_per_tok_too_many": ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 must be in [1, num_local_experts=3]"),
  "missing_vocab": ({"vocab_size": None}, "missing required key 'vocab_size'"),
}


@pytest.mark.parametrize("name", sorted(BAD_MIXTRAL))
def test_bad_mixtral_keys_are_named(name):
  changes, fragment = BAD_MIXTRAL[name]
  hf = hf_config()
  hf.update(changes)
  hf = {k: v for k, v in hf.items() if v is not None}
  with pytest.raises(ConfigError) as e:
    MixtralConfig.from_hf(hf)
  assert fragment in str(e.value) and "\n" not in str(e.value)


def test_swish_is_silu():
  assert MixtralConfig.from_hf(hf_config(hidden_act="swish")) == MixtralConfig.from_hf(hf_config())


@pytest.mark.parametrize(
  "config_eos, generation, want",
  [
    (2, None, (2,)),
    ([2, 6], None, (2, 6)),
    (2, {"eos_token_id": [2, 6]}, (2, 6)),  # generation_config.json first, as transformers' generate
    ([2, 6], {"eos_token_id": 7}, (7,)),
    (2, {"max_new_tokens": 5}, (2,)),  # a generation config without EOS: config.json's
    ([], None, ()),
    (None, None, ()),
  ],
)
def test_every_eos_id_is_kept(config_eos, generation, want):
  cfg = MixtralConfig.from_hf(hf_config(eos_token_id=config_eos) | {"eos_token_id": config_eos}, generation=generation)
  assert cfg.eos_ids == want
  assert MixtralConfig.from_json(cfg.to_json()) == cfg  # hashable, and round-trips through a header
  hash(cfg)


def test_a_legacy_int_eos_stays_an_int():
  cfg = MixtralConfig.from_json(config.preset("tiny").to_json())
  assert cfg.eos_token_id == 257 and isinstance(cfg.eos_token_id, int) and cfg.eos_ids == (257,)


def test_generate_stops_on_any_eos_id():
  cfg = config.preset("tiny")  # the suite's tiny model: its programs are compiled once for every test
  params = layout.init_params(cfg, seed=4, scale=0.3)
  prompt = np.array([[256, 10, 20, 30]])
  new = MixtralModel(cfg, params).generate(prompt, 10, stop_at_eos=False)[0, 4:].tolist()
  stop = new[3]
  first = new.index(stop)  # the first time the second EOS id appears
  stopped = MixtralModel(cfg.replace(eos_token_id=(cfg.eos_token_id, stop)), params).generate(prompt, 10)
  assert 257 not in new[: first + 1] and stopped[0, 4:].tolist() == new[: first + 1]


def test_switch_generate_stops_on_any_eos_id():
  cfg = switch_config.preset("tiny-switch")
  params = switch_layout.init_params(cfg, seed=2, scale=0.3)
  enc = np.array([[5, 6, 7, 8]])
  new = SwitchModel(cfg, params).generate(enc, 8, stop_at_eos=False)[0, 1:].tolist()
  stop = new[2]
  first = new.index(stop)
  got = SwitchModel(cfg.replace(eos_token_id=(cfg.eos_token_id, stop)), params).generate(enc, 8)[0, 1:].tolist()
  assert 257 not in new[: first + 1] and got == new[: first + 1]


def switch_hf(**changes) -> dict:
  hf = {"model_type": "switch_transformers", "vocab_size": 50, "d_model": 16, "d_kv": 4, "d_ff": 24}
  hf.update(num_layers=2, num_heads=4, num_experts=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  hf.update(changes)
  return {k: v for k, v in hf.items() if v is not None}


def test_switch_without_a_start_token_is_refused_as_transformers_refuses():
  with pytest.raises(ConfigError, match="no decoder_start_token_id nor bos_token_id"):
    SwitchConfig.from_hf(switch_hf(decoder_start_token_id=None))
  assert SwitchConfig.from_hf(switch_hf(decoder_start_token_id=None, bos_token_id=3)).decoder_start_token_id == 3
  gen = {"decoder_start_token_id": 5, "eos_token_id": [1, 7]}
  cfg = SwitchConfig.from_hf(switch_hf(decoder_start_token_id=None), generation=gen)
  assert (cfg.decoder_start_token_id, cfg.eos_ids) == (5, (1, 7))
  assert SwitchConfig.from_hf(switch_hf(eos_token_id=None) | {"eos_token_id": None}).eos_ids == ()


@pytest.mark.parametrize(
  "changes, fragment",
  [
    ({"d_model": "16"}, "d_model='16' must be an integer"),
    ({"num_heads": 0}, "num_heads=0 must be >= 1"),
    ({"expert_capacity": "64"}, "expert_capacity='64' must be an integer"),
    ({"expert_capacity": 2.5}, "expert_capacity=2.5 must be an integer"),
    ({"layer_norm_epsilon": "x"}, "layer_norm_epsilon='x' must be a finite number"),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings=1 must be true or false"),
    ({"num_decoder_layers": 0}, "num_decoder_layers=0 must be >= 1"),
    ({"encoder_sparse_step": -1}, "encoder_sparse_step=-1 must be >= 0"),
  ],
)
def test_bad_switch_keys_are_named(changes, fragment):
  with pytest.raises(ConfigError) as e:
    SwitchConfig.from_hf(switch_hf(**changes))
  assert fragment in str(e.value)


def test_conversion_keeps_generation_config_and_its_eos_ids(tmp_path):
  hf = hf_config()
  src = write_hf(tmp_path / "hf", hf_tensors(hf), hf)
  (src / "tokenizer.json").unlink()  # write_hf's stub is not a real tokenizer
  (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 6], "bos_token_id": 1}))
  cfg = convert(src, tmp_path / "out", progress=False)
  assert cfg.eos_ids == (2, 6)
  assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [2, 6]
  assert jaxmoe.load(tmp_path / "out").config.eos_ids == (2, 6)
  assert checkpoint.read_header(tmp_path / "out")["config"].eos_token_id == (2, 6)


@pytest.mark.parametrize(
  "name, fragment",
  [
    ("weight_map_list", "'weight_map' must be an object"),
    ("weight_map_missing", "'weight_map' must be an object"),
    ("generation_config_garbage", "generation_config.json: not valid JSON"),
    ("heads_string", "num_attention_heads='4' must be an integer"),
    ("config_deep", "config.json: not usable JSON"),
  ],
)
def test_conversion_errors_write_nothing(tmp_path, name, fragment):
  """Each refused before anything is written: no output, no temporary."""
  hf = hf_config(num_attention_heads="4") if name == "heads_string" else hf_config()
  tensors = hf_tensors(hf_config())
  src = write_hf(tmp_path / "hf", tensors, hf, shards=2 if name.startswith("weight_map") else 1)
  index = src / "model.safetensors.index.json"
  if name == "weight_map_list":
    index.write_text(json.dumps({"weight_map": sorted(tensors)}))
  elif name == "weight_map_missing":
    index.write_text("{}")
  elif name == "generation_config_garbage":
    (src / "generation_config.json").write_text("{")
  elif name == "config_deep":
    (src / "config.json").write_text("[" * 100_000)
  with pytest.raises((ConversionError, ConfigError)) as e:
    convert(src, tmp_path / "out", progress=False)
  assert fragment in str(e.value) and "\n" not in str(e.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_a_damaged_tokenizer_is_one_error_naming_it(tmp_path):
  cfg = config.preset("tiny")
  checkpoint.save(tmp_path / "c", cfg, layout.init_params(cfg))
  (tmp_path / "c" / "tokenizer.json").write_text('{"model": "stub"}')
  with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer"):
    jaxmoe.load(tmp_path / "c")


@pytest.mark.parametrize(
  "args, fragment",
  [
    ((0, 0.0, 1.0, 0), "max_new_tokens=0 must be an integer >= 1"),
    ((4, float("nan"), 1.0, 0), "temperature=nan must be a finite number"),
    ((4, float("inf"), 1.0, 0), "temperature=inf must be a finite number"),
    ((4, -1.0, 1.0, 0), "temperature=-1.0 must be a finite number >= 0"),
    ((4, 0.5, 0.0, 0), "top_p=0.0 must be in (0, 1]"),
    ((4, 0.5, float("nan"), 0), "top_p=nan must be in (0, 1]"),
    ((4, 0.5, 1.0, -1), "seed=-1 must be an integer in [0, 2^31)"),
    ((4, 0.5, 1.0, 2**31), "seed=2147483648 must be an integer in [0, 2^31)"),
    ((4, 0.5, 1.0, 1.5), "seed=1.5 must be an integer"),
  ],
)
def test_generate_refuses_sampling_it_cannot_honour(args, fragment):
  with pytest.raises(ValueError, match=re.escape(fragment)):
    check_sampling(*args)
