"""Pallas MoE kernels against their jnp references.

The cases live in `_KernelCases`; `TestKernelsInterpret` runs them in Pallas
interpret mode on any backend (CPU CI), `TestKernelsGpu` compiles them with the
Triton backend and carries the `gpu` marker. Shapes are tiny on purpose:
interpret mode runs the grid as a loop of XLA ops.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.families.mixtral import model as mixtral
from jaxmoe.families.mixtral.config import preset
from jaxmoe.families.mixtral.layout import init_params
from jaxmoe.kernels import gmm as gmm_lib
from jaxmoe.kernels import routing
from jaxmoe.kernels.moe import MoeKernelConfig, moe_swiglu
from jaxmoe.nn import moe as moe_lib
from jaxmoe.nn.moe import Impl, MoeSpec, Router

BLOCKS = gmm_lib.GmmConfig(block_t=16, block_n=16, block_k=16)  # several blocks on tiny dims
ON_GPU = jax.default_backend() == "gpu"
EXACT = jax.default_matmul_precision("highest")  # references in true float32, not TF32 on GPUs


def assert_close(actual, expected, rtol, what):
  """Max-abs error relative to the largest expected magnitude."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"{what}: {actual.shape=} {expected.shape=}"
  assert np.all(np.isfinite(actual)), f"{what}: non-finite output"
  max_abs = float(np.max(np.abs(actual - expected), initial=0.0))
  rel = max_abs / max(float(np.max(np.abs(expected), initial=0.0)), 1e-30)
  assert rel <= rtol, f"{what}: max-abs error {max_abs:.3g}, relative {rel:.3g} > {rtol:.1g}"


def normal(key, shape, dtype, scale=1.0):
  return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def moe_pallas(x, logits, slot_map, pool, spec: MoeSpec, interpret: bool, config=None):
  return moe_swiglu(
    x,
    logits,
    slot_map,
    pool["w1"],
    pool["w3"],
    pool["w2"],
    top_k=spec.k,
    renormalise=spec.router is Router.TOPK_RENORM,
    interpret=interpret,
    config=config,
  )


def make_pool(key, s, d, f, dtype, nan_slots=()):
  """A random pool; slots in nan_slots are all NaN, so reading them shows in the output."""
  k1, k3, k2 = jax.random.split(key, 3)
  pool = {
    "w1": normal(k1, (s, d, f), dtype, d**-0.5),
    "w3": normal(k3, (s, d, f), dtype, d**-0.5),
    "w2": normal(k2, (s, f, d), dtype, f**-0.5),
  }
  for name in pool:
    for slot in nan_slots:
      pool[name] = pool[name].at[slot].set(jnp.nan)
  return pool


class _KernelCases:
  INTERPRET = True

  @pytest.mark.parametrize(
    "t, e, s, router, per_token",
    [
      (37, 5, 6, Router.TOPK_RENORM, False),  # tail block, E not a power of two
      (20, 8, 4, Router.TOP1, True),  # Switch, per-token tenant maps
    ],
  )
  def test_route_matches_reference(self, t, e, s, router, per_token):
    k = 2 if router is Router.TOPK_RENORM else 1
    key_logits, key_map = jax.random.split(jax.random.PRNGKey(t))
    logits = normal(key_logits, (t, e), jnp.bfloat16, 2.0)
    if per_token:
      slot_map = jax.random.randint(key_map, (t, e), 0, s, jnp.int32)
    else:
      slot_map = jnp.array([3, 0, 5, 3, 1], jnp.int32)  # experts 0 and 3 share slot 3; 2, 4 unused
    kwargs = {"num_slots": s, "top_k": k, "renormalise": router is Router.TOPK_RENORM, "block_t": 16}
    got = routing.route(
      logits, slot_map, config=routing.RouteConfig(block_tokens=16), interpret=self.INTERPRET, **kwargs
    )
    want = routing.route_reference(logits, slot_map, **kwargs)
    assert_close(got.weights, want.weights, 1e-6, "weights")
    for name in routing.Routing._fields[1:]:
      np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert int(got.group_sizes.sum()) == t * k

  @pytest.mark.parametrize(
    "sizes, m, dtype, k_splits",
    [
      ((5, 0, 17, 0, 3, 0), 28, jnp.float32, 1),  # empty groups, 3 rows past the groups
      ((0, 0, 30, 0), 30, jnp.bfloat16, 2),  # every row in one group, split-K
      ((0, 0, 0), 8, jnp.float32, 1),  # nothing routed at all
    ],
  )
  def test_gmm_matches_reference(self, sizes, m, dtype, k_splits):
    k, n = 40, 24  # not multiples of the 16-wide blocks
    key_lhs, key_rhs = jax.random.split(jax.random.PRNGKey(m))
    lhs = normal(key_lhs, (m, k), dtype)
    rhs = normal(key_rhs, (len(sizes), k, n), dtype, k**-0.5)
    empty = [i for i, size in enumerate(sizes) if size == 0]
    rhs_nan = rhs.at[jnp.array(empty, jnp.int32)].set(jnp.nan)  # empty groups must not be read
    group_sizes = jnp.array(sizes, jnp.int32)
    config = gmm_lib.GmmConfig(block_t=16, block_n=16, block_k=16, k_splits=k_splits)
    got = gmm_lib.gmm(lhs, rhs_nan, group_sizes, config=config, interpret=self.INTERPRET)
    with EXACT:
      want = gmm_lib.gmm_reference(lhs, rhs, group_sizes)
    assert_close(got, want, 1e-5 if dtype == jnp.float32 else 1e-2, "gmm")
    ragged = jax.lax.ragged_dot(
      lhs, rhs, group_sizes, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST
    )
    assert_close(got, ragged, 1e-5 if dtype == jnp.float32 else 1e-2, "gmm vs ragged_dot")

  @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
  def test_swiglu_matches_reference(self, dtype):
    t, e, s, d, f = 19, 4, 5, 24, 40
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    logits = normal(keys[0], (t, e), jnp.float32)
    slot_map = jnp.array([4, 0, 2, 1], jnp.int32)  # slot 3 unused: NaN weights stay unread
    r = routing.route_reference(logits, slot_map, num_slots=s, top_k=2, block_t=16)
    x = normal(keys[1], (t, d), dtype)[r.row_token]
    pool = make_pool(keys[2], s, d, f, dtype)
    nan_pool = make_pool(keys[2], s, d, f, dtype, nan_slots=(3,))
    got = gmm_lib.swiglu(
      x, nan_pool["w1"], nan_pool["w3"], nan_pool["w2"], r.tile_group, up_config=BLOCKS, interpret=self.INTERPRET
    )
    with EXACT:
      want = gmm_lib.swiglu_reference(x, pool["w1"], pool["w3"], pool["w2"], r.tile_group, block_t=16)
    assert_close(got, want, 1e-5 if dtype == jnp.float32 else 2e-2, "swiglu")

  @pytest.mark.parametrize(
    "t, router, dtype, per_token, boundary",
    [
      (21, Router.TOPK_RENORM, jnp.float32, False, True),
      (9, Router.TOPK_RENORM, jnp.bfloat16, True, False),
      (13, Router.TOP1, jnp.float32, False, False),
    ],
  )
  def test_moe_matches_dense(self, t, router, dtype, per_token, boundary):
    e, s, d, f = 4, 6, 24, 40
    keys = jax.random.split(jax.random.PRNGKey(t), 4)
    x = normal(keys[0], (t, d), dtype)
    logits = normal(keys[1], (t, e), dtype)
    slot_map = (
      jax.random.randint(keys[2], (t, e), 0, s - 1, jnp.int32) if per_token else jnp.array([2, 4, 0, 1], jnp.int32)
    )
    spec = MoeSpec(top_k=2, router=router)
    config = MoeKernelConfig(
      route=routing.RouteConfig(block_tokens=16), up=BLOCKS, down=dataclasses.replace(BLOCKS, k_splits=2)
    )
    pool = make_pool(keys[3], s, d, f, dtype)
    nan_pool = make_pool(keys[3], s, d, f, dtype, nan_slots=(s - 1,))  # no expert maps to it
    if boundary:  # forced through jaxmoe.nn.moe by MoeSpec.impl, blocks from the heuristic
      impl = Impl.PALLAS_INTERPRET if self.INTERPRET else Impl.PALLAS
      got = moe_lib.moe(x, logits, slot_map, nan_pool, dataclasses.replace(spec, impl=impl))
    else:
      got = moe_pallas(x, logits, slot_map, nan_pool, spec, interpret=self.INTERPRET, config=config)
    with EXACT:
      want = moe_lib.moe_dense(x, logits, slot_map, pool, spec)
    assert got.dtype == x.dtype
    assert_close(got, want, 1e-5 if dtype == jnp.float32 else 2e-2, "moe vs dense")


class TestKernelsInterpret(_KernelCases):
  INTERPRET = True


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU (Triton backend)")
class TestKernelsGpu(_KernelCases):
  INTERPRET = False

  def test_mixtral_layer_bf16(self):
    """One Mixtral-shaped layer (D, F scaled down 4x) against ragged_dot, decode and prefill."""
    e, d, f = 8, 1024, 3584
    pool = make_pool(jax.random.PRNGKey(0), e, d, f, jnp.bfloat16)
    spec = MoeSpec(top_k=2, impl=Impl.PALLAS)
    for t in (1, 8, 300):
      kx, kl = jax.random.split(jax.random.PRNGKey(t))
      x = normal(kx, (t, d), jnp.bfloat16)
      logits = normal(kl, (t, e), jnp.bfloat16)
      slot_map = jnp.arange(e, dtype=jnp.int32)
      got = moe_lib.moe(x, logits, slot_map, pool, spec)
      want = moe_lib.moe_ragged(x, logits, slot_map, pool, spec)
      assert_close(got, want, 2e-2, f"mixtral layer T={t}")


def test_auto_picks_pallas_on_gpu(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert moe_lib.resolve(Impl.AUTO) is Impl.PALLAS
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert moe_lib.resolve(Impl.AUTO) is Impl.ROUTED


@pytest.mark.parametrize(
  "t, d, f, e, dtype, per_token",
  [
    (1, 4096, 14336, 8, jnp.bfloat16, False),
    (512, 4096, 14336, 8, jnp.bfloat16, False),
    (7, 24, 40, 5, jnp.float32, True),
  ],
)
def test_lowers_to_triton(t, d, f, e, dtype, per_token):
  """The compiled path lowers to Triton IR (no GPU needed): block shapes and ops are legal."""
  sds = jax.ShapeDtypeStruct
  args = (
    sds((t, d), dtype),
    sds((t, e), dtype),
    sds((t, e) if per_token else (e,), jnp.int32),
    {"w1": sds((e, d, f), dtype), "w3": sds((e, d, f), dtype), "w2": sds((e, f, d), dtype)},
  )
  fn = jax.jit(lambda *a: moe_pallas(*a, MoeSpec(top_k=2), interpret=False))
  text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("xla.gpu.triton") == 3  # route, fused gate/up, down


def test_wrappers_check_inputs():
  lhs = jnp.zeros((32, 8), jnp.float32)
  with pytest.raises(ValueError, match="lhs.shape="):
    gmm_lib.gmm_tiled(lhs, jnp.zeros((2, 9, 4), jnp.float32), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="lhs.dtype="):
    gmm_lib.gmm_tiled(lhs, jnp.zeros((2, 8, 4), jnp.bfloat16), jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="slot_map.shape="):
    routing.route(jnp.zeros((4, 8)), jnp.zeros(7, jnp.int32), num_slots=8, top_k=2)
  with pytest.raises(ValueError, match="block_n=24"):
    gmm_lib.GmmConfig(block_n=24)


def test_model_logits_unchanged_with_kernels_forced():
  """The whole tiny model: MoE through the interpret-mode kernels vs the ragged_dot path."""
  cfg = preset("tiny")
  params = init_params(cfg, seed=0)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 11), 0, cfg.vocab_size, jnp.int32)
  got = mixtral.forward(params, tokens, cfg, impl=Impl.PALLAS_INTERPRET)
  want = mixtral.forward(params, tokens, cfg, impl=Impl.RAGGED)
  assert_close(got, want, 1e-5, "logits, kernels forced on vs ragged_dot")
