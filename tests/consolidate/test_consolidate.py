"""jaxmoe-consolidate: tiny tenants with known identical and perturbed experts.

Tenants t0..t3 share one random base. At each position (layer, expert) the
tenants t1.. add noise of a known relative size to t0's expert (AMOUNT); 0
means identical in every tenant, and at (0, 1) only t3 differs, so with K = 4
three tenants share and the fourth keeps its own copy. Routers and attention
differ a little per tenant.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxmoe
from jaxmoe.consolidate import ConsolidateConfig, ConsolidateError, Metric, Owner, calibrate, consolidate, report
from jaxmoe.consolidate import select as select_lib
from jaxmoe.families.mixtral import config, layout
from jaxmoe.families.mixtral import model as mixtral
from jaxmoe.io import checkpoint
from jaxmoe.io.store import expert_bytes
from jaxmoe.nn.moe import Impl
from tests.helpers import REPO

CFG = config.preset("tiny")  # L=2, E=4, D=64, F=128
EB = expert_bytes(CFG)
NAMES = ("t0", "t1", "t2", "t3")
# Relative noise added to t0's expert by tenants t1.. at (layer, expert); (0, 1): only t3.
AMOUNT = {(0, 0): 0.0, (0, 1): 1.0, (0, 2): 0.01, (0, 3): 0.3, (1, 0): 0.0, (1, 1): 0.03, (1, 2): 0.1, (1, 3): 1.0}
IDENTICAL_JOINS = {3: 2 * 2 + 2, 4: 3 * 2 + 2}  # (0,0), (1,0) fully; (0,1) among t0..t2
TEXT = "The quick brown fox jumps over the lazy dog. " * 6
TOKENS = np.random.default_rng(7).integers(0, 256, size=(2, 12)).astype(np.int32)


def make_tenant(base, t: int):
  p = jax.tree.map(np.array, base)
  rng = np.random.default_rng(100 + t)
  for (l, e), amount in AMOUNT.items():
    if t == 0 or amount == 0.0 or ((l, e) == (0, 1) and t < 3):
      continue
    for n in ("w1", "w3", "w2"):
      w = p["experts"][n]
      w[l * CFG.num_experts + e] += (amount * 0.02 * rng.standard_normal(w.shape[1:])).astype(w.dtype)
  for i in range(CFG.num_layers):
    layer = p["backbone"]["layers"]
    for n in ("router", "q", "o"):
      layer[n][i] += (2e-3 * rng.standard_normal(layer[n].shape[1:])).astype(layer[n].dtype)
  return p


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
  """name -> checkpoint folder of tenants t0..t3."""
  root = tmp_path_factory.mktemp("tenants")
  base = layout.init_params(CFG, seed=0)
  out = {}
  for t, name in enumerate(NAMES):
    out[name] = root / name
    checkpoint.save(out[name], CFG, make_tenant(base, t))
  return out


@pytest.fixture(scope="module")
def originals(ckpts):
  """name -> logits of the tenant's own checkpoint on TOKENS."""
  return {name: jaxmoe.load(path).logits(TOKENS) for name, path in ckpts.items()}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
  """A folder for stores, and a cache so tests reuse one consolidation."""
  return {"root": tmp_path_factory.mktemp("stores")}


def tenants(ckpts, k: int):
  return [(name, ckpts[name]) for name in NAMES[:k]]


def build(stores, ckpts, k: int, key: str, **kw):
  """Consolidates t0..t{k-1} once per key; returns (store.json dict, loaded Store)."""
  if key not in stores:
    out = stores["root"] / key
    header = consolidate(tenants(ckpts, k), out, ConsolidateConfig(**kw))
    stores[key] = header, jaxmoe.load_store(out)
  return stores[key]


def full_budget(k: int) -> float:
  return k * CFG.num_layers * CFG.num_experts * EB / 1e9


def pool_nbytes(store) -> int:
  return sum(int(a.nbytes) for a in store.pool.values())


def pool_slot(store, name: str, l: int, s: int):
  """Slot s of MoE layer l's pool (as the store lists it) of leaf `name`."""
  return store.pool[name][sum(store.slots_per_layer[:l]) + s]


def expert(params, name: str, l: int, e: int):
  """Logical expert e of layer l of a plain model."""
  return params["experts"][name][l * CFG.num_experts + e]


def log_softmax(x):
  x = np.asarray(x, np.float64)  # numpy: jax would compute in float32
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def mean_kl(p_logits, q_logits) -> float:
  """Mean over positions of KL(p || q) between next-token distributions."""
  lp, lq = log_softmax(p_logits), log_softmax(q_logits)
  return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))


def groups_at(header, l: int, e: int) -> list[list[str]]:
  pos = next(p for p in header["positions"] if (p["layer"], p["expert"]) == (l, e))
  return [g["tenants"] for g in pos["groups"]]


# ---------------------------------------------------------------- acceptance


@pytest.mark.parametrize("k", [3, 4])
def test_budget_that_fits_everything_is_bit_identical(ckpts, originals, stores, k):
  header, store = build(stores, ckpts, k, f"full{k}", budget_gb=full_budget(k))
  sel = header["selection"]
  assert sel["joins_applied"] == sel["joins_identical"] == IDENTICAL_JOINS[k]
  assert sel["unique_experts"] == k * 8 - IDENTICAL_JOINS[k]
  for p in header["positions"]:
    for g in p["groups"]:
      assert len(g["tenants"]) == 1 or g["identical"], p
  for name, path in tenants(ckpts, k):
    # Every tenant reaches exactly its own weights through the shared pool ...
    own = checkpoint.load(path)[1]
    jax.tree.map(np.testing.assert_array_equal, store.export_params(name), own)
    got = jaxmoe.MixtralModel(CFG, store.export_params(name)).logits(TOKENS)
    np.testing.assert_array_equal(got, originals[name], err_msg=name)
    # ... and the model over the shared pool, on the default MoE path, gives the same bits.
    np.testing.assert_array_equal(store.model(name).logits(TOKENS), originals[name], err_msg=name)
  want = [["t0", "t1", "t2"], ["t3"]] if k == 4 else [["t0", "t1", "t2"]]
  assert groups_at(header, 0, 1) == want  # 3 of 4 share; the 4th keeps its own


def test_budgets_identical_first_never_exceeded_and_fidelity_monotone(ckpts, originals, stores):
  k = 4
  kls = []
  for unique in (8, 16, 20, 32):
    key = "full4" if unique == 32 else f"b{unique}"
    header, store = build(stores, ckpts, k, key, budget_gb=unique * EB / 1e9)
    b = header["bytes"]
    assert b["pool"] <= unique * EB
    assert b["pool"] == pool_nbytes(store) == header["selection"]["unique_experts"] * EB
    for name in NAMES:
      assert b["backbones"][name] == sum(int(a.nbytes) for a in jax.tree.leaves(store.backbones[name]))
    assert b["total"] == b["pool"] + b["backbones_total"]
    assert b["full_copies"] == sum(b["backbones"].values()) + k * 8 * EB
    assert groups_at(header, 0, 0) == [list(NAMES)] and groups_at(header, 1, 0) == [list(NAMES)]
    assert ["t0", "t1", "t2"] in groups_at(header, 0, 1) or groups_at(header, 0, 1) == [list(NAMES)]
    kls.append(np.mean([mean_kl(originals[n], store.model(n).logits(TOKENS)) for n in NAMES]))
  assert all(a >= b for a, b in itertools.pairwise(kls)), kls
  assert kls[0] > 1e3 * kls[-2] and kls[-1] < 1e-9, kls  # the full budget shares identical experts only


def test_different_architecture_is_refused_and_writes_nothing(ckpts, tmp_path):
  other = tmp_path / "wide"
  cfg = CFG.replace(intermediate_size=64)
  checkpoint.save(other, cfg, layout.init_params(cfg, seed=1))
  out = tmp_path / "store"
  with pytest.raises(ConsolidateError, match="config field intermediate_size: 128 vs 64"):
    consolidate([*tenants(ckpts, 2), ("wide", other)], out, ConsolidateConfig(share_fraction=0.5))
  assert not out.exists() and list(tmp_path.iterdir()) == [other]


def test_tensor_that_breaks_the_shared_config_is_named(ckpts, tmp_path):
  bad = tmp_path / "bad"
  cfg = CFG.replace(intermediate_size=64)
  checkpoint.save(bad, cfg, layout.init_params(cfg, seed=1))
  header = json.loads((bad / checkpoint.HEADER).read_text())
  header["config"]["intermediate_size"] = CFG.intermediate_size  # a header that lies
  (bad / checkpoint.HEADER).write_text(json.dumps(header))
  named = r"tenant 'bad'.*tensor layer_0000/experts/w1 is float32\[4, 64, 64\]"
  with pytest.raises(ConsolidateError, match=named):
    consolidate([*tenants(ckpts, 2), ("bad", bad)], tmp_path / "store", ConsolidateConfig(share_fraction=0))
  assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
  "names, match",
  [
    (("t0",), "at least 2 tenants"),
    ((), "at least 2 tenants"),
    (("a", "a"), "duplicate tenant name 'a'"),
    (("a", "A"), "duplicate tenant name 'A'"),
    (("a", "../b"), "not safe as a file name"),
    (("a", "b/c"), "not safe as a file name"),
    (("a", ""), "not safe as a file name"),
  ],
)
def test_bad_tenant_names_leave_no_store(ckpts, tmp_path, names, match):
  pairs = [(n, ckpts[NAMES[i]]) for i, n in enumerate(names)]
  with pytest.raises(ConsolidateError, match=match):
    consolidate(pairs, tmp_path / "store", ConsolidateConfig(share_fraction=0.5))
  assert list(tmp_path.iterdir()) == []


def test_budget_below_one_expert_per_position_is_refused(ckpts, tmp_path):
  with pytest.raises(ConsolidateError, match="below the smallest possible pool"):
    consolidate(tenants(ckpts, 3), tmp_path / "s", ConsolidateConfig(budget_gb=(8 * EB - 1) / 1e9))
  assert list(tmp_path.iterdir()) == []
  consolidate(tenants(ckpts, 3), tmp_path / "s", ConsolidateConfig(budget_gb=8 * EB / 1e9))  # just fits


def test_same_inputs_give_the_same_store(ckpts, stores):
  header, store = build(stores, ckpts, 3, "frac_a", share_fraction=0.5, owner=Owner.MEDOID)
  out = stores["root"] / "frac_b"
  again = consolidate(tenants(ckpts, 3), out, ConsolidateConfig(share_fraction=0.5, owner=Owner.MEDOID))
  assert json.dumps(again) == json.dumps(header)
  first = stores["root"] / "frac_a"
  for name in ("store.json", "report.json"):
    assert (first / name).read_text() == (out / name).read_text()
  other = jaxmoe.load_store(out)
  jax.tree.map(
    np.testing.assert_array_equal,
    (store.pool, store.backbones, store.slot_maps),
    (other.pool, other.backbones, other.slot_maps),
  )


# ---------------------------------------------------------------- metrics and selection


def test_k2_l2_budget_is_the_papers_rule(ckpts, stores):
  n_shared = 3
  header, _ = build(stores, ckpts, 2, "paper", budget_gb=(16 - n_shared) * EB / 1e9)
  a, b = (checkpoint.load(ckpts[n])[1] for n in ("t0", "t1"))
  flat = lambda p, l, e: np.concatenate([expert(p, n, l, e).ravel() for n in ("w1", "w3", "w2")])
  dist = {
    (l, e): float(np.linalg.norm(flat(a, l, e).astype(np.float64) - flat(b, l, e))) for l in range(2) for e in range(4)
  }
  closest = sorted(dist, key=lambda pos: (dist[pos], pos))[:n_shared]
  shared = {(p["layer"], p["expert"]) for p in header["positions"] if len(p["groups"]) == 1}
  assert shared == set(closest)
  for p in header["positions"]:
    np.testing.assert_allclose(p["score"], dist[p["layer"], p["expert"]], rtol=1e-5)
    if len(p["groups"]) == 1 and not p["groups"][0]["identical"]:  # round robin by position
      assert p["groups"][0]["owner"] == NAMES[(p["layer"] * 4 + p["expert"]) % 2]


@pytest.mark.parametrize("metric", [Metric.L2, Metric.COSINE, Metric.OUTPUT])
def test_metrics_rank_known_perturbations(ckpts, stores, metric):
  text = TEXT if metric is Metric.OUTPUT else None
  header, _ = build(
    stores, ckpts, 3, f"metric_{metric.value}", share_fraction=0.0, metric=metric, calibration_text=text
  )
  assert header["metric"] == metric.value
  score = {(p["layer"], p["expert"]): p["score"] for p in header["positions"]}
  for pos in ((0, 0), (0, 1), (1, 0)):  # identical in t0..t2
    assert score[pos] == 0.0
  assert 0 < score[0, 2] < score[0, 3]
  assert 0 < score[1, 1] < score[1, 2] < score[1, 3]
  if metric is not Metric.OUTPUT:  # weight metrics: one ranking across layers too
    assert sorted(score, key=score.get)[3:] == [(0, 2), (1, 1), (1, 2), (0, 3), (1, 3)]
  for p in header["positions"]:
    d = np.asarray(p["distances"])
    assert d.shape == (3, 3) and np.all(d == d.T) and np.all(np.diag(d) == 0)


def test_layer_by_layer_moe_inputs_match_the_full_forward(ckpts):
  cfg, params = checkpoint.load(ckpts["t1"])
  tokenizer = jaxmoe.load(ckpts["t1"]).tokenizer
  assert calibrate.calibration_tokens(TEXT, tokenizer, cfg, 40, 16).shape == (2, 16)
  tokens = calibrate.calibration_tokens(TEXT, tokenizer, cfg, 2048, 256)  # the metric test's shapes
  assert tokens.shape == (1, 256)
  _, captured = mixtral.forward(params, tokens, cfg, Impl.AUTO, capture=True)
  want = captured["moe_inputs"]
  x = calibrate.embed(params["backbone"], tokens)
  for l in range(cfg.num_layers):
    layer = {k: v[l] for k, v in params["backbone"]["layers"].items()}
    x, h = mixtral.layer_step(layer, params["experts"], params["slot_map"][l], x, cfg, Impl.AUTO)
    np.testing.assert_allclose(h, want[l], atol=1e-6, rtol=0)


def test_share_fraction_one_keeps_one_expert_per_position(ckpts, stores):
  header, store = build(stores, ckpts, 4, "owner_rr", share_fraction=1.0)
  assert header["slots_per_layer"] == [4, 4]
  experts = {n: checkpoint.load(ckpts[n])[1]["experts"] for n in NAMES}
  for l in range(2):
    for e in range(4):
      owner = NAMES[(l * 4 + e) % 4] if AMOUNT[l, e] else "t0"
      np.testing.assert_array_equal(pool_slot(store, "w2", l, e), experts[owner]["w2"][l * 4 + e])


@pytest.mark.parametrize("owner", [Owner.BASE, Owner.MEDOID, Owner.AVERAGE])
def test_owner_policies(ckpts, stores, owner):
  kw = {"base_tenant": "t2"} if owner is Owner.BASE else {}
  header, store = build(stores, ckpts, 4, f"owner_{owner.value}", share_fraction=1.0, owner=owner, **kw)
  experts = {n: checkpoint.load(ckpts[n])[1]["experts"] for n in NAMES}
  for l in range(2):
    for e in range(4):
      (group,) = [g for g in header["positions"][l * 4 + e]["groups"]]
      got = pool_slot(store, "w1", l, e)
      if owner is Owner.BASE:  # t2's copy everywhere
        np.testing.assert_array_equal(got, experts["t2"]["w1"][l * 4 + e])
      elif owner is Owner.MEDOID and AMOUNT[l, e] and (l, e) != (0, 1):  # t0 is the unperturbed centre
        assert group["owner"] == "t0"
        np.testing.assert_array_equal(got, experts["t0"]["w1"][l * 4 + e])
      elif owner is Owner.AVERAGE and AMOUNT[l, e]:
        mean = np.mean([experts[n]["w1"][l * 4 + e] for n in NAMES], axis=0, dtype=np.float32)
        np.testing.assert_array_equal(got, mean)
        assert group["owner"] == "average"
  assert header["owner"] == owner.value


def test_complete_linkage_joins_identical_first_and_splits_groups():
  # t0 == t1 bitwise; t2 is 0.1 from both; t3 is far; t4 has distance 0 to t3 but is not identical.
  dist = np.array([[0, 0, 0.1, 5, 5], [0, 0, 0.1, 5, 5], [0.1, 0.1, 0, 5, 5], [5, 5, 5, 0, 0], [5, 5, 5, 0, 0]], float)
  same = np.eye(5, dtype=bool)
  same[0, 1] = same[1, 0] = True
  d = select_lib.cluster(dist, same)
  assert d.exact == (True, False, False, False)
  assert d.heights == (0.0, 0.0, 0.1, 5.0)
  assert d.partitions[1] == ((0, 1), (2,), (3,), (4,))
  assert d.partitions[2] == ((0, 1), (2,), (3, 4))
  assert d.partitions[3] == ((0, 1, 2), (3, 4))


def test_configs_are_checked():
  with pytest.raises(ConsolidateError, match="exactly one of"):
    ConsolidateConfig()
  with pytest.raises(ConsolidateError, match="exactly one of"):
    ConsolidateConfig(budget_gb=1.0, share_fraction=0.5)
  with pytest.raises(ConsolidateError, match="--calibration"):
    ConsolidateConfig(share_fraction=0.5, metric=Metric.OUTPUT)
  with pytest.raises(ConsolidateError, match=r"\[0, 1\]"):
    consolidate([("a", "x"), ("b", "y")], "/nonexistent/out", ConsolidateConfig(share_fraction=1.5))
  for bad in (float("inf"), float("nan"), -1.0):
    with pytest.raises(ConsolidateError, match="must be a finite number >= 0"):
      ConsolidateConfig(budget_gb=bad)
  for empty in ("", " \n\t"):
    with pytest.raises(ConsolidateError, match="the --calibration text is empty"):
      ConsolidateConfig(share_fraction=0.5, metric=Metric.OUTPUT, calibration_text=empty)


# ---------------------------------------------------------------- report


def test_report_files_and_table(ckpts, stores):
  header, _ = build(stores, ckpts, 4, "b16", budget_gb=16 * EB / 1e9)
  folder = stores["root"] / "b16"
  rep = json.loads((folder / "report.json").read_text())
  assert rep["bytes"] == header["bytes"]
  assert sum(r["after"] for r in rep["per_tenant"]) == pytest.approx(header["bytes"]["total"])
  assert (folder / "similarity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  text = report.table(header)
  assert "saving" in text and all(n in text for n in NAMES) and "16 of 32 experts" in text


# ---------------------------------------------------------------- command line


def cli(*args):
  cmd = [sys.executable, "-m", "jaxmoe.cli.consolidate", *map(str, args)]
  env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}
  return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


def test_cli_help_documents_every_flag():
  res = cli("--help")  # absl exits 1 after printing help
  for flag in (
    "--tenant",
    "--out",
    "--budget_gb",
    "--share_fraction",
    "--metric",
    "--owner",
    "--base_tenant",
    "--calibration",
    "--calibration_tokens",
  ):
    assert flag in res.stdout, flag
  assert "<l2|cosine|output>" in res.stdout and "<round_robin|base|medoid|average>" in res.stdout


def test_cli_end_to_end(ckpts, tmp_path):
  text = tmp_path / "calib.txt"
  text.write_text(TEXT)
  out = tmp_path / "store"
  res = cli(
    *(f"--tenant={n}={ckpts[n]}" for n in NAMES[:3]),
    f"--out={out}",
    "--share_fraction=0.5",
    "--metric=output",
    f"--calibration={text}",
    "--owner=average",
  )
  assert res.returncode == 0, res.stderr
  assert "saving" in res.stdout and all(n in res.stdout for n in NAMES[:3]), res.stdout
  for name in ("store.json", "report.json", "similarity.png"):
    assert (out / name).is_file()
  store = jaxmoe.load_store(out)
  assert store.tenants == list(NAMES[:3]) and store.metadata["metric"] == "output"
  assert store.metadata["owner"] == "average" and store.metadata["selection"]["joins_applied"] == 8


def test_cli_refuses_a_different_architecture_in_one_line(ckpts, tmp_path):
  other = tmp_path / "other"
  cfg = CFG.replace(num_experts=8)
  checkpoint.save(other, cfg, layout.init_params(cfg, seed=1))
  out = tmp_path / "store"
  res = cli(f"--tenant=a={ckpts['t0']}", f"--tenant=b={other}", f"--out={out}", "--budget_gb=1")
  assert res.returncode == 1
  errors = [line for line in res.stderr.splitlines() if "error" in line]
  assert len(errors) == 1 and errors[0].startswith("jaxmoe-consolidate: error: tenant 'b'"), res.stderr
  assert "num_experts: 4 vs 8" in errors[0]
  assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["other"]
