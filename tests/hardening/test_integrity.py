"""No corrupt checkpoint or store served: checksums, headers checked against the data, no NaN written.

Every case checks the error is one line naming the file or tensor, and that a
destination that should not exist does not (nor a temporary).
"""

from __future__ import annotations

import json
import pathlib
import shutil
import warnings

import numpy as np
import orbax.checkpoint as ocp
import pytest

import jaxmoe
from jaxmoe.consolidate import ConsolidateConfig, ConsolidateError, consolidate
from jaxmoe.errors import CheckpointError, ConversionError, StoreError
from jaxmoe.families.mixtral import config, layout
from jaxmoe.io import checkpoint, integrity
from jaxmoe.io.convert import convert
from tests.helpers import LEGACY, recorded_close
from tests.io.test_convert import hf_config, hf_tensors, write_hf

CFG = config.preset("tiny")
TOKENS = np.load(LEGACY / "tokens.npy")
OUTPUTS = dict(np.load(LEGACY / "outputs.npz"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  root = tmp_path_factory.mktemp("ckpts")
  for i, name in enumerate(("a", "b")):
    checkpoint.save(root / name, CFG, layout.init_params(CFG, seed=i))
  return root


def copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(src, dst)
  return dst


def flip_bytes(folder: pathlib.Path, n: int = 64) -> None:
  """Flips n bytes in the middle of the biggest file of an orbax part: array data, not its index."""
  biggest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  data = bytearray(biggest.read_bytes())
  mid = len(data) // 2
  for i in range(n):
    data[mid + 7 * i] ^= 0xA5
  biggest.write_bytes(bytes(data))


def edit_header(path: pathlib.Path, edit, name: str = checkpoint.HEADER) -> None:
  header = json.loads((path / name).read_text())
  edit(header)
  (path / name).write_text(json.dumps(header))


def one_line(e) -> str:
  text = str(e.value)
  assert "\n" not in text and len(text) < 600, text
  return text


def test_every_part_has_a_checksum(ckpts):
  header = json.loads((ckpts / "a" / checkpoint.HEADER).read_text())
  assert sorted(header["checksums"]) == ["globals", "layer_0000", "layer_0001"]
  assert all(v.startswith("sha256:") for v in header["checksums"].values())


def test_flipped_bytes_are_refused_unless_the_check_is_skipped(ckpts, tmp_path):
  bad = copy(ckpts / "a", tmp_path / "bad")
  flip_bytes(bad / "params" / "layer_0001")
  with pytest.raises(CheckpointError, match="checksum mismatch") as e:
    jaxmoe.load(bad)
  assert "params/layer_0001" in one_line(e) and "verify_checksums=False" in one_line(e)
  cfg, _ = checkpoint.load(bad, verify_checksums=False)  # the opt-out reads it as it is
  assert cfg == CFG


def test_a_header_dtype_over_other_data_is_refused_not_cast(ckpts, tmp_path):
  bad = copy(ckpts / "a", tmp_path / "bad")
  edit_header(bad, lambda h: h["config"].update(dtype="bfloat16"))
  with pytest.raises(CheckpointError, match=r"is float32\[259, 64\] on disk, the header says bfloat16") as e:
    checkpoint.load(bad)
  assert "params/globals" in one_line(e)


def _garbage(name: str, src: pathlib.Path, root: pathlib.Path) -> tuple[pathlib.Path, str]:
  """A copy of checkpoint `src` damaged one way; returns (folder, the file the error must name)."""
  bad = copy(src, root / f"bad_{name}")
  cases = {
    "header_not_json": lambda: (bad / checkpoint.HEADER).write_text("{garbage"),
    "header_list": lambda: (bad / checkpoint.HEADER).write_text("[1, 2]"),
    "header_deep": lambda: (bad / checkpoint.HEADER).write_text("[" * 100_000),
    "format_2": lambda: edit_header(bad, lambda h: h.update(format=2)),
    "heads_string": lambda: edit_header(bad, lambda h: h["config"].update(num_heads="4")),
    "kv_heads_zero": lambda: edit_header(bad, lambda h: h["config"].update(num_kv_heads=0)),
    "dtype_unknown": lambda: edit_header(bad, lambda h: h["config"].update(dtype="float8")),
    "unknown_config_key": lambda: edit_header(bad, lambda h: h["config"].update(colour="red")),
    "slot_map_garbage": lambda: edit_header(bad, lambda h: h.update(slot_map="x")),
    "slot_map_outside": lambda: edit_header(bad, lambda h: h["slot_map"][0].__setitem__(0, 99)),
    "slots_zero": lambda: edit_header(bad, lambda h: h.update(slots_per_layer=[0, 4])),
    "checksum_missing": lambda: edit_header(bad, lambda h: h["checksums"].pop("layer_0000")),
    "metadata_garbage": lambda: (bad / "params" / "layer_0000" / "_METADATA").write_text("garbage{"),
    "metadata_missing": lambda: (bad / "params" / "layer_0000" / "_METADATA").unlink(),
    "part_missing": lambda: shutil.rmtree(bad / "params" / "layer_0001"),
    "manifest_garbage": lambda: (bad / "params" / "globals" / "manifest.ocdbt").write_bytes(b"xx"),
  }
  cases[name]()
  if name.startswith(("metadata", "part")):
    return bad, str(bad / "params" / ("layer_0001" if name == "part_missing" else "layer_0000"))
  if name == "manifest_garbage":
    return bad, str(bad / "params" / "globals")
  return bad, str(bad / checkpoint.HEADER)


GARBAGE = [
  "header_not_json",
  "header_list",
  "header_deep",
  "format_2",
  "heads_string",
  "kv_heads_zero",
  "dtype_unknown",
  "unknown_config_key",
  "slot_map_garbage",
  "slot_map_outside",
  "slots_zero",
  "checksum_missing",
  "metadata_garbage",
  "metadata_missing",
  "part_missing",
  "manifest_garbage",
]


@pytest.mark.parametrize("name", GARBAGE)
def test_a_damaged_checkpoint_is_one_error_naming_the_file(ckpts, tmp_path, name):
  bad, named = _garbage(name, ckpts / "a", tmp_path)
  with pytest.raises(CheckpointError) as e:
    jaxmoe.load(bad)
  assert named in one_line(e)


@pytest.mark.parametrize("name", ["header_not_json", "heads_string", "metadata_garbage", "part_missing"])
def test_a_damaged_tenant_is_refused_by_consolidation_naming_it(ckpts, tmp_path, name):
  bad, named = _garbage(name, ckpts / "b", tmp_path)
  out = tmp_path / "store"
  with pytest.raises(ConsolidateError) as e:
    consolidate([("a", ckpts / "a"), ("bad", bad)], out, ConsolidateConfig(share_fraction=0.5))
  assert "tenant 'bad'" in one_line(e) and named in one_line(e)
  assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_non_finite_weights_are_never_written(tmp_path):
  params = layout.init_params(CFG, seed=0)
  params["experts"]["w2"][5, 3, 1] = np.nan
  with pytest.raises(CheckpointError, match=r"params/layer_0001: experts/w2 holds NaN or infinite values"):
    checkpoint.save(tmp_path / "nan", CFG, params)
  assert list(tmp_path.iterdir()) == []


def _unverified_nan_tenant(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  """A tenant as old code could write it: no checksums, and a NaN in layer 1's experts."""
  bad = copy(src, dst)
  with checkpoint.reader(bad) as r:
    tree = r.read_part("layer_0001")
  tree["experts"]["w1"][2, 0, 0] = np.inf
  shutil.rmtree(bad / "params" / "layer_0001")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(bad / "params" / "layer_0001", tree)
  edit_header(bad, lambda h: h.pop("checksums"))
  return bad


def test_consolidation_refuses_non_finite_tenants_and_never_writes_nan(ckpts, tmp_path):
  bad = _unverified_nan_tenant(ckpts / "b", tmp_path / "bad")
  out = tmp_path / "store"
  pairs = [("a", ckpts / "a"), ("bad", bad)]
  with pytest.warns(integrity.UnverifiedWarning), pytest.raises(ConsolidateError) as e:
    consolidate(pairs, out, ConsolidateConfig(share_fraction=0.5))
  assert "tenant 'bad'" in one_line(e) and "layer_0001: experts/w1 holds NaN or infinite values" in one_line(e)
  with pytest.raises(StoreError, match=r"layer_0001.* holds NaN or infinite values"):  # unverified: the writer
    consolidate(pairs, out, ConsolidateConfig(share_fraction=0.5), verify_checksums=False)
  assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad"]


def test_a_damaged_store_is_refused_unless_the_check_is_skipped(ckpts, tmp_path):
  out = tmp_path / "store"
  consolidate([("a", ckpts / "a"), ("b", ckpts / "b")], out, ConsolidateConfig(share_fraction=0.5))
  header = json.loads((out / "store.json").read_text(), parse_constant=pytest.fail)  # strict JSON
  assert "pool/layer_0000" in header["checksums"] and "backbones/b/globals" in header["checksums"]
  flip_bytes(out / "pool" / "layer_0001")
  with pytest.raises(StoreError, match="checksum mismatch") as e:
    jaxmoe.load_store(out)
  assert "pool/layer_0001" in one_line(e)
  with pytest.raises(StoreError, match="checksum mismatch") as e:  # a pool read lazily is verified at load too
    jaxmoe.load_store(out, host_cache_gb=0.01)
  assert "pool/layer_0001" in one_line(e)
  assert jaxmoe.load_store(out, verify_checksums=False).tenants == ["a", "b"]
  assert jaxmoe.load_store(out, verify_checksums=False, host_cache_gb=0.01).host_pool is not None
  (out / "store.json").write_text('{"kind": "jaxmoe-store", "format": 1, "config": {"num_heads": "x"}}')
  with pytest.raises(StoreError) as e:
    jaxmoe.load_store(out)
  assert str(out / "store.json") in one_line(e)


def test_legacy_files_warn_once_and_load_unchanged():
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = jaxmoe.load(LEGACY / "mixtral_a")
    store = jaxmoe.load_store(LEGACY / "mixtral_store")
  unverified = [w for w in caught if issubclass(w.category, integrity.UnverifiedWarning)]
  assert len(unverified) == 2, [str(w.message) for w in caught]
  assert "mixtral_a" in str(unverified[0].message) and "mixtral_store" in str(unverified[1].message)
  assert all("\n" not in str(w.message) for w in unverified)
  recorded_close(model.logits(TOKENS), OUTPUTS["mixtral_a/logits"])
  recorded_close(store.model("a").logits(TOKENS), OUTPUTS["store_a/logits"])


def test_conversion_refuses_non_finite_sources_naming_the_tensor(tmp_path):
  hf = hf_config()
  tensors = hf_tensors(hf)
  tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"][4, 4] = np.nan
  src = write_hf(tmp_path / "hf", tensors, hf)
  with pytest.raises(ConversionError, match=r"'model.layers.1.block_sparse_moe.experts.2.w3.weight' holds NaN"):
    convert(src, tmp_path / "out", progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the overflow is the point
def test_conversion_refuses_a_cast_that_overflows(tmp_path):
  hf = hf_config()
  tensors = hf_tensors(hf)
  tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = 1e30  # finite in float32, inf in float16
  src = write_hf(tmp_path / "hf", tensors, hf)
  with pytest.raises(CheckpointError, match=r"params/layer_0000: backbone/q holds NaN or infinite values"):
    convert(src, tmp_path / "out", dtype="float16", progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
