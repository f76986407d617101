"""Local permutation of received rows into expert-major groups (no communication).

The layout: rows are grouped by local expert ``0..L-1``; group ``e`` holds
every received row routed to ``e``, in receive order (so by source rank, then
source token), and is padded with zero rows to a multiple of ``pad_multiple``.
The permuted buffer has a static ``num_rows``; rows that would land at or past
it are dropped (the last experts' last rows first). ``tokens_per_expert[e]`` is
the padded size of group ``e`` as written (clipped at ``num_rows``), ready for
:func:`jax.lax.ragged_dot`.

Every function here is differentiable. :func:`permute` and :func:`unpermute`
are each other's transposes (each the other's backward pass); unpermute's sum
runs in float32 in a fixed order, a row's experts in ascending order starting
from zero, and rounds once, so every backend gets the same bits (the native
HybridEP combine adds in the same order).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Permutation:
  """Where received rows go in the expert-major buffer.

  Attributes:
    perm_row: ``[M, L]`` int32: the permuted row of (receive row ``i``, local
      expert ``e``), or -1 where ``i`` is not routed to ``e`` or was dropped.
    src_row: ``[N]`` int32: the receive row each permuted row comes from, -1
      for padding rows.
    tokens_per_expert: ``[L]`` int32: rows of each group, padding included.
  """

  perm_row: jax.Array
  src_row: jax.Array
  tokens_per_expert: jax.Array

  @property
  def num_rows(self) -> int:
    return self.src_row.shape[0]


def max_permuted_rows(max_recv: int, num_local_experts: int, topk: int, pad_multiple: int) -> int:
  """Worst-case permuted rows: every received row on ``min(topk, L)`` experts, plus padding."""
  rows = max_recv * min(topk, num_local_experts)
  return rows + num_local_experts * (pad_multiple - 1)


def make_permutation(local_map: jax.Array, num_rows: int, pad_multiple: int = 1) -> Permutation:
  """Build the permutation from a received multi-hot map.

  Args:
    local_map: ``[M, L]`` bool, row ``i`` routed to local expert ``e``;
      padding rows must be all False.
    num_rows: ``N``, static rows of the permuted buffer.
    pad_multiple: group sizes are rounded up to a multiple of this.
  """
  num_recv, num_local = local_map.shape
  hits = local_map.astype(jnp.int32)
  counts = hits.sum(axis=0)
  padded = (counts + pad_multiple - 1) // pad_multiple * pad_multiple
  starts = jnp.cumsum(padded) - padded
  rank_in_group = jnp.cumsum(hits, axis=0) - 1
  perm_row = starts[None, :] + rank_in_group
  perm_row = jnp.where(local_map & (perm_row < num_rows), perm_row, -1).astype(jnp.int32)
  rows = jnp.broadcast_to(jnp.arange(num_recv, dtype=jnp.int32)[:, None], perm_row.shape)
  target = jnp.where(perm_row >= 0, perm_row, num_rows)
  src_row = jnp.full((num_rows,), -1, jnp.int32).at[target].set(rows, mode="drop")
  tokens_per_expert = jnp.clip(starts + padded, 0, num_rows) - jnp.clip(starts, 0, num_rows)
  return Permutation(perm_row, src_row, tokens_per_expert.astype(jnp.int32))


@jax.custom_vjp
def permute(rows: jax.Array, perm: Permutation) -> jax.Array:
  """``[M, ...]`` received rows -> ``[N, ...]`` expert-major rows (padding zero).

  Its backward pass is :func:`unpermute` (a float32 sum over each row's experts).
  """
  src = perm.src_row
  if rows.shape[0] == 0:  # Nothing received (T = 0): every permuted row is padding.
    return jnp.zeros(src.shape + rows.shape[1:], rows.dtype)
  out = rows[jnp.clip(src, 0)]
  keep = (src >= 0).reshape((-1,) + (1,) * (rows.ndim - 1))
  return jnp.where(keep, out, jnp.zeros((), rows.dtype))


def _permute_fwd(rows, perm):
  return permute(rows, perm), perm


def _permute_bwd(perm, g):
  return unpermute(g, perm, perm.perm_row.shape[0]), None


permute.defvjp(_permute_fwd, _permute_bwd)


def permute_values(values: jax.Array, perm: Permutation) -> jax.Array:
  """``[M, L]`` per-(row, expert) values -> ``[N]`` values of the permuted rows."""
  flat = jnp.zeros((perm.num_rows,), values.dtype)
  target = jnp.where(perm.perm_row >= 0, perm.perm_row, perm.num_rows)
  return flat.at[target].set(values, mode="drop")


def unpermute(rows: jax.Array, perm: Permutation, num_recv: int, dtype=None) -> jax.Array:
  """``[N, ...]`` expert-major rows -> ``[M, ...]``: each row summed over its experts.

  The sum runs in float32 over the row's experts in ascending order, starting
  from zero, and rounds once to ``dtype`` (default: that of ``rows``). Its
  backward pass is :func:`permute`.
  """
  return _unpermute(rows, perm, num_recv, np.dtype(rows.dtype if dtype is None else dtype),
                    np.dtype(rows.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _unpermute(rows, perm, num_recv, dtype, rows_dtype):
  del rows_dtype
  acc = jnp.zeros((num_recv,) + rows.shape[1:], jnp.float32)
  perm_row = perm.perm_row
  if rows.shape[0] == 0 or perm_row.shape[1] == 0:  # No permuted rows: nothing to sum.
    return acc.astype(dtype)
  # slots[i, k]: the permuted row of row i's k-th expert (ascending), -1 past its last.
  routed = perm_row >= 0
  slot = jnp.where(routed, jnp.cumsum(routed, axis=1) - 1, perm_row.shape[1])
  recv = jnp.broadcast_to(jnp.arange(num_recv, dtype=jnp.int32)[:, None], perm_row.shape)
  slots = jnp.full(perm_row.shape, -1, jnp.int32).at[recv, slot].set(perm_row, mode="drop")
  trailing = (1,) * (rows.ndim - 1)
  # Zeros typed like the inputs (varying over the mesh axes they vary over, as
  # the loop's carry must be under shard_map).
  acc = acc + (rows[:0].astype(jnp.float32).sum() + slots[:0].sum().astype(jnp.float32))

  def add(k, acc):
    src = jax.lax.dynamic_index_in_dim(slots, k, axis=1, keepdims=False)
    row = rows[jnp.clip(src, 0)].astype(jnp.float32)
    return acc + jnp.where((src >= 0).reshape((-1,) + trailing), row, 0.0)

  acc = jax.lax.fori_loop(0, routed.sum(axis=1).max(initial=0), add, acc)
  return acc.astype(dtype)


def _unpermute_fwd(rows, perm, num_recv, dtype, rows_dtype):
  return _unpermute(rows, perm, num_recv, dtype, rows_dtype), perm


def _unpermute_bwd(num_recv, dtype, rows_dtype, perm, g):
  del num_recv, dtype
  return permute(g, perm).astype(rows_dtype), None


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def unpermute_values(values: jax.Array, perm: Permutation) -> jax.Array:
  """``[N]`` values -> ``[M, L]`` at each (row, expert), 0 where unrouted."""
  got = values[jnp.clip(perm.perm_row, 0)]
  return jnp.where(perm.perm_row >= 0, got, jnp.zeros((), values.dtype))


def group_by_expert(rows: Any, local_map: jax.Array, local_probs: jax.Array, num_rows: int,
                    pad_multiple: int = 1) -> tuple[Any, jax.Array, Permutation]:
  """Permute received rows and their per-expert probabilities into expert-major groups.

  Args:
    rows: ``[M, ...]`` received rows, or a pytree of them (e.g. FP8 rows and
      their scales); each is permuted the same way.
    local_map: ``[M, L]`` bool, row ``i`` routed to local expert ``e``.
    local_probs: ``[M, L]`` weight of (row, expert); read only where routed.
    num_rows: ``N``, static rows of the permuted buffer.
    pad_multiple: group sizes are rounded up to a multiple of this.

  Returns:
    ``(permuted rows [N, ...], permuted probs [N], permutation)``.
  """
  perm = make_permutation(local_map, num_rows, pad_multiple)
  return jax.tree.map(lambda a: permute(a, perm), rows), permute_values(local_probs, perm), perm
