"""The native backend: our CUDA kernels (``ffi/``) called through XLA FFI.

Same contract and bits as :mod:`jax_moe_dispatch.backends.reference`; only the
data movement differs. The layout's local half (:func:`reference.send_positions`)
and its post-exchange half (:func:`reference.layout_from_counts`) are the
reference's own functions; the kernels replace the ``all_gather`` of counts and
the dense ``all_to_all`` of rows:

* ``jmd_dispatch``: every rank publishes its counts, its input addresses and
  its send lists (:func:`send_lists`) to its peers (notify); then every rank
  pulls its receive rows, rank-major, straight from the senders' inputs into its
  outputs, and zeroes its padding rows; completion flags keep every input alive
  until every peer has finished reading it.
* ``jmd_dispatch_cached``: the same along a handle's layout.
* ``jmd_combine``: every rank publishes its input address; each source loads
  its tokens' rows from every rank they went to and sums them in float32, in
  ascending rank order (the reference's order, so results are bit-identical).

Both ops pull (loads over NVLink): on H200 pairs loads reached about 240 GB/s
per direction where stores from the same number of SMs reached about 160.

The targets are side-effecting custom calls: every rank runs them in the same
order (one SPMD program) and they are kept out of CUDA graphs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe_dispatch.backends import reference
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


def send_lists(send_pos: jax.Array) -> jax.Array:
  """``[T, R]`` list positions (-1: not sent) -> ``[R, T]`` lists of token ids.

  ``lists[d, i]`` is the token at position ``i`` of the list sent to rank ``d``
  (-1 past the list's end): what rank ``d`` reads to find its rows' sources.
  """
  num_tokens, num_ranks = send_pos.shape
  tokens = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32)[:, None], send_pos.shape)
  dest = jnp.broadcast_to(jnp.arange(num_ranks, dtype=jnp.int32)[None, :], send_pos.shape)
  pos = jnp.where(send_pos >= 0, send_pos, num_tokens)  # Out of bounds: not written.
  return jnp.full((num_ranks, num_tokens), -1, jnp.int32).at[dest, pos].set(tokens, mode="drop")


class NativeBackend:
  """CUDA kernels over NVLink peer access; needs :func:`jax_moe_dispatch.get_buffer`."""

  name = "native"

  def __init__(self, num_sms: int):
    self.num_blocks = np.int64(num_sms)

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
    num_ranks = dest_mask.shape[1]
    me = _axis_index(axis_name)
    send_pos_raw, counts = reference.send_positions(dest_mask)
    out_types = (
        [jax.ShapeDtypeStruct((num_ranks, num_ranks), jnp.int32),
         jax.ShapeDtypeStruct((max_recv,), jnp.int32)]
        + [jax.ShapeDtypeStruct((max_recv,) + a.shape[1:], a.dtype) for a in payloads]
        + [jax.ShapeDtypeStruct((max_recv,) + a.shape[2:], a.dtype) for a in sliced]
    )
    outs = jax.ffi.ffi_call("jmd_dispatch", out_types, has_side_effect=True)(
        me, counts, send_lists(send_pos_raw), *payloads, *sliced,
        num_payloads=np.int64(len(payloads)), num_blocks=self.num_blocks)
    outs = _varying(list(outs), axis_name)
    all_counts, recv_token, received = outs[0], outs[1], list(outs[2:])
    handle, _ = reference.layout_from_counts(
        dest_mask, send_pos_raw, all_counts, me[0], max_recv=max_recv)
    handle = dataclasses.replace(handle, recv_token=recv_token)
    return received[: len(payloads)], received[len(payloads):], handle

  def dispatch_cached(
      self,
      payloads: Sequence[jax.Array],
      handle: DispatchHandle,
      *,
      axis_name: str,
  ) -> list[jax.Array]:
    _register()
    out_types = [jax.ShapeDtypeStruct((handle.max_recv,) + a.shape[1:], a.dtype) for a in payloads]
    outs = jax.ffi.ffi_call("jmd_dispatch_cached", out_types, has_side_effect=True)(
        _axis_index(axis_name), send_lists(handle.send_pos), handle.recv_count, *payloads,
        max_recv=np.int64(handle.max_recv), num_blocks=self.num_blocks)
    return _varying(list(outs), axis_name)

  def combine(
      self,
      rows: jax.Array,
      handle: DispatchHandle,
      *,
      axis_name: str,
  ) -> jax.Array:
    _register()
    if rows.dtype not in _COMBINE_DTYPES:
      raise TypeError(
          f"the native combine sums float32, bfloat16 or float16 rows, got {rows.dtype}. "
          "Fix: cast the rows, or use implementation='reference'.")
    tail = rows.shape[1:]
    flat = rows.reshape(rows.shape[0], -1)
    out = jax.ffi.ffi_call(
        "jmd_combine", jax.ShapeDtypeStruct((handle.num_tokens, flat.shape[1]), rows.dtype),
        has_side_effect=True,
    )(_axis_index(axis_name), handle.send_pos, handle.dest_offset, flat, num_blocks=self.num_blocks)
    return _varying(out, axis_name).reshape((handle.num_tokens,) + tail)
