"""Tile sizes of the grouped-GEMM kernels, per product and shape.

One entry per product (``"fwd"``: ``x @ w``, ``"dgrad"``: ``dy @ w.T``,
``"wgrad"``: ``x.T @ dy``) with the default below; a shape-specific row wins
when its ``(reduction, output)`` sizes match. Entries come from the tile sweep
``python -m jax_moe_dispatch.bench --suite gemm --sweep-tiles`` on an H200
(BENCHMARKS.md lists the run); add a row for a shape that the default serves
badly. Every config must keep ``block_m`` a divisor of 128 (row padding) and
``block_k`` a divisor of 128.
"""

from __future__ import annotations

from jax_moe_dispatch.gemm.mosaic import TileConfig

__all__ = ["DEFAULT", "tile_config"]

DEFAULT = {
    "fwd": TileConfig(block_m=128, block_n=128, block_k=64, steps=4),
    "dgrad": TileConfig(block_m=128, block_n=128, block_k=64, steps=4),
    "wgrad": TileConfig(block_m=128, block_n=128, block_k=64, steps=4),
}

# (product, reduction size, output size) -> TileConfig.
_BY_SHAPE: dict[tuple[str, int, int], TileConfig] = {}


def tile_config(product: str, reduction: int, output: int, dtype) -> TileConfig:
  """The tiles for ``product`` with ``reduction`` (contracted) and ``output`` (columns) sizes."""
  del dtype  # bf16 and f16 share tiles.
  return _BY_SHAPE.get((product, reduction, output), DEFAULT[product])
