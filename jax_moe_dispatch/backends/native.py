"""The native backend: our CUDA kernels (``ffi/``) called through XLA FFI.

Same contract and bits as :mod:`jax_moe_dispatch.backends.reference` (the
specification: :func:`reference.send_positions` and
:func:`reference.layout_from_counts` are what the notify kernel computes, and
the tests compare every output and handle bit for bit); the work is done in two
kernel launches per op, so that no small XLA ops sit around the custom call:

* ``jmd_dispatch``: every rank builds its send lists from the destination mask
  (the list of tokens it sends each rank, in token order), publishes its counts,
  input addresses and lists to its peers (notify) and writes the handle; then
  every rank pulls its receive rows, rank-major, straight from the senders'
  inputs into its outputs, and zeroes its padding rows; completion flags keep
  every input alive until every peer has finished reading it.
* ``jmd_dispatch_cached``: the same along a handle's layout (lists rebuilt from
  ``handle.send_pos``).
* ``jmd_combine``: every rank publishes its input address; each source loads
  its tokens' rows from every rank they went to and sums them in float32, in
  ascending rank order (the reference's order, so results are bit-identical).

* ``jmd_hybrid_dispatch`` / ``jmd_hybrid_dispatch_cached`` / ``jmd_hybrid_combine``
  (:mod:`jax_moe_dispatch.core.hybrid`): the HybridEP ops fused with the
  permutation; rows go straight into (or come straight out of) the expert-major
  permuted buffer, no receive buffer in between.

Both ops pull (loads over NVLink): on H200 pairs loads reached about 240 GB/s
per direction where stores from the same number of SMs reached about 160.

When the expert axis spans processes (one rank per process, see
:mod:`jax_moe_dispatch.backends.buffer`), the same kernels and protocol run; the only
difference is where peers find a rank's inputs: XLA's buffers cannot be shared
through CUDA IPC, so each call first copies its inputs (dispatch: payloads and
routing slices; combine: the rows) into the rank's IPC-mapped staging buffer,
and notify writes the send lists there too (the ``lists`` result is then left
unwritten). One process keeps reading XLA's buffers in place, which saves
that copy of every input. Each op asks, while it is traced, for the staging
its round trip needs (:mod:`jax_moe_dispatch.backends.staging`) through the
``reserve_staging`` it was built with, which grows the buffer before the
program can run.

The targets are side-effecting custom calls: every rank runs them in the same
order (one SPMD program) and they are kept out of CUDA graphs.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe_dispatch.backends import staging
from jax_moe_dispatch.backends.base import DispatchHandle

_COMBINE_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@functools.cache
def _load():
  """``(extension module or None, reason it is missing)``."""
  try:
    from jax_moe_dispatch import _jmd_ext
  except ImportError as e:
    return None, (f"the CUDA extension jax_moe_dispatch._jmd_ext is not built ({e}); "
                  "reinstall with nvcc on PATH")
  return _jmd_ext, ""


def extension():
  """The nanobind module (raises ``RuntimeError`` naming the fix if it is not built)."""
  ext, reason = _load()
  if ext is None:
    raise RuntimeError(f"jax_moe_dispatch: {reason}.")
  return ext


def extension_built() -> bool:
  """Whether the CUDA extension was built and imports (GPUs not needed)."""
  return _load()[0] is not None


def _has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


@functools.cache
def _register() -> None:
  for name, capsule in extension().handlers().items():
    jax.ffi.register_ffi_target(name, capsule, platform="CUDA")


def native_available() -> bool:
  """Whether the native backend can run here: extension built and JAX sees GPUs."""
  if not extension_built() or not _has_gpu():
    return False
  _register()
  return True


def native_unavailable_reason() -> str:
  """Why :func:`native_available` is False (``''`` when it is True)."""
  if not extension_built():
    return _load()[1]
  if not _has_gpu():
    return "the CUDA extension is built but JAX sees no GPU"
  return ""


def _axis_index(axis_name: str) -> jax.Array:
  return jax.lax.axis_index(axis_name).astype(jnp.int32).reshape(1)


def _varying(outs, axis_name: str):
  """Type custom-call results as varying over the axis (shard_map's check_vma).

  ``ffi_call`` results carry no varying axes; ours differ per rank. Values that
  are already varying, and traces without the check (pmap, check_vma=False),
  are returned as they are.
  """
  def one(x):
    try:
      return jax.lax.pcast(x, axis_name, to="varying")
    except ValueError:  # Already varying.
      return x
  return jax.tree.map(one, outs)


def _nbytes(a: jax.Array) -> int:
  return math.prod(a.shape) * np.dtype(a.dtype).itemsize


def _summed_row(arrays: Sequence[jax.Array], lead: int) -> int:
  """Bytes of the widest row (after ``lead`` dims) a combine sums of the floating ``arrays``."""
  return max((staging.summed_row_bytes(math.prod(a.shape[lead:]), np.dtype(a.dtype).itemsize)
              for a in arrays if jnp.issubdtype(a.dtype, jnp.floating)), default=0)


class NativeBackend:
  """CUDA kernels over peer access or CUDA IPC; needs :func:`jax_moe_dispatch.get_buffer`.

  Args:
    num_sms: SMs (thread blocks) of the data kernels.
    reserve_staging: called while an op is traced with the staging bytes its
      round trip needs when a group spans processes (the largest
      ``staged_bytes`` of :mod:`~jax_moe_dispatch.backends.staging`'s lists) and
      the op's name; :func:`jax_moe_dispatch.backends.buffer.reserve_staging`
      grows the buffer to that. ``None``: nothing is reserved (a call that does
      not fit fails with an error naming the fix).
  """

  name = "native"

  def __init__(self, num_sms: int,
               reserve_staging: Optional[Callable[[int, str], None]] = None):
    self.num_blocks = np.int64(num_sms)
    self._reserve_staging = reserve_staging

  def _reserve(self, what: str, ops: Sequence[Sequence[int]]) -> None:
    """Reserve the largest staging need of ``ops`` (byte sizes of what each stages)."""
    if self._reserve_staging is not None:
      ext = extension()
      self._reserve_staging(max(int(ext.staged_bytes(list(op))) for op in ops), what)

  def dispatch(
      self,
      dest_mask: jax.Array,
      payloads: Sequence[jax.Array],
      sliced: Sequence[jax.Array],
      *,
      axis_name: str,
      max_recv: int,
  ) -> tuple[list[jax.Array], list[jax.Array], DispatchHandle]:
    _register()
    num_tokens, num_ranks = dest_mask.shape
    self._reserve("dispatch", staging.round_trip(
        num_tokens, num_ranks, max_recv, [_nbytes(a) for a in (*payloads, *sliced)],
        max(_summed_row(payloads, 1), _summed_row(sliced, 2))))
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    out_types = (
        [i32(num_tokens, num_ranks), i32(num_ranks), i32(num_ranks), i32(max_recv),
         i32(num_ranks, num_tokens)]
        + [jax.ShapeDtypeStruct((max_recv,) + a.shape[1:], a.dtype) for a in payloads]
        + [jax.ShapeDtypeStruct((max_recv,) + a.shape[2:], a.dtype) for a in sliced]
    )
    outs = jax.ffi.ffi_call("jmd_dispatch", out_types, has_side_effect=True)(
        _axis_index(axis_name), dest_mask, *payloads, *sliced,
        num_payloads=np.int64(len(payloads)), num_blocks=self.num_blocks)
    outs = _varying(list(outs), axis_name)
    send_pos, dest_offset, recv_count, recv_token, _lists = outs[:5]
    received = outs[5:]
    handle = DispatchHandle(send_pos=send_pos, dest_offset=dest_offset, recv_count=recv_count,
                            recv_token=recv_token)
    return received[: len(payloads)], received[len(payloads):], handle

  def dispatch_cached(
      self,
      payloads: Sequence[jax.Array],
      handle: DispatchHandle,
      *,
      axis_name: str,
  ) -> list[jax.Array]:
    _register()
    self._reserve("cached dispatch", [staging.dispatch(*handle.send_pos.shape,
                                                       [_nbytes(a) for a in payloads])])
    out_types = [jax.ShapeDtypeStruct(handle.send_pos.shape[::-1], jnp.int32)] + [
        jax.ShapeDtypeStruct((handle.max_recv,) + a.shape[1:], a.dtype) for a in payloads]
    outs = jax.ffi.ffi_call("jmd_dispatch_cached", out_types, has_side_effect=True)(
        _axis_index(axis_name), handle.send_pos, handle.recv_count, *payloads,
        max_recv=np.int64(handle.max_recv), num_blocks=self.num_blocks)
    return _varying(list(outs[1:]), axis_name)

  def _summing_call(self, target: str, what: str, rows: jax.Array, handle: DispatchHandle,
                    extra: tuple, axis_name: str, staged: Sequence[int]) -> jax.Array:
    """A combine-like FFI call: ``[rows, ...]`` -> ``[T, ...]`` float32 sums, in ``rows``' dtype.

    Its operands: the axis index, ``handle.send_pos``, ``handle.dest_offset``, ``extra``, then
    the rows flattened to 2D. ``staged``: what the call stages (its backward, a cached
    dispatch of ``[T]`` such rows, is reserved with it).
    """
    _register()
    if rows.dtype not in _COMBINE_DTYPES:
      raise TypeError(
          f"the native {what} sums float32, bfloat16 or float16 rows, got {rows.dtype}. "
          "Fix: cast the rows, or use implementation='reference'.")
    num_tokens, num_ranks = handle.send_pos.shape
    row = _nbytes(rows) // max(rows.shape[0], 1)
    self._reserve(what, [staged, staging.dispatch(num_tokens, num_ranks, [num_tokens * row])])
    tail = rows.shape[1:]
    flat = rows.reshape(rows.shape[0], -1)
    out = jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct((handle.num_tokens, flat.shape[1]), rows.dtype),
        has_side_effect=True,
    )(_axis_index(axis_name), handle.send_pos, handle.dest_offset, *extra, flat,
      num_blocks=self.num_blocks)
    return _varying(out, axis_name).reshape((handle.num_tokens,) + tail)

  def combine(
      self,
      rows: jax.Array,
      handle: DispatchHandle,
      *,
      axis_name: str,
  ) -> jax.Array:
    return self._summing_call("jmd_combine", "combine", rows, handle, (), axis_name,
                              staging.combine(_nbytes(rows)))

  # HybridEP (jax_moe_dispatch.core.hybrid): dispatch straight into the
  # expert-major permuted rows and combine straight out of them. The permutation
  # travels as arrays (backends/ knows no core types): perm_row [M, L],
  # src_row [N], tokens_per_expert [L], with core/permute.py's meaning.

  def hybrid_dispatch(
      self,
      dest_mask: jax.Array,
      payloads: Sequence[jax.Array],
      local_map: jax.Array,
      local_probs: jax.Array,
      *,
      axis_name: str,
      max_recv: int,
      num_rows: int,
      pad_multiple: int,
  ) -> tuple[list[jax.Array], jax.Array, DispatchHandle, tuple[jax.Array, jax.Array, jax.Array]]:
    """``jmd_hybrid_dispatch``: ``(permuted payloads, permuted probs, handle, permutation)``."""
    _register()
    if local_probs.dtype not in _COMBINE_DTYPES:
      raise TypeError(
          f"the native HybridEP dispatch moves float32, bfloat16 or float16 probabilities, got "
          f"{local_probs.dtype}. Fix: cast them, or use implementation='reference'.")
    num_tokens, num_ranks, num_local = local_map.shape
    self._reserve("HybridEP dispatch", staging.hybrid_round_trip(
        num_tokens, num_ranks, num_local, max_recv, num_rows, [_nbytes(a) for a in payloads],
        _summed_row(payloads[:1], 1), np.dtype(local_probs.dtype).itemsize))
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    out_types = (
        [i32(num_tokens, num_ranks), i32(num_ranks), i32(num_ranks), i32(max_recv),
         i32(num_ranks, num_tokens), i32(max_recv, num_local), i32(num_rows), i32(num_local),
         i32(num_local), jax.ShapeDtypeStruct((num_rows,), local_probs.dtype)]
        + [jax.ShapeDtypeStruct((num_rows,) + a.shape[1:], a.dtype) for a in payloads])
    outs = jax.ffi.ffi_call("jmd_hybrid_dispatch", out_types, has_side_effect=True)(
        _axis_index(axis_name), dest_mask, local_map, local_probs, *payloads,
        pad_multiple=np.int64(pad_multiple), num_blocks=self.num_blocks)
    outs = _varying(list(outs), axis_name)
    send_pos, dest_offset, recv_count, recv_token, _lists = outs[:5]
    perm_row, src_row, tokens_per_expert, _counts, probs = outs[5:10]
    handle = DispatchHandle(send_pos=send_pos, dest_offset=dest_offset, recv_count=recv_count,
                            recv_token=recv_token)
    return outs[10:], probs, handle, (perm_row, src_row, tokens_per_expert)

  def hybrid_dispatch_cached(
      self,
      payloads: Sequence[jax.Array],
      handle: DispatchHandle,
      perm_row: jax.Array,
      src_row: jax.Array,
      *,
      axis_name: str,
  ) -> list[jax.Array]:
    """``jmd_hybrid_dispatch_cached``: ``[T, ...]`` rows -> ``[N, ...]`` along a permutation."""
    _register()
    self._reserve("HybridEP cached dispatch", [staging.dispatch(
        *handle.send_pos.shape, [_nbytes(a) for a in payloads])])
    num_rows = src_row.shape[0]
    out_types = [jax.ShapeDtypeStruct(handle.send_pos.shape[::-1], jnp.int32)] + [
        jax.ShapeDtypeStruct((num_rows,) + a.shape[1:], a.dtype) for a in payloads]
    outs = jax.ffi.ffi_call("jmd_hybrid_dispatch_cached", out_types, has_side_effect=True)(
        _axis_index(axis_name), handle.send_pos, handle.recv_count, perm_row, src_row, *payloads,
        num_blocks=self.num_blocks)
    return _varying(list(outs[1:]), axis_name)

  def hybrid_combine(
      self,
      rows: jax.Array,
      handle: DispatchHandle,
      perm_row: jax.Array,
      *,
      axis_name: str,
  ) -> jax.Array:
    """``jmd_hybrid_combine``: ``[N, ...]`` permuted rows -> ``[T, ...]``, one float32 sum per token."""
    return self._summing_call("jmd_hybrid_combine", "HybridEP combine", rows, handle, (perm_row,),
                              axis_name, staging.hybrid_combine(_nbytes(rows), *perm_row.shape))
