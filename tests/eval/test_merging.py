"""Merging baselines against small hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from jaxmoe.eval import merging
from jaxmoe.eval.merging import MergeSpec, Method


def model(w, e=None):
  """A minimal served-layout tree: one backbone leaf, one expert leaf [X = 1, ...], identity slot map [1, 1]."""
  w = np.asarray(w, np.float32)
  e = w * 2 if e is None else np.asarray(e, np.float32)
  return {"backbone": {"embed": w}, "experts": {"w1": e[None]}, "slot_map": np.zeros((1, 1), np.int32)}


BASE = model([0.0, 0.0, 0.0, 0.0])
A = model([1.0, -2.0, 0.5, 0.0])
B = model([3.0, 2.0, -0.5, 0.1])


def test_average():
  out = merging.average([A, B])
  np.testing.assert_allclose(out["backbone"]["embed"], [2.0, 0.0, 0.0, 0.05])
  np.testing.assert_allclose(out["experts"]["w1"][0], [4.0, 0.0, 0.0, 0.1])  # experts merged too
  np.testing.assert_array_equal(out["slot_map"], BASE["slot_map"])


def test_task_arithmetic_scales_the_summed_task_vectors():
  base = model([1.0, 1.0, 1.0, 1.0])
  out = merging.task_arithmetic(base, [A, B], lam=0.5)
  # base + 0.5 * ((A - base) + (B - base))
  np.testing.assert_allclose(out["backbone"]["embed"], [2.0, 0.0, 0.0, 0.05], rtol=1e-6)
  np.testing.assert_allclose(merging.task_arithmetic(base, [A, B], 0.0)["backbone"]["embed"], 1.0)
  # lam = 1 / K is plain averaging.
  np.testing.assert_allclose(out["experts"]["w1"][0], merging.average([A, B])["experts"]["w1"][0], rtol=1e-6)


def test_ties_trim_elect_disjoint_mean():
  taus = [
    np.array([4.0, -1.0, 2.0, 0.1], np.float32),
    np.array([-1.0, -3.0, 0.5, 0.2], np.float32),
    np.array([2.0, 2.0, -3.0, 0.0], np.float32),
  ]
  # Trim to density 0.5: keep the 2 largest magnitudes of each task vector.
  np.testing.assert_array_equal(merging.trim(taus[0], 0.5), [4.0, 0.0, 2.0, 0.0])
  np.testing.assert_array_equal(merging.trim(taus[1], 0.5), [-1.0, -3.0, 0.0, 0.0])
  trimmed_2 = merging.trim(taus[2], 0.5)  # |2| ties with |2|: either is kept, |-3| always
  assert trimmed_2[2] == -3.0 and np.count_nonzero(trimmed_2) == 2
  taus[2] = np.array([2.0, 0.5, -3.0, 0.0], np.float32)  # no ties: keeps 2.0 and -3.0
  # Trimmed: [4, 0, 2, 0], [-1, -3, 0, 0], [2, 0, -3, 0]. Elected signs: sums [5, -3, -1, 0] -> [+, -, -, 0];
  # disjoint mean over the agreeing nonzero entries: [(4+2)/2, -3/1, -3/1, 0] (-1 and 2 disagree).
  np.testing.assert_allclose(merging.ties_tensor(taus, 0.5), [3.0, -3.0, -3.0, 0.0])
  base = model([1.0, 1.0, 1.0, 1.0], e=[0.0, 0.0, 0.0, 0.0])
  models = [model(1.0 + t, e=t) for t in taus]
  out = merging.ties(base, models, density=0.5, lam=0.5)
  np.testing.assert_allclose(out["backbone"]["embed"], 1.0 + 0.5 * np.array([3.0, -3.0, -3.0, 0.0]))


def test_dare_keeps_the_expected_value():
  rng = np.random.default_rng(0)
  tau = np.full(200_000, 0.3, np.float32)
  dropped = merging.dare_tensor(tau, 0.75, rng)
  kept = dropped != 0
  assert kept.mean() == pytest.approx(0.25, abs=0.01)
  np.testing.assert_allclose(dropped[kept], 0.3 / 0.25, rtol=1e-6)  # survivors rescaled by 1 / (1 - p)
  assert dropped.mean() == pytest.approx(0.3, rel=0.02)  # E[DARE(tau)] = tau
  # Seeded: the same merge twice is identical; drop rate 0 is task arithmetic.
  a = merging.dare(BASE, [A, B], drop_rate=0.5, lam=1.0, seed=3)
  b = merging.dare(BASE, [A, B], drop_rate=0.5, lam=1.0, seed=3)
  np.testing.assert_array_equal(a["experts"]["w1"][0], b["experts"]["w1"][0])
  np.testing.assert_allclose(
    merging.dare(BASE, [A, B], 0.0, 0.7)["backbone"]["embed"],
    merging.task_arithmetic(BASE, [A, B], 0.7)["backbone"]["embed"],
    rtol=1e-6,
  )
  with pytest.raises(ValueError, match="drop_rate"):
    merging.dare_tensor(tau, 1.0, rng)


def test_merge_dispatch_and_labels():
  for spec in (
    MergeSpec(Method.AVERAGE),
    MergeSpec(Method.TASK_ARITHMETIC, lam=0.5),
    MergeSpec(Method.TIES, density=0.5, lam=1.0),
    MergeSpec(Method.DARE, drop_rate=0.5, lam=0.5),
  ):
    out = merging.merge(spec, BASE, [A, B])
    assert out["backbone"]["embed"].dtype == np.float32 and out["backbone"]["embed"].shape == (4,)
  assert MergeSpec(Method.TIES, density=0.2, lam=1.0).label == "ties(density=0.2,lam=1)"


def test_merging_needs_plain_models():
  pooled = dict(A, slot_map=np.ones((1, 1), np.int32))
  with pytest.raises(ValueError, match="identity slot maps"):
    merging.average([pooled, B])
