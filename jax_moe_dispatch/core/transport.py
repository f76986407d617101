"""Differentiable row transport: one ``custom_vjp`` pair over a backend's primitives.

:func:`dispatch` and :func:`combine` move rows between the ranks of one
expert-parallel axis with a backend (:mod:`jax_moe_dispatch.backends`), and
each is the other's backward pass:

* the cotangent of a dispatched payload row goes back to its source with a
  combine, which sums it over the ranks the row went to;
* the cotangent of a *sliced* input (``[T, R, ...]``, rank ``d`` receiving
  ``a[t, d]``) goes back unsummed: a combine along the same layout in which
  every (token, destination) pair is a token of its own;
* the cotangent of a combine is dispatched along the cached layout.

Everything above (the public ops, the permutation into expert-major groups,
the masking of probabilities) is plain JAX, so its gradients come from
autodiff. What shapes a trace is the static :class:`Transport` (axis,
implementation, SM budget) plus the static row counts; the native backend's
buffers are only looked up, and their absence is an error naming the fix.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe_dispatch import backends
from jax_moe_dispatch.backends import Backend, DispatchHandle, buffer

__all__ = ["Transport", "combine", "dispatch"]

# Dtypes every backend's combine sums; others are summed as float32.
_COMBINE_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class Transport:
  """How rows move: everything about a dispatch or combine that is not an array.

  Hashable and compared by value, so it is part of the cache key of every
  trace that uses it.

  Attributes:
    axis_name: the expert-parallel mesh axis.
    implementation: ``"auto"``, ``"native"`` or ``"reference"``
      (:func:`jax_moe_dispatch.backends.get_backend`).
    num_sms: SMs (thread blocks) the native kernels use.
  """

  axis_name: str
  implementation: str
  num_sms: int

  def __post_init__(self) -> None:
    object.__setattr__(self, "implementation", backends.check_implementation(self.implementation))
    backends.check_num_sms(self.num_sms)

  def backend(self) -> Backend:
    """The backend that runs this transport (called at trace time).

    The native backend grows the staging buffers of groups spanning processes
    while an op is traced, if its sizes need more (:func:`buffer.reserve_staging`).
    """
    backend = backends.get_backend(self.implementation, num_sms=self.num_sms,
                                   reserve_staging=buffer.reserve_staging)
    if backend.name == "native" and not buffer.has_buffer():
      raise RuntimeError(
          "the native backend runs this op but no native buffers are set up. Fix: call "
          "jax_moe_dispatch.get_buffer(mesh, hidden_bytes) once before tracing, or pass "
          "implementation='reference'.")
    return backend


def dispatch(
    dest_mask: jax.Array,
    payloads: Sequence[jax.Array],
    sliced: Sequence[jax.Array],
    transport: Transport,
    max_recv: int,
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...], DispatchHandle]:
  """:meth:`Backend.dispatch <jax_moe_dispatch.backends.base.Backend.dispatch>`, differentiable.

  Floating payloads and sliced arrays get gradients; integer and bool ones
  (routing metadata) get none.

  Returns:
    ``(recv_payloads, recv_sliced, handle)``, tuples of ``[max_recv, ...]`` arrays.
  """
  return _dispatch(dest_mask, tuple(payloads), tuple(sliced), transport, max_recv)


def combine(rows: jax.Array, handle: DispatchHandle, transport: Transport,
            out_dtype=None) -> jax.Array:
  """:meth:`Backend.combine <jax_moe_dispatch.backends.base.Backend.combine>`, differentiable.

  Sums in float32 and rounds once to ``out_dtype`` (default: that of
  ``rows``); the backward pass moves the cotangent in ``out_dtype``.
  """
  out_dtype = rows.dtype if out_dtype is None else np.dtype(out_dtype)
  return _combine(rows, handle, transport, np.dtype(rows.dtype), out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dispatch(dest_mask, payloads, sliced, transport, max_recv):
  return _dispatch_fwd(dest_mask, payloads, sliced, transport, max_recv)[0]


def _dispatch_fwd(dest_mask, payloads, sliced, transport, max_recv):
  recv, recv_sliced, handle = transport.backend().dispatch(
      dest_mask, list(payloads), list(sliced), axis_name=transport.axis_name, max_recv=max_recv)
  return (tuple(recv), tuple(recv_sliced), handle), handle


def _dispatch_bwd(transport, max_recv, handle, cotangents):
  del max_recv
  g_payloads, g_sliced, _ = cotangents
  backend = transport.backend()
  axis = transport.axis_name
  grads = tuple(None if _no_grad(g) else summing_combine(backend, g, handle, axis)
                for g in g_payloads)
  sliced_grads = tuple(None if _no_grad(g) else per_destination_combine(backend, g, handle, axis)
                       for g in g_sliced)
  return None, grads, sliced_grads


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _combine(rows, handle, transport, rows_dtype, out_dtype):
  del rows_dtype
  return summing_combine(transport.backend(), rows, handle, transport.axis_name).astype(out_dtype)


def _combine_fwd(rows, handle, transport, rows_dtype, out_dtype):
  return _combine(rows, handle, transport, rows_dtype, out_dtype), handle


def _combine_bwd(transport, rows_dtype, out_dtype, handle, g):
  del out_dtype
  (moved,) = transport.backend().dispatch_cached([g], handle, axis_name=transport.axis_name)
  return moved.astype(rows_dtype), None


_combine.defvjp(_combine_fwd, _combine_bwd)


def _no_grad(g) -> bool:
  return g is None or g.dtype == jax.dtypes.float0


def summing_combine(backend: Backend, rows, handle, axis_name) -> jax.Array:
  """``backend.combine`` for any floating dtype (FP8 rows are summed as float32)."""
  if np.dtype(rows.dtype) in _COMBINE_DTYPES:
    return backend.combine(rows, handle, axis_name=axis_name)
  return backend.combine(rows.astype(jnp.float32), handle, axis_name=axis_name).astype(rows.dtype)


def per_destination_combine(backend: Backend, rows, handle: DispatchHandle,
                             axis_name) -> jax.Array:
  """``[M, ...]`` received rows -> ``[T, R, ...]``: each back at (its token, this rank), unsummed.

  A combine along the same layout in which each (token ``t``, destination
  ``d``) is a token ``t * R + d`` of its own that went only to ``d``, so the
  sum over destinations has one term and moves only the rows that exist.
  """
  num_tokens, num_ranks = handle.send_pos.shape
  only_d = jnp.eye(num_ranks, dtype=jnp.bool_)[None]  # [1, R(d), R(dest)]
  send_pos = jnp.where(only_d, handle.send_pos[:, None, :], -1).astype(jnp.int32)
  split = dataclasses.replace(handle, send_pos=send_pos.reshape(num_tokens * num_ranks, num_ranks))
  out = summing_combine(backend, rows, split, axis_name)
  return out.reshape((num_tokens, num_ranks) + rows.shape[1:])
