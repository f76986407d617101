"""How many staging bytes the native ops need when an expert axis spans processes.

When a group's ranks live in different processes, every native call first
copies the arrays its peers read into the rank's CUDA-IPC-exported staging
buffer (:mod:`jax_moe_dispatch.backends.buffer`). This module lists, per op,
the byte sizes of those arrays, in the handlers' terms (``ffi/handlers.cc``,
``ffi/hybrid_handlers.cc``); the extension's ``staged_bytes`` (the handlers' own
rule: each array at a 256-byte aligned offset) turns a list into the bytes the
handler reserves. One process driving a whole group stages nothing.

A traced op asks for the largest need of its *round trip*, the ops a training
step runs on arrays of the same sizes (the op, its partner, their backward
passes), so that a forward and backward pass of a new size grows the buffer
once. Every function is pure; sizes are in bytes, shapes in elements.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

__all__ = [
    "combine",
    "dispatch",
    "hybrid_combine",
    "hybrid_dispatch",
    "hybrid_ep_buffer",
    "hybrid_round_trip",
    "max_permuted_rows",
    "round_trip",
    "summed_row_bytes",
]

# Bytes of one int32 (send lists, perm_row) and of one bool (routing map).
_I32 = 4
_BOOL = 1

StagedBytes = Callable[[Sequence[int]], int]


def dispatch(num_tokens: int, num_ranks: int, inputs: Sequence[int]) -> list[int]:
  """``jmd_dispatch``, ``jmd_dispatch_cached`` and ``jmd_hybrid_dispatch_cached``.

  The send lists ``[R, T]`` int32, then each input array (``inputs``: their
  byte sizes, ``[T, ...]`` payloads or ``[T, R, ...]`` slices).
  """
  return [num_tokens * num_ranks * _I32, *inputs]


def combine(rows: int) -> list[int]:
  """``jmd_combine``: its ``[M, ...]`` rows (``rows`` bytes)."""
  return [rows]


def hybrid_dispatch(num_tokens: int, num_ranks: int, num_local: int, inputs: Sequence[int],
                    prob_itemsize: int) -> list[int]:
  """``jmd_hybrid_dispatch``: the send lists, the rows (and FP8 scales), the ``[T, R, L]`` map
  (bool) and probabilities."""
  routed = num_tokens * num_ranks * num_local
  return dispatch(num_tokens, num_ranks, inputs) + [routed * _BOOL, routed * prob_itemsize]


def hybrid_combine(rows: int, max_recv: int, num_local: int) -> list[int]:
  """``jmd_hybrid_combine``: its ``[N, ...]`` permuted rows and ``perm_row [M, L]`` int32."""
  return [rows, max_recv * num_local * _I32]


def summed_row_bytes(row_elements: int, itemsize: int) -> int:
  """Bytes of a row that a combine sums: at least 2 per element (FP8 rows come back wider)."""
  return row_elements * max(itemsize, 2)


def round_trip(num_tokens: int, num_ranks: int, max_recv: int, inputs: Sequence[int],
               summed_row: int) -> list[list[int]]:
  """Every op of a dispatch + combine of these sizes and their backward passes.

  Args:
    num_tokens, num_ranks, max_recv: ``T``, ``R``, ``M``.
    inputs: byte sizes of the dispatch's input arrays.
    summed_row: bytes of one row the combine sums (and its backward moves).

  Returns:
    what each op stages: the dispatch; the combine of ``[M]`` rows (also the
    dispatch's backward); the cached dispatch of ``[T]`` rows (the combine's
    backward).
  """
  return [dispatch(num_tokens, num_ranks, inputs), combine(max_recv * summed_row),
          dispatch(num_tokens, num_ranks, [num_tokens * summed_row])]


def hybrid_round_trip(num_tokens: int, num_ranks: int, num_local: int, max_recv: int,
                      num_rows: int, inputs: Sequence[int], summed_row: int,
                      prob_itemsize: int) -> list[list[int]]:
  """Every op of a hybrid dispatch + combine of these sizes and their backward passes.

  Args:
    num_tokens, num_ranks, num_local, max_recv, num_rows: ``T``, ``R``, ``L``,
      ``M`` and ``N`` (permuted rows).
    inputs: byte sizes of the dispatch's row arrays (rows, FP8 scales).
    summed_row: bytes of one permuted row the combine sums.
    prob_itemsize: bytes of one routing probability.

  Returns:
    what each op stages: the hybrid dispatch; the hybrid combine of ``[N]``
    rows (also the dispatch's backward for the rows); the combine of the
    probabilities' cotangent ``[M, L]`` (the dispatch's backward for them);
    the cached hybrid dispatch of ``[T]`` rows (the combine's backward).
  """
  return [hybrid_dispatch(num_tokens, num_ranks, num_local, inputs, prob_itemsize),
          hybrid_combine(num_rows * summed_row, max_recv, num_local),
          combine(max_recv * num_local * prob_itemsize),
          dispatch(num_tokens, num_ranks, [num_tokens * summed_row])]


def max_permuted_rows(max_recv: int, num_local: int, topk: int, pad_multiple: int) -> int:
  """:func:`jax_moe_dispatch.core.permute.max_permuted_rows`, which ``backends/`` cannot import."""
  return max_recv * min(topk, num_local) + num_local * (pad_multiple - 1)


def hybrid_ep_buffer(staged_bytes: StagedBytes, *, hidden_dim: int, max_num_tokens: int,
                     num_local: int, num_ranks: int, fp8_dispatch: bool, topk: int,
                     pad_multiple: int) -> int:
  """Staging bytes :func:`~jax_moe_dispatch.init_hybrid_ep_buffer` sets up.

  With ``T = max_num_tokens``, ``R = num_ranks``, ``L = num_local``,
  ``H = hidden_dim``, ``M = R * T`` receive rows and the worst case of
  ``N = M * min(topk, L) + L * (pad_multiple - 1)`` permuted rows: the
  largest need of :func:`hybrid_round_trip`, i.e. the maximum of

  * dispatch: ``[R, T]`` int32 lists, ``[T, H]`` bf16 rows (FP8: one byte per
    value plus ``[T, ceil(H / 128)]`` float32 scales), the ``[T, R, L]`` bool
    map and float32 probabilities;
  * combine: ``[N, H]`` bf16 rows and ``[M, L]`` int32 ``perm_row``;
  * the probabilities' gradient: ``[M, L]`` float32;
  * the combine's backward: ``[R, T]`` int32 lists and ``[T, H]`` bf16 rows;

  each array counted at ``staged_bytes``'s alignment (256 bytes).
  """
  t, h = max_num_tokens, hidden_dim
  inputs = [t * h, t * math.ceil(h / 128) * 4] if fp8_dispatch else [t * h * 2]
  max_recv = num_ranks * t
  num_rows = max_permuted_rows(max_recv, num_local, topk, pad_multiple)
  ops = hybrid_round_trip(t, num_ranks, num_local, max_recv, num_rows, inputs,
                          summed_row_bytes(h, 2), 4)
  return max(staged_bytes(op) for op in ops)
