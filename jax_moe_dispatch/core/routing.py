"""Routing arguments: their checks (at trace time, naming the fix) and their conversions.

Shared by the ops (:mod:`jax_moe_dispatch.fused_a2a`) and the dispatcher
(:mod:`jax_moe_dispatch.token_dispatcher`), so that both accept and reject the
same inputs with the same words.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe_dispatch.core.fp8 import FP8_BLOCK, FP8_DTYPE

# A row payload: plain rows, or FP8 rows with their float32 block scales.
Rows = Union[jax.Array, tuple[jax.Array, jax.Array]]

__all__ = [
    "Rows",
    "axis_size",
    "check_combine_rows",
    "check_handle",
    "check_index_range",
    "check_positive_int",
    "check_rows",
    "check_topk_routing",
    "max_recv_rows",
    "num_local_experts",
    "topk_to_multihot",
]


def axis_size(axis_name: str) -> int:
  """The size of the bound mesh axis ``axis_name``; ``ValueError`` naming the fix if unbound."""
  try:
    return jax.lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound here. Fix: call this op inside "
        f"jax.shard_map(..., mesh=Mesh(devices, ({axis_name!r},)), ...) or "
        f"jax.pmap(..., axis_name={axis_name!r}) (for MoEFlexTokenDispatcher, "
        "config.ep_axis_name names the axis)."
    ) from e


def check_positive_int(name: str, value: object) -> int:
  """``value`` if it is a positive int (not a bool), else ``ValueError`` naming ``name``."""
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return value


def num_local_experts(num_experts: int, ep_size: int) -> int:
  """Experts per rank, ``num_experts / ep_size``; ``ValueError`` unless it divides."""
  check_positive_int("num_experts", num_experts)
  if num_experts % ep_size:
    raise ValueError(
        f"num_experts={num_experts} is not divisible by the expert-parallel size {ep_size}. "
        f"Fix: use a multiple of {ep_size} experts, or another axis size."
    )
  return num_experts // ep_size


def max_recv_rows(max_recv_tokens: Optional[int], rows_per_source: int, ep_size: int) -> int:
  """Receive-buffer rows: ``max_recv_tokens`` if given, else ``ep_size * rows_per_source``.

  ``ep_size * rows_per_source`` never drops a row when no source rank sends a
  destination more than ``rows_per_source`` rows (all ``T`` of its tokens, or
  fewer under a capacity factor).
  """
  if max_recv_tokens is None:
    return ep_size * rows_per_source
  return check_positive_int("max_recv_tokens", max_recv_tokens)


def check_rows(x: Rows, what: str) -> tuple[jax.Array, Optional[jax.Array]]:
  """Check a row payload to dispatch; returns ``(rows, scales or None)``.

  ``x`` is floating ``[T, H]`` rows, or an FP8 pair: ``float8_e4m3fn`` rows
  ``[T, H]`` and float32 scales ``[T, ceil(H / 128)]``.
  """
  if isinstance(x, (tuple, list)):
    if len(x) != 2:
      raise TypeError(f"{what} must be an array [T, H] or a pair (fp8 rows, scales), got {len(x)} items.")
    rows, scales = x
    if rows.dtype != FP8_DTYPE:
      raise TypeError(f"{what}: FP8 rows must be {FP8_DTYPE.__name__}, got {rows.dtype}.")
    if rows.ndim != 2:
      raise ValueError(f"{what}: rows must be [T, H], got shape {rows.shape}.")
    want = (rows.shape[0], -(-rows.shape[1] // FP8_BLOCK))
    if scales.shape != want or scales.dtype != jnp.float32:
      raise ValueError(
          f"{what}: scales must be float32 {want} (one per {FP8_BLOCK} columns), got "
          f"{scales.dtype}{scales.shape}. Use jax_moe_dispatch.quantize_fp8(x)."
      )
    return rows, scales
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise TypeError(f"{what} must be a jax.Array, got {type(x).__name__}.")
  if x.ndim != 2:
    raise ValueError(f"{what} must be [T, H], got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == FP8_DTYPE:
    raise TypeError(
        f"{what} must be floating (bf16/f16/f32), or an FP8 pair (rows, scales), got {x.dtype}. "
        "Fix: pass jax_moe_dispatch.quantize_fp8(x) for FP8."
    )
  return x, None


def check_combine_rows(x: jax.Array, num_rows: int, symbol: str, what: str = "x") -> None:
  """Check rows to combine: floating (bf16/f16/f32) ``[num_rows, H]``.

  ``symbol`` names the row count in the message (``"M"`` for a receive
  buffer, ``"N"`` for an expert-major one).
  """
  if x.ndim != 2 or x.shape[0] != num_rows:
    raise ValueError(
        f"{what} must be [{symbol}={num_rows}, H] (the layout the dispatch returned), got "
        f"shape {x.shape}."
    )
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == FP8_DTYPE:
    raise TypeError(f"{what} must be bf16/f16/f32 for combine, got {x.dtype}.")


def check_handle(handle: object, handle_type: type, op: str, dispatch_op: str) -> None:
  """Check that ``handle`` is a ``handle_type``: the handle of ``dispatch_op``, the pair of ``op``."""
  if not isinstance(handle, handle_type):
    raise TypeError(
        f"{op} needs the {handle_type.__name__} that {dispatch_op} returned, got "
        f"{type(handle).__name__}. Fix: pass the handle of the matching dispatch "
        "(fused_dispatch pairs with fused_combine, hybrid_ep_dispatch with hybrid_ep_combine).")


def check_topk_routing(token_indices: jax.Array, token_probs: jax.Array, num_tokens: int) -> None:
  """Check top-k routing arrays: int ``[T, K]`` indices and floating probs of the same shape."""
  if token_indices.ndim != 2 or token_indices.shape[0] != num_tokens:
    raise ValueError(f"token_indices must be [T={num_tokens}, K], got shape {token_indices.shape}.")
  if not jnp.issubdtype(token_indices.dtype, jnp.integer):
    raise TypeError(f"token_indices must be int32, got {token_indices.dtype}.")
  if token_probs.shape != token_indices.shape:
    raise ValueError(
        f"token_probs must have the shape of token_indices {token_indices.shape}, got {token_probs.shape}."
    )
  if not jnp.issubdtype(token_probs.dtype, jnp.floating):
    raise TypeError(f"token_probs must be floating, got {token_probs.dtype}.")


def check_index_range(token_indices: jax.Array, num_experts: int) -> None:
  """Check that constant indices lie in ``[-1, num_experts)`` (traced ones cannot be checked)."""
  try:
    values = np.asarray(token_indices)
  except jax.errors.TracerArrayConversionError:
    return
  if values.size and (values.max() >= num_experts or values.min() < -1):
    raise ValueError(
        f"token_indices must lie in [-1, {num_experts}); got values in "
        f"[{values.min()}, {values.max()}]."
    )


def topk_to_multihot(indices: jax.Array, values: jax.Array,
                     width: int) -> tuple[jax.Array, jax.Array]:
  """``[R, K]`` ids in ``[0, width)`` (-1: none) and their values -> ``[R, width]`` map and values.

  Returns ``(routing_map bool [R, width], dense [R, width])``: ``dense`` holds
  each id's value at its column and zero elsewhere. Ids of one row must be
  distinct.
  """
  num_rows = indices.shape[0]
  rows = jnp.arange(num_rows, dtype=jnp.int32)[:, None]
  cols = jnp.where(indices >= 0, indices, width)  # Out of bounds: dropped.
  routing_map = jnp.zeros((num_rows, width), jnp.bool_).at[rows, cols].set(True, mode="drop")
  dense = jnp.zeros((num_rows, width), values.dtype).at[rows, cols].set(values, mode="drop")
  return routing_map, dense
