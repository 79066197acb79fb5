"""CPU kernels (XLA FFI handlers in C++, built with the host's compiler at first use), each beside its jnp
reference. Like the rest of jaxmoe.kernels, this package imports nothing of jaxmoe."""
