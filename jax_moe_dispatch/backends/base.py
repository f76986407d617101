"""The contract every dispatch backend implements.

A backend moves rows between the ranks of one expert-parallel axis. It knows
nothing about experts: the public ops in :mod:`jax_moe_dispatch.fused_a2a`
turn routing decisions into a *destination mask*, payloads and
per-destination slices, call a backend through :mod:`jax_moe_dispatch.core.transport`
(which makes the primitives differentiable), and turn the result back into
expert terms. So the three primitives below are the whole surface a backend
(reference or native) must provide, and they are called per rank, inside
``shard_map``/``pmap``, with ``axis_name`` bound.

Notation, per rank: ``T`` tokens, ``R`` ranks on the axis, ``me`` this rank's
index on the axis, ``M`` (``max_recv``) the static row count of a receive
buffer.

Layout (identical in every backend, bit for bit)
-------------------------------------------------
* Source rank ``s`` sends token ``t`` to rank ``d`` iff ``dest_mask[t, d]``.
  The tokens ``s`` sends to ``d`` form a list in token order; token ``t`` is at
  position ``send_pos_raw[t, d]`` of it (``cumsum`` along tokens, minus one).
* Rank ``d`` receives rank-major: the rows from source 0 first, then source 1,
  ..., each source's rows in its list order. So the row of ``(s, t)`` in ``d``'s
  buffer is ``offset[s, d] + send_pos_raw[t, d]`` where
  ``offset[s, d] = sum(count[s', d] for s' < s)``.
* A row whose index would be ``>= M`` is *dropped*: never written, contributes
  nothing to combine, gets no gradient. Rank-major order makes the drop
  deterministic: the highest source ranks' last tokens go first.
* Received rows ``[num_recv, M)`` are zero in every payload.

Handle
------
:class:`DispatchHandle` carries what combine and cached dispatch need. It is
plain data (a pytree of int32 arrays), returned by dispatch and passed back.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchHandle:
  """Routing metadata of one dispatch, per rank; every field is int32.

  Attributes:
    send_pos: ``[T, R]``. On the source rank: the position of token ``t`` in
      the list sent to rank ``d``, or -1 if ``t`` was not sent to ``d`` or its
      row was dropped at ``d`` (index ``>= M``).
    dest_offset: ``[R]``. On the source rank: the row at which this rank's
      tokens start in rank ``d``'s receive buffer (``offset[me, d]``).
    recv_count: ``[R]``. On the receiving rank: how many rows it kept from each
      source rank (after dropping). Rows from source ``s`` occupy
      ``[sum(recv_count[:s]), sum(recv_count[:s+1]))``.
    recv_token: ``[M]``. On the receiving rank: the source token index of each
      received row, -1 for padding rows.
  """

  send_pos: jax.Array
  dest_offset: jax.Array
  recv_count: jax.Array
  recv_token: jax.Array

  @property
  def num_tokens(self) -> int:
    """``T``: tokens per rank on the source side."""
    return self.send_pos.shape[0]

  @property
  def max_recv(self) -> int:
    """``M``: the static row count of the receive buffer."""
    return self.recv_token.shape[0]

  @property
  def num_recv(self) -> jax.Array:
    """Scalar int32: how many rows of the receive buffer are real."""
    return self.recv_count.sum()


class Backend(Protocol):
  """The three primitives of a dispatch backend (see the module docstring).

  All are called per rank inside ``shard_map``/``pmap`` with ``axis_name``
  bound. None of them may synchronise with the host.
  """

  name: str

  def dispatch(
      self,
      dest_mask: jax.Array,
      payloads: Sequence[jax.Array],
      sliced: Sequence[jax.Array],
      *,
      axis_name: str,
      max_recv: int,
  ) -> tuple[list[jax.Array], list[jax.Array], DispatchHandle]:
    """Compute the layout and move rows to their destinations.

    Args:
      dest_mask: ``[T, R]`` bool, which ranks each token goes to.
      payloads: arrays ``[T, ...]``; the receiver gets row ``t`` unchanged
        (bitwise; any dtype, fp8 included).
      sliced: arrays ``[T, R, ...]``; rank ``d`` receives ``a[t, d]``, its own
        slice (used for routing metadata that is local to each destination).
      axis_name: the expert-parallel axis.
      max_recv: ``M``, the static number of receive rows.

    Returns:
      ``(recv_payloads, recv_sliced, handle)``: each received array is
      ``[M, ...]`` in the rank-major layout with zero padding rows.
    """
    ...

  def dispatch_cached(
      self,
      payloads: Sequence[jax.Array],
      handle: DispatchHandle,
      *,
      axis_name: str,
  ) -> list[jax.Array]:
    """Move ``[T, ...]`` rows along an earlier dispatch's layout.

    Returns ``[M, ...]`` arrays, bit-identical to what :meth:`dispatch` would
    give for the same mask. This is combine's backward pass.
    """
    ...

  def combine(
      self,
      rows: jax.Array,
      handle: DispatchHandle,
      *,
      axis_name: str,
  ) -> jax.Array:
    """Send received rows back to their source and sum them there.

    Args:
      rows: ``[M, ...]`` floating, in the receive layout of ``handle``; padding
        and dropped rows are ignored.
      handle: read are ``send_pos`` and ``dest_offset`` (and ``recv_count``,
        ``max_recv``). ``send_pos`` may have more rows than the dispatch had
        tokens: the backward pass of slices passes ``[T * R, R]``, each row
        sent to one destination, to get every (token, destination) row back
        unsummed.

    Returns:
      ``[T, ...]`` with the dtype of ``rows``: for each source token, the sum
      over the ranks it was sent to of the row that rank sent back, accumulated
      in float32. Tokens sent nowhere get zeros. This is dispatch's backward
      pass.
    """
    ...
