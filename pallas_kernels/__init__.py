"""Pallas kernels (flash attention, selective scan), each beside its pure-JAX reference."""
