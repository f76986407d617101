"""The expert-major permutation of :mod:`jax_moe_dispatch.core.permute` on CUDA kernels.

:func:`group_by_expert` and :func:`unpermute` take the arguments of their
namesakes in :mod:`~jax_moe_dispatch.core.permute`, produce the same bits and
build or take the same :class:`~jax_moe_dispatch.core.permute.Permutation`, so
code after them does not change. They run two XLA FFI targets of the native
extension (``ffi/permute.cu``), local to one GPU (no peers, no
:func:`jax_moe_dispatch.get_buffer`):

* ``jmd_permute``: the permutation (the ``K`` clamp, groups padded to
  ``pad_multiple``, rows at or past ``num_rows`` dropped), the permuted rows of
  every array (rows and FP8 scales alike, each row read once) and the permuted
  probabilities, in one call instead of XLA's scans, scatters and gathers;
* ``jmd_unpermute``: each row's permuted rows summed in float32 in ascending
  local-expert order, rounded once (float32, bfloat16 and float16 rows; other
  dtypes run :func:`permute.unpermute`, which gives the same bits).

Gradients mirror :mod:`~jax_moe_dispatch.core.permute`: the rows' cotangent of
:func:`group_by_expert` is :func:`unpermute` (each row's experts summed in
float32, rounded once), the probabilities' a gather
(:func:`permute.unpermute_values`); the cotangent of :func:`unpermute` is
:func:`permute.permute` (a gather).

:func:`runs_native` is the dispatcher's choice between these and
:mod:`~jax_moe_dispatch.core.permute` (``TokenDispatcherConfig.moe_permute_fusion``).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe_dispatch import backends
from jax_moe_dispatch.backends import _log_once  # Once per process, like the backend choice.
from jax_moe_dispatch.backends import native
from jax_moe_dispatch.core import permute as _perm

__all__ = ["group_by_expert", "runs_native", "unpermute"]


# Row arrays one jmd_permute call moves (ffi/permute.h kMaxPermuteStreams).
_MAX_ARRAYS = 4
# Row and output dtypes jmd_unpermute sums.
_SUMMED = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16))




def runs_native(fusion: bool, implementation: Optional[str], num_sms: int) -> bool:
  """Whether the dispatcher's permutation runs these kernels; the choice is logged once.

  Args:
    fusion: ``TokenDispatcherConfig.moe_permute_fusion``.
    implementation: the dispatcher's implementation; the kernels run when it
      resolves to the native backend (:func:`jax_moe_dispatch.backends.get_backend`).
    num_sms: the dispatcher's SM budget (passed through to the backend choice).

  Raises:
    RuntimeError: ``implementation="native"`` but the native backend is
      unavailable (the message names the fix).
  """
  if not fusion:
    _log_once(logging.INFO, "jax_moe_dispatch: moe_permute_fusion=False: the deepep dispatcher "
              "permutes received rows with XLA (core/permute.py).")
    return False
  if backends.get_backend(implementation, num_sms=num_sms).name != "native":
    _log_once(logging.INFO, "jax_moe_dispatch: moe_permute_fusion=True, but the reference backend "
              "runs: the deepep dispatcher permutes received rows with XLA (core/permute.py).")
    return False
  _log_once(logging.INFO, "jax_moe_dispatch: moe_permute_fusion=True: the deepep dispatcher "
            "permutes received rows with the native kernels (jmd_permute, jmd_unpermute).")
  return True


def _call(target: str, out_types, *args, **attrs):
  """``jax.ffi.ffi_call`` of a native target (pure: no side effects, XLA may fuse around it)."""
  if not native.native_available():
    raise RuntimeError(
        f"jax_moe_dispatch: the native permutation needs the CUDA extension and a GPU: "
        f"{native.native_unavailable_reason()}. Fix: reinstall with nvcc on PATH and run on "
        "NVIDIA GPUs, or set TokenDispatcherConfig.moe_permute_fusion=False.")
  return jax.ffi.ffi_call(target, out_types)(*args, **attrs)


def _ffi(target: str, out_types, *args, axis_name: Optional[str], **attrs):
  """:func:`_call`, its results typed as varying over ``axis_name`` like its inputs
  (``ffi_call`` results carry no varying axes)."""
  outs = _call(target, out_types, *args, **attrs)
  return outs if axis_name is None else native._varying(outs, axis_name)


def group_by_expert(rows: Any, local_map: jax.Array, local_probs: jax.Array, num_rows: int,
                    pad_multiple: int = 1, max_experts_per_row: Optional[int] = None, *,
                    axis_name: Optional[str] = None) -> tuple[Any, jax.Array, _perm.Permutation]:
  """:func:`permute.group_by_expert` on the native kernels: same arguments, same bits.

  Args:
    rows: ``[M, ...]`` received rows, or a pytree of up to four such arrays
      (e.g. FP8 rows and their scales), any dtype; each is permuted alike.
    local_map: ``[M, L]`` bool, row ``i`` routed to local expert ``e``.
    local_probs: ``[M, L]`` weight of (row, expert), 1, 2, 4 or 8 bytes each.
    num_rows: ``N``, static rows of the permuted buffer.
    pad_multiple: group sizes are rounded up to a multiple of this.
    max_experts_per_row: ``K`` (:func:`permute.make_permutation`).
    axis_name: the mesh axis the inputs vary over inside ``shard_map``, if any
      (the results are typed as varying over it).

  Returns:
    ``(permuted rows [N, ...], permuted probs [N], permutation)``.
  """
  leaves, tree = jax.tree.flatten(rows)
  if local_map.ndim != 2 or local_probs.shape != local_map.shape:
    raise ValueError(f"local_map and local_probs must be [M, L], got {local_map.shape} and "
                     f"{local_probs.shape}.")
  num_recv, num_local = local_map.shape
  if num_local < 1:
    raise ValueError("group_by_expert needs at least one local expert (L >= 1).")
  if not 1 <= len(leaves) <= _MAX_ARRAYS or any(a.ndim < 1 or a.shape[0] != num_recv
                                                   for a in leaves):
    raise ValueError(f"rows must be 1 to {_MAX_ARRAYS} arrays of [M={num_recv}, ...], got "
                     f"{[a.shape for a in leaves]}.")
  if np.dtype(local_probs.dtype).itemsize not in (1, 2, 4, 8):
    raise TypeError(f"local_probs of {local_probs.dtype} cannot be permuted natively. Fix: cast "
                    "them to float32.")
  if isinstance(pad_multiple, bool) or not isinstance(pad_multiple, int) or pad_multiple < 1:
    raise ValueError(f"pad_multiple must be a positive int, got {pad_multiple!r}.")
  k = num_local if max_experts_per_row is None else max(1, min(max_experts_per_row, num_local))
  permuted, probs, perm = _group(tuple(leaves), local_map.astype(jnp.bool_), local_probs,
                                 num_rows, pad_multiple, k, axis_name)
  return jax.tree.unflatten(tree, permuted), probs, perm


def _group_call(leaves, local_map, local_probs, num_rows, pad, k, axis_name):
  num_recv, num_local = local_map.shape
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  out_types = (
      [i32(num_recv, num_local), i32(num_rows), i32(num_local), i32(num_recv, k),
       i32(num_local + num_recv), jax.ShapeDtypeStruct((num_rows,), local_probs.dtype)]
      + [jax.ShapeDtypeStruct((num_rows,) + a.shape[1:], a.dtype) for a in leaves])
  outs = _ffi("jmd_permute", out_types, local_map, local_probs, *leaves, axis_name=axis_name,
              pad_multiple=np.int64(pad))
  perm_row, src_row, tokens_per_expert, expert_rows, _scratch, probs = outs[:6]
  perm = _perm.Permutation(perm_row, src_row, tokens_per_expert, expert_rows)
  return tuple(outs[6:]), probs, perm


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _group(leaves, local_map, local_probs, num_rows, pad, k, axis_name):
  return _group_call(leaves, local_map, local_probs, num_rows, pad, k, axis_name)


def _group_fwd(leaves, local_map, local_probs, num_rows, pad, k, axis_name):
  out = _group_call(leaves, local_map, local_probs, num_rows, pad, k, axis_name)
  likes = tuple(jnp.zeros((0,), a.dtype) for a in leaves)
  return out, (out[2], likes)


def _group_bwd(num_rows, pad, k, axis_name, res, cotangents):
  del num_rows, pad, k
  perm, likes = res
  g_rows, g_probs, _ = cotangents
  num_recv = perm.perm_row.shape[0]
  grads = tuple(
      unpermute(g, perm, num_recv, axis_name=axis_name)
      if jnp.issubdtype(like.dtype, jnp.inexact) else None
      for g, like in zip(g_rows, likes))
  return grads, None, _perm.unpermute_values(g_probs, perm)


_group.defvjp(_group_fwd, _group_bwd)


def unpermute(rows: jax.Array, perm: _perm.Permutation, num_recv: int, dtype=None, *,
              axis_name: Optional[str] = None) -> jax.Array:
  """:func:`permute.unpermute` on the native kernel: ``[N, ...]`` -> ``[M, ...]``, same bits.

  Each row's permuted rows (:attr:`Permutation.expert_rows`) are summed in
  float32 from zero in ascending local-expert order and rounded once to
  ``dtype`` (default: that of ``rows``). Rows and output of float32, bfloat16
  or float16 run ``jmd_unpermute``; other dtypes :func:`permute.unpermute`.
  ``axis_name`` as in :func:`group_by_expert`.
  """
  out_dtype = np.dtype(rows.dtype if dtype is None else dtype)
  if np.dtype(rows.dtype) not in _SUMMED or out_dtype not in _SUMMED:
    return _perm.unpermute(rows, perm, num_recv, dtype)
  return _unpermute(rows, perm, num_recv, out_dtype, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _unpermute(rows, perm, num_recv, dtype, axis_name):
  expert_rows = perm.expert_rows
  if expert_rows.shape[0] != num_recv:
    raise ValueError(f"unpermute: the permutation has {expert_rows.shape[0]} receive rows, "
                     f"num_recv={num_recv}.")
  width = math.prod(rows.shape[1:])
  out = _ffi("jmd_unpermute", jax.ShapeDtypeStruct((num_recv, width), dtype), expert_rows,
             rows.reshape(rows.shape[0], width), axis_name=axis_name)
  return out.reshape((num_recv,) + rows.shape[1:])


def _unpermute_fwd(rows, perm, num_recv, dtype, axis_name):
  return _unpermute(rows, perm, num_recv, dtype, axis_name), (perm, jnp.zeros((0,), rows.dtype))


def _unpermute_bwd(num_recv, dtype, axis_name, res, g):
  del num_recv, dtype, axis_name
  perm, like = res
  return _perm.permute(g.astype(like.dtype), perm), None


_unpermute.defvjp(_unpermute_fwd, _unpermute_bwd)
