"""MoE kernels, each beside its jnp reference: Pallas GPU kernels (Triton backend) for routing and grouped
matmuls, and in `cpu/` a C++ XLA FFI kernel for a decode chunk's matmuls against one pool slot.

A leaf package: it imports jax and nothing of jaxmoe, so the model code
depends on it and never the other way round.
"""
