"""Expert math: grouped matrix products (:func:`grouped_matmul`) and their Hopper kernels."""

from jax_moe_dispatch.gemm.api import GemmImplementation, grouped_matmul

__all__ = ["GemmImplementation", "grouped_matmul"]
