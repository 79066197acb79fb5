"""Pallas GPU kernels (Triton backend) for MoE routing and grouped matmuls, each beside its jnp reference.

A leaf package: it imports jax and nothing of jaxmoe, so the model code
depends on it and never the other way round.
"""
