"""Differentiable HybridEP transport: dispatch fused with permute, combine with unpermute.

:func:`dispatch` moves each token's rows straight into the receiving ranks'
expert-major permuted buffers (:mod:`jax_moe_dispatch.core.permute` gives the
layout) and :func:`combine` brings permuted rows straight back to their source
tokens. They form one ``custom_vjp`` pair, each the other's backward pass:

* the cotangent of the permuted rows goes back with a hybrid :func:`combine`;
* the cotangent of the permuted probabilities goes back unsummed, one value per
  (token, rank, local expert), with the per-destination combine of
  :mod:`jax_moe_dispatch.core.transport`;
* the cotangent of a combine is dispatched along the cached layout and
  permutation.

Which code runs is the backend's choice. A backend with fused kernels (the
native one: ``hybrid_dispatch``, ``hybrid_dispatch_cached`` and
``hybrid_combine``) runs them; any other runs the specification below, its
plain dispatch followed by :func:`permute.group_by_expert`, and
:func:`permute.unpermute` followed by its combine. Both give the same bits:

* dispatch: rows, probabilities, ``tokens_per_expert``, the dispatch handle and
  the permutation, padding rows zero, dropped rows as ``permute`` documents;
* combine: per token, for each rank it went to in ascending rank order, the
  float32 sum of its rows there in ascending local-expert order (each sum
  starting from zero), added to the token's float32 total (starting from
  zero), rounded once to the rows' dtype.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe_dispatch.backends import DispatchHandle
from jax_moe_dispatch.core import permute as _perm
from jax_moe_dispatch.core.transport import Transport, per_destination_combine, summing_combine

__all__ = ["combine", "dispatch"]

# Row dtypes the fused combine sums; others are summed as float32 and cast back.
_SUMMED = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


def dispatch(
    dest_mask: jax.Array,
    payloads: Sequence[jax.Array],
    local_map: jax.Array,
    local_probs: jax.Array,
    transport: Transport,
    max_recv: int,
    num_rows: int,
    pad_multiple: int,
) -> tuple[tuple[jax.Array, ...], jax.Array, DispatchHandle, _perm.Permutation]:
  """Dispatch ``[T, ...]`` payloads into every destination's permuted buffer.

  Args:
    dest_mask: ``[T, R]`` bool, ``local_map.any(-1)``.
    payloads: ``[T, ...]`` rows (and FP8 scales), permuted alike.
    local_map: ``[T, R, L]`` bool: token ``t`` goes to local expert ``e`` of rank ``d``.
    local_probs: ``[T, R, L]`` floating weights (read where routed).
    transport: the static transport.
    max_recv: ``M``, rows of the receive layout (a bound: rows past it drop).
    num_rows: ``N``, rows of the permuted buffer.
    pad_multiple: groups are padded to a multiple of this.

  Returns:
    ``(permuted payloads [N, ...], permuted probs [N], handle, permutation)``.
  """
  return _dispatch(dest_mask, tuple(payloads), local_map, local_probs, transport, max_recv,
                   num_rows, pad_multiple)


def combine(rows: jax.Array, handle: DispatchHandle, perm: _perm.Permutation,
            transport: Transport) -> jax.Array:
  """``[N, ...]`` permuted rows -> ``[T, ...]`` tokens, summed as the module docstring says."""
  return _combine(rows, handle, perm, transport, np.dtype(rows.dtype))


def _fused(backend) -> bool:
  return hasattr(backend, "hybrid_dispatch")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _dispatch(dest_mask, payloads, local_map, local_probs, transport, max_recv, num_rows, pad):
  return _dispatch_fwd(dest_mask, payloads, local_map, local_probs, transport, max_recv, num_rows,
                       pad)[0]


def _dispatch_fwd(dest_mask, payloads, local_map, local_probs, transport, max_recv, num_rows, pad):
  backend = transport.backend()
  axis = transport.axis_name
  if _fused(backend):
    permuted, probs, handle, (perm_row, src_row, tpe) = backend.hybrid_dispatch(
        dest_mask, list(payloads), local_map, local_probs, axis_name=axis, max_recv=max_recv,
        num_rows=num_rows, pad_multiple=pad)
    perm = _perm.Permutation(perm_row, src_row, tpe, _perm.expert_rows_of(perm_row))
  else:
    recv, (recv_map, recv_probs), handle = backend.dispatch(
        dest_mask, list(payloads), [local_map, local_probs], axis_name=axis, max_recv=max_recv)
    permuted, probs, perm = _perm.group_by_expert(recv, recv_map, recv_probs, num_rows, pad)
  out = (tuple(permuted), probs, handle, perm)
  return out, (handle, perm)


def _dispatch_bwd(transport, max_recv, num_rows, pad, res, cotangents):
  del max_recv, num_rows, pad
  handle, perm = res
  g_payloads, g_probs, _, _ = cotangents
  backend = transport.backend()
  grads = tuple(None if _no_grad(g) else _combine_rows(backend, g, handle, perm, transport.axis_name)
                for g in g_payloads)
  g_local = None
  if not _no_grad(g_probs):
    per_row = _perm.unpermute_values(g_probs, perm)  # [M, L]
    g_local = per_destination_combine(backend, per_row, handle, transport.axis_name)  # [T, R, L]
  return None, grads, None, g_local


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _combine(rows, handle, perm, transport, rows_dtype):
  del rows_dtype
  return _combine_rows(transport.backend(), rows, handle, perm, transport.axis_name)


def _combine_fwd(rows, handle, perm, transport, rows_dtype):
  return _combine(rows, handle, perm, transport, rows_dtype), (handle, perm)


def _combine_bwd(transport, rows_dtype, res, g):
  handle, perm = res
  backend = transport.backend()
  axis = transport.axis_name
  if _fused(backend):
    (moved,) = backend.hybrid_dispatch_cached([g], handle, perm.perm_row, perm.src_row,
                                              axis_name=axis)
  else:
    (recv,) = backend.dispatch_cached([g], handle, axis_name=axis)
    moved = _perm.permute(recv, perm)
  return moved.astype(rows_dtype), None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def _no_grad(g) -> bool:
  return g is None or g.dtype == jax.dtypes.float0


def _combine_rows(backend, rows, handle: DispatchHandle, perm: _perm.Permutation,
                  axis_name: str) -> jax.Array:
  """The combine of the module docstring, in the rows' dtype (FP8 summed as float32)."""
  if np.dtype(rows.dtype) not in _SUMMED:
    return _combine_rows(backend, rows.astype(jnp.float32), handle, perm, axis_name).astype(rows.dtype)
  if _fused(backend):
    return backend.hybrid_combine(rows, handle, perm.perm_row, axis_name=axis_name)
  summed = _perm.unpermute(rows, perm, handle.max_recv, dtype=jnp.float32)
  return summing_combine(backend, summed, handle, axis_name).astype(rows.dtype)
