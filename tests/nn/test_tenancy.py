"""Weight access for batches mixing tenants: every projection variant equals per-row products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.nn import tenancy
from tests.helpers import max_abs


@pytest.mark.parametrize("project", [tenancy.grouped_linear, tenancy.block_linear, tenancy.gathered_linear])
def test_mixed_tenant_projections_match_per_row_products(project):
  rng = np.random.default_rng(10)
  x = rng.standard_normal((5, 3, 8)).astype(np.float32)
  w = rng.standard_normal((4, 8, 6)).astype(np.float32)
  ids = np.array([2, 0, 3, 2, 1], np.int32)
  want = np.stack([x[b] @ w[ids[b]] for b in range(5)])
  got = np.asarray(jax.jit(project)(x, w, ids))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=max_abs(got, want))


@pytest.mark.parametrize("gather_limit", [0, tenancy.GATHER_LIMIT_BYTES])
@pytest.mark.parametrize("tokens", [1, 3])
def test_mixed_tenants_linear_matches_per_row_products(monkeypatch, gather_limit, tokens):
  """Whichever CPU variant the shapes and the copy limit pick, rows get their own tenant's product."""
  monkeypatch.setattr(tenancy, "GATHER_LIMIT_BYTES", gather_limit)
  rng = np.random.default_rng(11)
  x = rng.standard_normal((5, tokens, 4, 2)).astype(np.float32)  # [B, T, N, H]
  w = rng.standard_normal((3, 4, 2, 6)).astype(np.float32)  # [A, N, H, D]
  ids = np.array([1, 0, 2, 2, 1], np.int32)
  want = np.stack([np.einsum("TNH,NHD->TD", x[b], w[ids[b]]) for b in range(5)])
  ops = tenancy.MixedTenants(jnp.asarray(ids), 3)
  got = np.asarray(ops.linear("BTNH,NHD->BTD", jnp.asarray(x), jnp.asarray(w)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=max_abs(got, want))


def test_per_row_slot_maps_and_shapes():
  ops = tenancy.MixedTenants(jnp.asarray([1, 0, 1], jnp.int32), 2)
  rows = np.asarray(ops.rows(jnp.asarray([[0, 1], [5, 6]])))
  np.testing.assert_array_equal(rows, [[5, 6], [0, 1], [5, 6]])
  assert ops.shape((4, 3)) == (2, 4, 3) and tenancy.SingleTenant().shape((4, 3)) == (4, 3)
