"""Pallas kernels: fused forms of computations that XLA runs as many small launches."""
