"""Checkpoints and a store written before the redesign load with today's code and give the same outputs.

tests/fixtures/legacy_v1 was written by the flat-layout code (commit 3e1f563),
with the outputs that code computed: token ids must match exactly, logits within float32 rounding
(the suite compiles at a cheaper XLA optimisation level than the one that recorded them).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import jaxmoe
from jaxmoe.serving import Engine, EngineConfig, Mode
from tests.helpers import LEGACY, recorded_close

OUTPUTS = dict(np.load(LEGACY / "outputs.npz"))
TOKENS = np.load(LEGACY / "tokens.npy")


def test_mixtral_checkpoint():
  m = jaxmoe.load(LEGACY / "mixtral_a")
  recorded_close(m.logits(TOKENS), OUTPUTS["mixtral_a/logits"])
  np.testing.assert_array_equal(m.generate(TOKENS, 12, stop_at_eos=False), OUTPUTS["mixtral_a/generate"])
  sampled = m.generate(TOKENS, 12, temperature=0.9, top_p=0.8, seed=5, stop_at_eos=False)
  np.testing.assert_array_equal(sampled, OUTPUTS["mixtral_a/sample"])


def test_switch_checkpoint():
  m = jaxmoe.load(LEGACY / "switch")
  recorded_close(m.logits(TOKENS, TOKENS[:, :5]), OUTPUTS["switch/logits"])
  np.testing.assert_array_equal(m.generate(TOKENS, 10, stop_at_eos=False), OUTPUTS["switch/generate"])
  dropless = jaxmoe.load(LEGACY / "switch", routing="dropless")
  np.testing.assert_array_equal(dropless.generate(TOKENS, 10, stop_at_eos=False), OUTPUTS["switch/dropless_generate"])


@pytest.fixture(scope="module")
def store():
  return jaxmoe.load_store(LEGACY / "mixtral_store")


def test_store_tenants(store):
  assert store.tenants == ["a", "b"]
  for t in store.tenants:
    m = store.model(t)
    recorded_close(m.logits(TOKENS), OUTPUTS[f"store_{t}/logits"])
    np.testing.assert_array_equal(m.generate(TOKENS, 12, stop_at_eos=False), OUTPUTS[f"store_{t}/generate"])


@pytest.mark.parametrize("mode", list(Mode))
def test_store_served_in_every_mode(store, mode):
  requests = json.loads((LEGACY / "requests.json").read_text())
  engine = Engine(store, EngineConfig(mode=mode, max_batch=4, max_seq_len=64))
  for r in requests:
    engine.submit(r)
  done = {r["id"]: r for r in engine.run_until_done()}
  for r in requests:
    assert done[r["id"]]["token_ids"] == OUTPUTS[f"engine_{mode.value}/{r['id']}"].tolist(), r["id"]
