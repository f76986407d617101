"""FP8 (float8_e4m3fn) rows with one float32 scale per 128 columns, as DeepEP sends them."""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn
FP8_BLOCK = 128
_FP8_MAX = 448.0  # Largest finite float8_e4m3fn.


def quantize_fp8(x: jax.Array, block: int = FP8_BLOCK) -> tuple[jax.Array, jax.Array]:
  """Quantise ``[T, H]`` rows to ``(float8_e4m3fn [T, H], float32 scales [T, ceil(H / block)])``.

  Each block of ``block`` columns is scaled so that its largest magnitude maps
  to 448; ``dequantize_fp8`` inverts it up to FP8 rounding.
  """
  num_tokens, hidden = x.shape
  num_blocks = -(-hidden // block)
  padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, num_blocks * block - hidden)))
  blocks = padded.reshape(num_tokens, num_blocks, block)
  amax = jnp.max(jnp.abs(blocks), axis=-1)
  scales = jnp.where(amax > 0, amax / _FP8_MAX, 1.0).astype(jnp.float32)
  q = (blocks / scales[..., None]).astype(FP8_DTYPE)
  return q.reshape(num_tokens, num_blocks * block)[:, :hidden], scales


def dequantize_fp8(
    rows: jax.Array, scales: jax.Array, dtype=jnp.bfloat16, block: int = FP8_BLOCK
) -> jax.Array:
  """Inverse of :func:`quantize_fp8`: ``rows * scales`` broadcast over each block."""
  hidden = rows.shape[1]
  expanded = jnp.repeat(scales, block, axis=1)[:, :hidden]
  return (rows.astype(jnp.float32) * expanded).astype(dtype)
