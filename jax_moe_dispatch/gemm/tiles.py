"""Tile sizes of the grouped-GEMM kernels, per product and shape.

One default per product (``"fwd"``: ``x @ w``, ``"dgrad"``: ``dy @ w.T``,
``"wgrad"``: ``x.T @ dy``); a shape-specific row wins when the problem's
``(K, M)`` match. The defaults use two consumer warpgroups
(``consumers=2``, ``2 x block_n`` columns per tile) wherever the output width
is a multiple of ``2 x block_n`` or wide enough that a last half-width band
wastes little (at least 1024 columns, e.g. 1408), else one; the wgrad runs two
one-consumer thread blocks per SM, and two consumers from ``K = 7168`` on (its
output is ``[K, M]`` per group). The rows come
from sweeps of band width (``grid_block_n``), pipeline depth and consumers on
an H200; add a row for a shape that the default serves badly. Every config
must keep ``block_m`` and ``block_k`` divisors of 128 (inputs are padded to a
multiple of 128 rows).
"""

from __future__ import annotations

from jax_moe_dispatch.gemm.mosaic import TileConfig

__all__ = ["DEFAULT", "tile_config"]

# Two consumer warpgroups (TileConfig.consumers) where the output width is a
# multiple of 2 x block_n or at least _HALF_BAND_MIN_COLS; one otherwise.
DEFAULT = {
    "fwd": TileConfig(block_m=128, block_n=128, block_k=64, steps=4, grid_block_n=4, consumers=2),
    "dgrad": TileConfig(block_m=128, block_n=128, block_k=64, steps=4, grid_block_n=4,
                        consumers=2),
    "wgrad": TileConfig(block_m=128, block_n=128, block_k=64, steps=3, blocks_per_sm=2),
}
# From this output width on, a width that is an odd multiple of block_n still takes two
# consumers: the last band's idle half is at most 1/9 of the columns (1408 = 5.5 bands
# of 256 ran 1.20x faster than one consumer on the H200).
_HALF_BAND_MIN_COLS = 1024
_ONE_CONSUMER = {
    "fwd": TileConfig(block_m=128, block_n=128, block_k=64, steps=4, grid_block_n=16),
    "dgrad": TileConfig(block_m=128, block_n=128, block_k=64, steps=6, grid_block_n=4),
}

# The wgrad's output tiles are [K, M] per group. Two one-consumer thread blocks per SM (three
# stages each) beat one block with six stages and the two-consumer wgrad up to K = 4096; the
# two-consumer one wins at K = 7168 (H200, skewed groups, 2026-11-24, us: one block / two
# blocks / two consumers: 140 / 133 / - at K=2048, M=1024, G=16; 1197 / 1062 / - at K=1408,
# M=4096, G=64 (the MoE layer's down projection); 1152 / 1006 / 1093 at K=4096, M=1408, G=64;
# 3217 / 3129 / 2799 at K=7168, M=2048, G=32). Between 4096 and 7168 it was not measured.
# Three stages fill the two-consumer one's shared memory (x, dy, each consumer's masked x
# copy, the staging).
_WS_WGRAD_MIN_K = 7168
_WS_WGRAD = TileConfig(block_m=128, block_n=128, block_k=64, steps=3, consumers=2)

# (product, K, M) of x [N, K] @ w [G, K, M] -> TileConfig. From the H200 sweeps of
# 2026-11-23 (skewed groups; BENCHMARKS.md).
_BY_SHAPE: dict[tuple[str, int, int], TileConfig] = {
    ("fwd", 4096, 1408): TileConfig(steps=4, grid_block_n=6, consumers=2),
    ("dgrad", 4096, 1408): TileConfig(steps=4, grid_block_n=8, consumers=2),
}


def tile_config(product: str, k: int, m: int, dtype) -> TileConfig:
  """The tiles of ``product`` (``"fwd"``, ``"dgrad"``, ``"wgrad"``) for ``x [N, k] @ w [G, k, m]``."""
  del dtype  # bf16 and f16 share tiles.
  if (product, k, m) in _BY_SHAPE:
    return _BY_SHAPE[(product, k, m)]
  if product == "wgrad" and k >= _WS_WGRAD_MIN_K:
    return _WS_WGRAD
  cfg = DEFAULT[product]
  out_cols = k if product == "dgrad" else m
  if (cfg.consumers > 1 and out_cols % (cfg.block_n * cfg.consumers)
      and out_cols < _HALF_BAND_MIN_COLS):
    return _ONE_CONSUMER[product]
  return cfg
