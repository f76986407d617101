"""Local permutation of received rows into expert-major groups (no communication).

The layout: rows are grouped by local expert ``0..L-1``; group ``e`` holds
every received row routed to ``e``, in receive order (so by source rank, then
source token), and is padded with zero rows to a multiple of ``pad_multiple``.
The permuted buffer has a static ``num_rows``; rows that would land at or past
it are dropped (the last experts' last rows first). ``tokens_per_expert[e]`` is
the padded size of group ``e`` as written (clipped at ``num_rows``), ready for
:func:`jax.lax.ragged_dot`.

Every function here is differentiable. :func:`permute` and :func:`unpermute`
are each other's transposes; both sums (unpermute's, and so permute's
backward pass) run in float32 over a row's experts in ascending local-expert
order, so a row routed to several experts rounds once and the result is the
same bits on every run. Both are gathers (no scatter-add): unpermute reads, for
each receive row, its at most ``K`` permuted rows (:attr:`Permutation.expert_rows`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp


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
    expert_rows: ``[M, K]`` int32: the permuted rows of receive row ``i`` in
      ascending local-expert order, then -1; ``K`` bounds the experts of one
      row (``min(topk, L)``).
  """

  perm_row: jax.Array
  src_row: jax.Array
  tokens_per_expert: jax.Array
  expert_rows: jax.Array

  @property
  def num_rows(self) -> int:
    return self.src_row.shape[0]


def max_permuted_rows(max_recv: int, num_local_experts: int, topk: int, pad_multiple: int) -> int:
  """Worst-case permuted rows: every received row on ``min(topk, L)`` experts, plus padding."""
  rows = max_recv * min(topk, num_local_experts)
  return rows + num_local_experts * (pad_multiple - 1)


def make_permutation(local_map: jax.Array, num_rows: int, pad_multiple: int = 1,
                     max_experts_per_row: Optional[int] = None) -> Permutation:
  """Build the permutation from a received multi-hot map.

  Args:
    local_map: ``[M, L]`` bool, row ``i`` routed to local expert ``e``;
      padding rows must be all False.
    num_rows: ``N``, static rows of the permuted buffer.
    pad_multiple: group sizes are rounded up to a multiple of this.
    max_experts_per_row: ``K``, most local experts one row keeps (the
      router's top-k; default ``L``): a row routed to more keeps its ``K``
      smallest local experts, the others are dropped like rows past
      ``num_rows``. It sizes :attr:`Permutation.expert_rows`, so
      :func:`unpermute` reads ``K`` rows per receive row.
  """
  num_recv, num_local = local_map.shape
  k = num_local if max_experts_per_row is None else max(1, min(max_experts_per_row, num_local))
  if k < num_local:
    local_map = local_map & (jnp.cumsum(local_map.astype(jnp.int32), axis=1) <= k)
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
  return Permutation(perm_row, src_row, tokens_per_expert.astype(jnp.int32),
                     expert_rows_of(perm_row, k))


def expert_rows_of(perm_row: jax.Array, max_experts_per_row: Optional[int] = None) -> jax.Array:
  """:attr:`Permutation.expert_rows` from ``perm_row [M, L]``: each row's kept permuted rows,
  ascending by local expert, then -1 (``K = max_experts_per_row``, default ``L``; a row
  must keep at most ``K``)."""
  num_local = perm_row.shape[1]
  k = num_local if max_experts_per_row is None else max(1, min(max_experts_per_row, num_local))
  # The k smallest experts with a kept row, ascending (top_k of L - e over the kept ones).
  key = jnp.where(perm_row >= 0, num_local - jnp.arange(num_local, dtype=jnp.int32), 0)
  _, order = jax.lax.top_k(key, k)
  return jnp.take_along_axis(perm_row, order.astype(jnp.int32), axis=1)


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


# Up to this many experts per row, unpermute is K gathers fused into one pass; above, a loop
# over a row's experts that stops after the most any row has.
_MAX_UNROLLED = 8


def unpermute(rows: jax.Array, perm: Permutation, num_recv: int, dtype=None) -> jax.Array:
  """``[N, ...]`` expert-major rows -> ``[M, ...]``: each row summed over its experts in float32.

  The sum runs in float32 over the row's experts in ascending local-expert
  order, starting from zero, and rounds once to ``dtype`` (default: that of
  ``rows``): the same bits on every run and every backend (the native HybridEP
  combine adds in the same order). With ``K = expert_rows.shape[1] <= 8`` (a
  top-k bound) the ``K`` gathers fuse into one pass; otherwise a loop runs as
  many gathers as the most experts any row has. Its backward pass is
  :func:`permute` (a gather, never a scatter-add).
  """
  return _unpermute(rows, perm, num_recv, None if dtype is None else jnp.dtype(dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _unpermute(rows: jax.Array, perm: Permutation, num_recv: int, dtype) -> jax.Array:
  out_dtype = rows.dtype if dtype is None else dtype
  expert_rows = perm.expert_rows
  if expert_rows.shape[0] != num_recv:
    raise ValueError(f"unpermute: the permutation has {expert_rows.shape[0]} receive rows, "
                     f"num_recv={num_recv}.")
  if rows.shape[0] == 0:  # No permuted rows: every receive row sums nothing.
    return jnp.zeros((num_recv,) + rows.shape[1:], out_dtype)
  bcast = (-1,) + (1,) * (rows.ndim - 1)
  acc = jnp.zeros((num_recv,) + rows.shape[1:], jnp.float32)

  def add(j, acc):  # The j-th expert of every row (ascending local expert: a fixed order).
    idx = jax.lax.dynamic_index_in_dim(expert_rows, j, axis=1, keepdims=False)
    got = rows[jnp.clip(idx, 0)].astype(jnp.float32)
    return acc + jnp.where((idx >= 0).reshape(bcast), got, 0.0)

  if expert_rows.shape[1] <= _MAX_UNROLLED:
    for j in range(expert_rows.shape[1]):
      acc = add(j, acc)
  else:
    # Zeros typed like the inputs (varying over the mesh axes they vary over, as the loop's
    # carry must be under shard_map).
    acc = acc + (rows[:0].astype(jnp.float32).sum() + expert_rows[:0].sum().astype(jnp.float32))
    acc = jax.lax.fori_loop(0, (expert_rows >= 0).sum(axis=1).max(initial=0), add, acc)
  return acc.astype(out_dtype)


def _unpermute_fwd(rows, perm, num_recv, dtype):
  return _unpermute(rows, perm, num_recv, dtype), (perm, jnp.zeros((0,), rows.dtype))


def _unpermute_bwd(num_recv, dtype, res, g):
  perm, like = res
  return permute(g.astype(like.dtype), perm), None


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)


def unpermute_values(values: jax.Array, perm: Permutation) -> jax.Array:
  """``[N]`` values -> ``[M, L]`` at each (row, expert), 0 where unrouted."""
  got = values[jnp.clip(perm.perm_row, 0)]
  return jnp.where(perm.perm_row >= 0, got, jnp.zeros((), values.dtype))


def group_by_expert(rows: Any, local_map: jax.Array, local_probs: jax.Array, num_rows: int,
                    pad_multiple: int = 1, max_experts_per_row: Optional[int] = None,
                    ) -> tuple[Any, jax.Array, Permutation]:
  """Permute received rows and their per-expert probabilities into expert-major groups.

  Args:
    rows: ``[M, ...]`` received rows, or a pytree of them (e.g. FP8 rows and
      their scales); each is permuted the same way.
    local_map: ``[M, L]`` bool, row ``i`` routed to local expert ``e``.
    local_probs: ``[M, L]`` weight of (row, expert); read only where routed.
    num_rows: ``N``, static rows of the permuted buffer.
    pad_multiple: group sizes are rounded up to a multiple of this.
    max_experts_per_row: most local experts one row is routed to
      (:func:`make_permutation`).

  Returns:
    ``(permuted rows [N, ...], permuted probs [N], permutation)``.
  """
  perm = make_permutation(local_map, num_rows, pad_multiple, max_experts_per_row)
  return jax.tree.map(lambda a: permute(a, perm), rows), permute_values(local_probs, perm), perm
