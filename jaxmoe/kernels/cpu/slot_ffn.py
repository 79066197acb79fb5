"""One pool slot's whole expert on XLA's CPU backend, reading the slot in place (slot_ffn.cc).

XLA:CPU copies a dynamically indexed matmul operand out of its array before
the product, and at decode, where a routed slot meets a few rows, that copy
costs as much as the product. `slot_ffn(x, leaves, slot)` takes the whole pool
leaves and the slot instead, and runs the expert (SwiGLU or ReLU) in one call.
`slot_ffn_reference` is the same expert in jnp. The library is compiled once
per source, compiler and CPU into a cache folder (`$JAXMOE_CACHE`, else
`$XDG_CACHE_HOME/jaxmoe`, else `~/.cache/jaxmoe`); without a compiler, or with
`JAXMOE_CPU_KERNELS=0`, `available()` is False and callers keep XLA's matmuls.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("slot_ffn.cc")
MAX_ROWS = 16  # a decode chunk (batch 32 routes 16 rows per slot); prefill chunks keep XLA's matmuls
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_TARGETS = {"float32": "jaxmoe_slot_ffn_f32", "uint16": "jaxmoe_slot_ffn_bf16_bits"}
_SYMBOLS = {"float32": "JaxmoeSlotFfnF32", "uint16": "JaxmoeSlotFfnBF16Bits"}


def cache_dir() -> Path:
  if os.environ.get("JAXMOE_CACHE"):
    return Path(os.environ["JAXMOE_CACHE"])
  return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxmoe"


def _cpu_signature() -> str:
  """What -march=native compiles for: the CPU's feature flags where Linux lists them."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  return platform.processor() or platform.machine()


def build(out_dir: Path | None = None) -> Path:
  """Compile the library (or find it compiled) and return its path; raises RuntimeError if it cannot."""
  wanted = os.environ.get("CXX")
  cxx = shutil.which(wanted) if wanted else shutil.which("g++") or shutil.which("c++")
  if cxx is None:
    raise RuntimeError(f"no C++ compiler: {wanted or 'g++ or c++'} not found")
  if not hasattr(jax, "ffi"):
    raise RuntimeError(f"jax {jax.__version__} has no jax.ffi")
  include = jax.ffi.include_dir()
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
  key = hashlib.sha256(
    b"\0".join(s.encode() for s in (SOURCE.read_text(), cxx, version, include, *_FLAGS, _cpu_signature()))
  ).hexdigest()[:16]
  out_dir = out_dir or cache_dir()
  lib = out_dir / f"slot_ffn-{key}.so"
  if lib.exists():
    return lib
  out_dir.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
  os.close(fd)
  try:
    done = subprocess.run([cxx, *_FLAGS, "-I", include, str(SOURCE), "-o", tmp], capture_output=True, text=True)
    if done.returncode:
      raise RuntimeError(f"{cxx} failed on {SOURCE.name}:\n{done.stderr[-2000:]}")
    os.replace(tmp, lib)  # atomic: processes building at once each publish a whole file
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return lib


@functools.cache
def available() -> bool:
  """Whether the kernel is built and registered with XLA (built on the first call)."""
  if os.environ.get("JAXMOE_CPU_KERNELS", "1") == "0":
    return False
  try:
    lib = ctypes.CDLL(str(build()))
  except (RuntimeError, OSError) as e:
    warnings.warn(f"the CPU expert kernel is unavailable, XLA's matmuls are used instead: {e}", stacklevel=2)
    return False
  for dtype, target in _TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, _SYMBOLS[dtype])), platform="cpu")
  return True


def supports(rows: int, leaves, x_dtype) -> bool:
  """Whether `slot_ffn` takes `rows` rows of `x_dtype` against these pool leaves here: on the CPU, at most
  MAX_ROWS rows, float32 leaves with float32 x or bfloat16 bit patterns (uint16) with bfloat16 x."""
  if jax.default_backend() != "cpu" or rows > MAX_ROWS:
    return False
  x_dtype = jnp.dtype(x_dtype)
  want = {jnp.dtype(jnp.float32): jnp.float32, jnp.dtype(jnp.bfloat16): jnp.uint16}.get(x_dtype)
  if want is None or any(leaf.ndim != 3 or leaf.dtype != want for leaf in leaves):
    return False
  return available()


def _matmul_reference(x, leaf, slot):
  """x @ leaf[slot] in jnp: the slot sliced out, bit patterns read as bfloat16, float32 throughout."""
  w = leaf[slot]
  if w.dtype == jnp.uint16:
    w = jax.lax.bitcast_convert_type(w, jnp.bfloat16)
  return jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def slot_ffn(x, leaves, slot):
  """One slot's whole expert in one call -> [R, D] float32, the pool leaves read in place (see `supports`).

  `leaves` are (w_in, w_gate, w_out), SwiGLU: silu(x w_in) * (x w_gate), or (w_in, w_out), ReLU: relu(x w_in);
  [X, D, F] in, [X, F, D] out. The hidden activations are rounded to x's dtype before w_out, as the jnp
  experts do. A slot outside the pool is clamped into it, as XLA clamps a dynamic index."""
  gated = len(leaves) == 3
  w_in, w_gate, w_out = leaves if gated else (leaves[0], leaves[0], leaves[1])
  target = _TARGETS[jnp.dtype(w_in.dtype).name]
  slot = jnp.clip(jnp.asarray(slot, jnp.int32), 0, w_in.shape[0] - 1).reshape(1)
  out = jax.ShapeDtypeStruct((x.shape[0], w_out.shape[2]), jnp.float32)
  call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
  return call(x.astype(jnp.float32), w_in, w_gate, w_out, slot, gated=np.int32(gated))


def slot_ffn_reference(x, leaves, slot):
  """The same expert in jnp (float32 products, the hidden activations rounded to x's dtype)."""
  h = _matmul_reference(x, leaves[0], slot)
  h = jax.nn.silu(h) * _matmul_reference(x, leaves[1], slot) if len(leaves) == 3 else jax.nn.relu(h)
  return _matmul_reference(h.astype(x.dtype), leaves[-1], slot)
