"""The CPU expert kernel (an XLA FFI handler in C++: one pool slot's whole SwiGLU or ReLU expert) against its
jnp reference, and its use by the routed MoE strategy."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmoe.kernels.cpu import slot_ffn as sm
from jaxmoe.nn import moe as moe_lib
from jaxmoe.nn import moe_ops

ON_CPU = jax.default_backend() == "cpu"
needs_kernel = pytest.mark.skipif(not (ON_CPU and sm.available()), reason="needs the CPU kernel (CPU, g++)")


@pytest.mark.skipif(not ON_CPU or shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs g++ on a CPU")
def test_the_kernel_builds_where_a_compiler_is():
  """Where g++ is, the routed strategy's tests below run the kernel, not a silent fallback."""
  assert sm.available()


@needs_kernel
def test_supports_only_what_the_kernel_computes():
  f32 = jnp.zeros((4, 8, 8), jnp.float32)
  bits = jnp.zeros((4, 8, 8), jnp.uint16)
  assert sm.supports(1, [f32], jnp.float32) and sm.supports(sm.MAX_ROWS, [bits, bits], jnp.bfloat16)
  assert not sm.supports(sm.MAX_ROWS + 1, [f32], jnp.float32)  # prefills keep XLA's matmul
  assert not sm.supports(1, [bits], jnp.float16)  # float16 bit patterns are not bfloat16
  assert not sm.supports(1, [bits], jnp.float32) and not sm.supports(1, [f32, bits], jnp.bfloat16)


@pytest.mark.skipif(not ON_CPU or shutil.which("g++") is None, reason="needs g++ on a CPU")
def test_build_compiles_once_into_a_folder(tmp_path):
  lib = sm.build(tmp_path)
  assert lib.exists() and lib.parent == tmp_path and [p.name for p in tmp_path.iterdir()] == [lib.name]
  stamp = lib.stat().st_mtime_ns
  assert sm.build(tmp_path) == lib and lib.stat().st_mtime_ns == stamp  # found, not rebuilt


def test_build_without_a_compiler_says_so(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
    sm.build(tmp_path)
  assert list(tmp_path.iterdir()) == []


def ffn_case(rng, rows, d, f, gated, bf16=False, slots=5):
  """x [rows, d] and an expert pool's leaves (w_in, [w_gate,] w_out) as the kernel takes them."""
  x = rng.standard_normal((rows, d)).astype(np.float32)
  shapes = [(slots, d, f)] * (2 if gated else 1) + [(slots, f, d)]
  leaves = [(0.3 * rng.standard_normal(sh)).astype(np.float32) for sh in shapes]
  if bf16:
    bits = [jax.lax.bitcast_convert_type(jnp.asarray(w, jnp.bfloat16), jnp.uint16) for w in leaves]
    return jnp.asarray(x, jnp.bfloat16), bits
  return jnp.asarray(x), [jnp.asarray(w) for w in leaves]


@needs_kernel
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize(("rows", "d", "f"), [(1, 256, 512), (3, 17, 31), (16, 64, 96), (9, 33, 333), (2, 1, 1)])
def test_ffn_matches_reference(rows, d, f, bf16, gated):
  x, leaves = ffn_case(np.random.default_rng(rows * 1000 + f), rows, d, f, gated, bf16)
  got = jax.jit(sm.slot_ffn)(x, leaves, jnp.int32(3))
  want = sm.slot_ffn_reference(x, leaves, 3)
  assert got.dtype == jnp.float32 and got.shape == (rows, d)
  scale = float(jnp.max(jnp.abs(want)))
  # bf16: h is rounded to bfloat16 on both sides; a 1-ulp float32 difference before the rounding can move one
  # hidden value by a bfloat16 ulp
  tol = 1e-3 if bf16 else 1e-5
  assert float(jnp.max(jnp.abs(got - want))) <= tol * scale


@needs_kernel
@pytest.mark.parametrize("gated", [True, False])
def test_ffn_row_does_not_depend_on_the_other_rows(gated):
  x, leaves = ffn_case(np.random.default_rng(7), 7, 64, 200, gated)
  together = np.asarray(jax.jit(sm.slot_ffn)(x, leaves, jnp.int32(2)))
  for r in range(7):
    np.testing.assert_array_equal(np.asarray(jax.jit(sm.slot_ffn)(x[r : r + 1], leaves, jnp.int32(2)))[0], together[r])
  flipped = np.asarray(jax.jit(sm.slot_ffn)(x[::-1], leaves, jnp.int32(2)))
  np.testing.assert_array_equal(flipped[::-1], together)


@needs_kernel
@pytest.mark.parametrize(("slot", "clamped"), [(-3, 0), (5, 4), (99, 4)])
def test_ffn_clamps_a_slot_outside_the_pool_as_xla_clamps(slot, clamped):
  x, leaves = ffn_case(np.random.default_rng(8), 2, 16, 64, True)
  got = jax.jit(sm.slot_ffn)(x, leaves, jnp.int32(slot))
  want = sm.slot_ffn_reference(x, leaves, clamped)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("kind", [("w1", "w3", "w2"), ("wi", "wo")])
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_routed_moe_through_the_kernel_equals_xla_matmuls(tokens, kind, monkeypatch):
  """Decode-sized batches take the expert kernel (SwiGLU or ReLU); the same layer with XLA's matmuls gives
  the same values."""
  rng = np.random.default_rng(5)
  d, f, e, slots = 32, 48, 4, 6
  x = rng.standard_normal((tokens, d)).astype(np.float32)
  logits = rng.standard_normal((tokens, e)).astype(np.float32)
  shapes = {"w1": (slots, d, f), "w3": (slots, d, f), "w2": (slots, f, d), "wi": (slots, d, f), "wo": (slots, f, d)}
  pool = {n: (0.3 * rng.standard_normal(shapes[n])).astype(np.float32) for n in kind}
  slot_map = np.array([4, 0, 5, 2], np.int32)
  spec = moe_lib.MoeSpec(top_k=2, impl=moe_lib.Impl.ROUTED)
  run = lambda: jax.jit(lambda *a: moe_lib.moe(*a, spec))(x, logits, slot_map, pool)
  assert "jaxmoe_slot_ffn_f32" in jax.jit(lambda *a: moe_lib.moe(*a, spec)).lower(x, logits, slot_map, pool).as_text()
  fast = np.asarray(run())
  monkeypatch.setattr(moe_ops.slot_ffn, "supports", lambda *a: False)
  slow = np.asarray(run())
  np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-6)
