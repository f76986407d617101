"""Tile sizes of the grouped-GEMM kernels, per product and shape.

One default per product (``"fwd"``: ``x @ w``, ``"dgrad"``: ``dy @ w.T``,
``"wgrad"``: ``x.T @ dy``); a shape-specific row wins when the problem's
``(K, M)`` match. The rows come from a sweep of band width
(``grid_block_n``) and pipeline depth on an H200; add a row for a shape that the
default serves badly. Every config must keep ``block_m`` and ``block_k``
divisors of 128 (inputs are padded to a multiple of 128 rows).
"""

from __future__ import annotations

from jax_moe_dispatch.gemm.mosaic import TileConfig

__all__ = ["DEFAULT", "tile_config"]

DEFAULT = {
    "fwd": TileConfig(block_m=128, block_n=128, block_k=64, steps=4, grid_block_n=16),
    "dgrad": TileConfig(block_m=128, block_n=128, block_k=64, steps=6, grid_block_n=4),
    "wgrad": TileConfig(block_m=128, block_n=128, block_k=64, steps=4),
}

# (product, K, M) of x [N, K] @ w [G, K, M] -> TileConfig. From the H200 sweep of
# 2026-11-23 (skewed groups; BENCHMARKS.md).
_BY_SHAPE: dict[tuple[str, int, int], TileConfig] = {
    ("fwd", 4096, 1408): TileConfig(steps=5, grid_block_n=16),
    ("fwd", 7168, 2048): TileConfig(steps=4, grid_block_n=8),
    ("wgrad", 4096, 1408): TileConfig(steps=6),
}


def tile_config(product: str, k: int, m: int, dtype) -> TileConfig:
  """The tiles of ``product`` (``"fwd"``, ``"dgrad"``, ``"wgrad"``) for ``x [N, k] @ w [G, k, m]``."""
  del dtype  # bf16 and f16 share tiles.
  return _BY_SHAPE.get((product, k, m), DEFAULT[product])
