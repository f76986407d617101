"""The reference backend: pure JAX collectives, runs on every platform.

This module is the executable specification of the layout described in
:mod:`jax_moe_dispatch.backends.base`. Each primitive has three steps:

1. *Layout*: positions by ``cumsum`` over tokens, counts exchanged with
   ``all_gather`` so every rank knows the whole ``[R, R]`` count matrix.
2. *Move*: every rank scatters its rows into ``R`` dense slots of ``T`` rows
   (slot ``d`` holds the list for rank ``d``, packed) and a dense
   ``jax.lax.all_to_all`` swaps the slots.
3. *Compact*: the receiver gathers the slots into the rank-major ``[M, ...]``
   buffer (dispatch), or the source gathers and sums (combine).

It moves ``R * T`` rows per rank whatever the routing, so it is slow on GPUs;
it is the default only where no native backend is available.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jax_moe_dispatch.backends.base import DispatchHandle


def send_positions(dest_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The local half of the layout: ``(send_pos_raw [T, R], counts [R])``.

  ``send_pos_raw[t, d]`` is the position of token ``t`` in the list sent to rank
  ``d`` (-1 where not sent), before any dropping; ``counts[d]`` is that list's
  length. Every backend exchanges ``counts`` and then calls
  :func:`layout_from_counts`.
  """
  mask = dest_mask.astype(jnp.int32)
  send_pos_raw = jnp.where(dest_mask, jnp.cumsum(mask, axis=0) - 1, -1)
  return send_pos_raw.astype(jnp.int32), mask.sum(axis=0).astype(jnp.int32)


def layout_from_counts(
    dest_mask: jax.Array,
    send_pos_raw: jax.Array,
    all_counts: jax.Array,
    me: jax.Array,
    *,
    max_recv: int,
) -> tuple[DispatchHandle, jax.Array]:
  """The layout once every rank's counts are known.

  Args:
    all_counts: ``[R(src), R(dst)]`` rows each source sends each destination.
    me: this rank's index on the axis.

  Returns:
    ``(handle, recv_start)``: ``handle.recv_token`` is left ``-1`` (dispatch
    fills it); ``recv_start`` ``[R]`` is the first row of each source's rows in
    this rank's receive buffer.
  """
  offsets = jnp.cumsum(all_counts, axis=0) - all_counts  # exclusive, over src.
  dest_offset = offsets[me]  # [R]: where my rows start at each destination.
  kept = dest_mask & (dest_offset[None, :] + send_pos_raw < max_recv)
  send_pos = jnp.where(kept, send_pos_raw, -1)
  recv_start = offsets[:, me]  # [R]: where each source's rows start here.
  recv_count = jnp.clip(max_recv - recv_start, 0, all_counts[:, me])
  handle = DispatchHandle(
      send_pos=send_pos.astype(jnp.int32),
      dest_offset=dest_offset.astype(jnp.int32),
      recv_count=recv_count.astype(jnp.int32),
      recv_token=jnp.full((max_recv,), -1, jnp.int32),
  )
  return handle, recv_start


def layout(
    dest_mask: jax.Array, *, axis_name: str, max_recv: int
) -> tuple[DispatchHandle, jax.Array, jax.Array]:
  """Compute the dispatch layout of one rank, counts exchanged by ``all_gather``.

  Returns:
    ``(handle, send_pos_raw, recv_start)`` (see :func:`send_positions` and
    :func:`layout_from_counts`).
  """
  send_pos_raw, counts = send_positions(dest_mask)
  all_counts = jax.lax.all_gather(counts, axis_name)  # [R(src), R(dst)].
  me = jax.lax.axis_index(axis_name)
  handle, recv_start = layout_from_counts(
      dest_mask, send_pos_raw, all_counts, me, max_recv=max_recv
  )
  return handle, send_pos_raw, recv_start


def _recv_rows(handle: DispatchHandle) -> tuple[jax.Array, jax.Array, jax.Array]:
  """For each receive row: (source rank, position in that source's list, valid)."""
  recv_end = jnp.cumsum(handle.recv_count)
  recv_start = recv_end - handle.recv_count
  rows = jnp.arange(handle.max_recv, dtype=jnp.int32)
  valid = rows < handle.num_recv
  # Rows are contiguous per source: row i belongs to the first source whose
  # rows end after i (empty sources end where they start and are skipped).
  src = jnp.sum(recv_end[None, :] <= rows[:, None], axis=1)
  src = jnp.minimum(src, handle.recv_count.shape[0] - 1)
  pos = rows - recv_start[src]
  return src.astype(jnp.int32), pos.astype(jnp.int32), valid


def _send_slots(rows: jax.Array, send_pos_raw: jax.Array, sliced: bool) -> jax.Array:
  """Scatter ``[T, ...]`` (or ``[T, R, ...]``) rows into ``[R, T, ...]`` packed slots."""
  num_tokens, num_ranks = send_pos_raw.shape
  tail = rows.shape[2:] if sliced else rows.shape[1:]
  slots = jnp.zeros((num_ranks, num_tokens) + tail, rows.dtype)
  dst = jnp.broadcast_to(jnp.arange(num_ranks)[None, :], send_pos_raw.shape)
  pos = jnp.where(send_pos_raw >= 0, send_pos_raw, num_tokens)  # out of bounds: dropped.
  src = rows if sliced else jnp.broadcast_to(
      rows[:, None], (num_tokens, num_ranks) + tail
  )
  return slots.at[dst, pos].set(src, mode="drop")


def _move(
    arrays: Sequence[jax.Array],
    sliced_flags: Sequence[bool],
    send_pos_raw: jax.Array,
    handle: DispatchHandle,
    axis_name: str,
) -> list[jax.Array]:
  src, pos, valid = _recv_rows(handle)
  out = []
  for a, is_sliced in zip(arrays, sliced_flags):
    slots = _send_slots(a, send_pos_raw, is_sliced)
    recv = jax.lax.all_to_all(slots, axis_name, 0, 0, tiled=True)
    recv = recv.reshape(slots.shape)
    if slots.shape[1] == 0:  # No source rows (T = 0): every receive row is padding.
      out.append(jnp.zeros(src.shape + slots.shape[2:], a.dtype))
      continue
    rows = recv[src, jnp.clip(pos, 0, slots.shape[1] - 1)]
    keep = valid.reshape((-1,) + (1,) * (rows.ndim - 1))
    out.append(jnp.where(keep, rows, jnp.zeros((), rows.dtype)))
  return out


class ReferenceBackend:
  """Pure-JAX backend (dense ``all_to_all``); the oracle for native backends."""

  name = "reference"

  def dispatch(
      self,
      dest_mask: jax.Array,
      payloads: Sequence[jax.Array],
      sliced: Sequence[jax.Array],
      *,
      axis_name: str,
      max_recv: int,
  ) -> tuple[list[jax.Array], list[jax.Array], DispatchHandle]:
    handle, send_pos_raw, _ = layout(dest_mask, axis_name=axis_name, max_recv=max_recv)
    num_tokens = dest_mask.shape[0]
    token_ids = jnp.arange(1, num_tokens + 1, dtype=jnp.int32)  # 0 marks padding.
    arrays = [token_ids, *payloads, *sliced]
    flags = [False] * (1 + len(payloads)) + [True] * len(sliced)
    moved = _move(arrays, flags, send_pos_raw, handle, axis_name)
    handle = DispatchHandle(
        send_pos=handle.send_pos,
        dest_offset=handle.dest_offset,
        recv_count=handle.recv_count,
        recv_token=moved[0] - 1,
    )
    return moved[1 : 1 + len(payloads)], moved[1 + len(payloads) :], handle

  def dispatch_cached(
      self,
      payloads: Sequence[jax.Array],
      handle: DispatchHandle,
      *,
      axis_name: str,
  ) -> list[jax.Array]:
    # Dropped rows come after every kept row of the same list (a list is only
    # cut at its end), so packing kept rows by handle.send_pos moves no kept row.
    return _move(payloads, [False] * len(payloads), handle.send_pos, handle, axis_name)

  def combine(
      self,
      rows: jax.Array,
      handle: DispatchHandle,
      *,
      axis_name: str,
  ) -> jax.Array:
    num_tokens, num_ranks = handle.send_pos.shape
    src, pos, valid = _recv_rows(handle)
    tail = rows.shape[1:]
    back = jnp.zeros((num_ranks, num_tokens) + tail, rows.dtype)
    back = back.at[jnp.where(valid, src, num_ranks), pos].set(rows, mode="drop")
    ret = jax.lax.all_to_all(back, axis_name, 0, 0, tiled=True).reshape(back.shape)
    # ret[d, j]: the row rank d sent back for my token at position j of my list to d.
    send_pos = handle.send_pos
    acc = jnp.zeros((num_tokens,) + tail, jnp.float32)
    for d in range(num_ranks):  # Ascending rank order: the summation order is part of the spec.
      p = send_pos[:, d]
      row = ret[d, jnp.clip(p, 0, num_tokens - 1)].astype(jnp.float32)
      keep = (p >= 0).reshape((-1,) + (1,) * len(tail))
      acc = acc + jnp.where(keep, row, 0.0)
    return acc.astype(rows.dtype)

