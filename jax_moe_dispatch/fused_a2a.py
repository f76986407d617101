"""Fused MoE token dispatch and combine: DeepEP and HybridEP semantics in JAX.

Call these per rank inside :func:`jax.shard_map` (or :func:`jax.pmap`) with the
expert-parallel axis name; experts are sharded contiguously, rank ``r`` owning
global experts ``[r * L, (r + 1) * L)`` with ``L = num_experts / ep_size``.
Each op is a :func:`jax.custom_vjp`: dispatch's backward is a combine of the
gradients, combine's backward a dispatch along the cached layout. Shapes are
static; nothing here synchronises with the host. Layouts are specified in
:mod:`jax_moe_dispatch.backends.base` and :mod:`jax_moe_dispatch.permute`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe_dispatch import permute as _perm
from jax_moe_dispatch.backends import DispatchHandle, get_backend
from jax_moe_dispatch.fp8 import FP8_BLOCK, FP8_DTYPE

# A row payload: plain rows, or FP8 rows with their float32 block scales.
Rows = Union[jax.Array, tuple[jax.Array, jax.Array]]


__all__ = [
    "DispatchHandle",
    "HybridEPHandle",
    "fused_dispatch",
    "fused_combine",
    "hybrid_ep_dispatch",
    "hybrid_ep_combine",
]


# ----------------------------------------------------------------------------
# Validation (trace time, so errors name the fix before anything runs).


def _axis_size(axis_name: str) -> int:
  try:
    return jax.lax.axis_size(axis_name)
  except NameError as e:  # Unbound axis name.
    raise ValueError(
        f"axis_name={axis_name!r} is not bound here. Fix: call this op inside "
        f"jax.shard_map(..., mesh=Mesh(devices, ({axis_name!r},)), ...) or "
        f"jax.pmap(..., axis_name={axis_name!r})."
    ) from e


def _check_rows(x: Rows, what: str) -> tuple[jax.Array, Optional[jax.Array]]:
  if isinstance(x, (tuple, list)):
    if len(x) != 2:
      raise TypeError(f"{what} must be an array [T, H] or a pair (fp8 rows, scales), got {len(x)} items.")
    rows, scales = x
    if rows.dtype != FP8_DTYPE:
      raise TypeError(f"{what}: FP8 rows must be {FP8_DTYPE.__name__}, got {rows.dtype}.")
    if rows.ndim != 2:
      raise ValueError(f"{what}: rows must be [T, H], got shape {rows.shape}.")
    want = (rows.shape[0], -(-rows.shape[1] // FP8_BLOCK))
    if scales.shape != want or scales.dtype != jnp.float32:
      raise ValueError(
          f"{what}: scales must be float32 {want} (one per {FP8_BLOCK} columns), got "
          f"{scales.dtype}{scales.shape}. Use jax_moe_dispatch.quantize_fp8(x)."
      )
    return rows, scales
  if not isinstance(x, jax.Array) and not hasattr(x, "shape"):
    raise TypeError(f"{what} must be a jax.Array, got {type(x).__name__}.")
  if x.ndim != 2:
    raise ValueError(f"{what} must be [T, H], got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == FP8_DTYPE:
    raise TypeError(
        f"{what} must be floating (bf16/f16/f32), or an FP8 pair (rows, scales), got {x.dtype}. "
        "Fix: pass jax_moe_dispatch.quantize_fp8(x) for FP8."
    )
  return x, None


def _check_experts(num_experts: int, ep: int) -> int:
  if not isinstance(num_experts, int) or num_experts <= 0:
    raise ValueError(f"num_experts must be a positive int, got {num_experts!r}.")
  if num_experts % ep:
    raise ValueError(
        f"num_experts={num_experts} is not divisible by the expert-parallel size "
        f"{ep}. Fix: choose num_experts as a multiple of the '{ep}'-device axis."
    )
  return num_experts // ep


def _check_max_recv(max_recv: Optional[int], num_tokens: int, ep: int) -> int:
  if max_recv is None:
    return ep * num_tokens
  if not isinstance(max_recv, int) or max_recv <= 0:
    raise ValueError(f"max_recv_tokens must be a positive int or None, got {max_recv!r}.")
  return max_recv


def check_topk_routing(token_indices: jax.Array, token_probs: jax.Array, num_tokens: int) -> None:
  """Check top-k routing arrays: int ``[T, K]`` indices and floating probs of the same shape."""
  if token_indices.ndim != 2 or token_indices.shape[0] != num_tokens:
    raise ValueError(f"token_indices must be [T={num_tokens}, K], got shape {token_indices.shape}.")
  if not jnp.issubdtype(token_indices.dtype, jnp.integer):
    raise TypeError(f"token_indices must be int32, got {token_indices.dtype}.")
  if token_probs.shape != token_indices.shape:
    raise ValueError(
        f"token_probs must have the shape of token_indices {token_indices.shape}, got {token_probs.shape}."
    )
  if not jnp.issubdtype(token_probs.dtype, jnp.floating):
    raise TypeError(f"token_probs must be floating, got {token_probs.dtype}.")


def _routing_check(token_indices: jax.Array, num_experts: int) -> None:
  """Check index range when the indices are concrete (traced ones cannot be checked)."""
  try:
    values = np.asarray(token_indices)
  except jax.errors.TracerArrayConversionError:
    return
  if values.size and (values.max() >= num_experts or values.min() < -1):
    raise ValueError(
        f"token_indices must lie in [-1, {num_experts}); got values in "
        f"[{values.min()}, {values.max()}]."
    )


# ----------------------------------------------------------------------------
# DeepEP semantics: fused_dispatch / fused_combine.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _dispatch(x, token_indices, token_probs, num_experts, axis_name, max_recv, implementation):
  return _dispatch_fwd(x, token_indices, token_probs, num_experts, axis_name, max_recv, implementation)[0]


def _dispatch_fwd(x, token_indices, token_probs, num_experts, axis_name, max_recv, implementation):
  backend = get_backend(implementation)
  ep = _axis_size(axis_name)
  num_local = num_experts // ep
  rows, scales = x if isinstance(x, tuple) else (x, None)
  valid = token_indices >= 0
  owner = jnp.where(valid, token_indices // num_local, -1)  # [T, K]
  ranks = jnp.arange(ep, dtype=jnp.int32)
  on_rank = owner[:, None, :] == ranks[None, :, None]  # [T, R, K]
  dest_mask = on_rank.any(axis=-1)
  # Local expert ids shifted by one so that zero padding rows decode to -1.
  local_idx = jnp.where(on_rank, token_indices[:, None, :] - ranks[None, :, None] * num_local + 1, 0)
  local_probs = jnp.where(on_rank, token_probs[:, None, :], jnp.zeros((), token_probs.dtype))
  payloads = [rows] if scales is None else [rows, scales]
  recv, (recv_idx, recv_probs), handle = backend.dispatch(
      dest_mask, payloads, [local_idx.astype(jnp.int32), local_probs],
      axis_name=axis_name, max_recv=max_recv,
  )
  recv_idx = recv_idx - 1
  target = jnp.where(recv_idx >= 0, recv_idx, num_local)
  tokens_per_expert = jnp.zeros((num_local,), jnp.int32).at[target].add(1, mode="drop")
  recv_x = recv[0] if scales is None else (recv[0], recv[1])
  out = (recv_x, recv_idx, recv_probs, tokens_per_expert, handle)
  return out, (handle, recv_idx >= 0)


def _dispatch_bwd(num_experts, axis_name, max_recv, implementation, res, g):
  handle, local = res
  g_x, _, g_probs, _, _ = g
  backend = get_backend(implementation)
  if isinstance(g_x, tuple):
    g_rows = backend.combine(g_x[0].astype(jnp.float32), handle, axis_name=axis_name)
    g_scales = backend.combine(g_x[1].astype(jnp.float32), handle, axis_name=axis_name)
    grad_x = (g_rows.astype(g_x[0].dtype), g_scales)
  else:
    grad_x = backend.combine(g_x, handle, axis_name=axis_name)
  g_probs = jnp.where(local, g_probs, jnp.zeros((), g_probs.dtype))
  grad_probs = backend.combine(g_probs, handle, axis_name=axis_name)
  return grad_x, None, grad_probs


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


def fused_dispatch(
    x: Rows,
    token_indices: jax.Array,
    token_probs: jax.Array,
    num_experts: int,
    axis_name: str = "ep",
    *,
    max_recv_tokens: Optional[int] = None,
    implementation: Optional[str] = None,
) -> tuple[Rows, jax.Array, jax.Array, jax.Array, DispatchHandle]:
  """Send each token once to every rank that owns one of its experts.

  Args:
    x: ``[T, H]`` rows (bf16/f16/f32), or ``(rows, scales)`` with rows
      ``float8_e4m3fn [T, H]`` and float32 scales ``[T, ceil(H / 128)]``
      (see :func:`jax_moe_dispatch.quantize_fp8`); scales travel with rows.
    token_indices: ``[T, K]`` int32 global expert ids, ``-1`` for no expert.
      The K experts of a token should be distinct.
    token_probs: ``[T, K]`` floating routing weights.
    num_experts: total experts, divisible by the axis size.
    axis_name: the expert-parallel axis.
    max_recv_tokens: static receive rows ``M``; default ``ep_size * T`` (never
      drops). Smaller values drop rows deterministically (base.py).
    implementation: ``"auto"`` (default), ``"native"`` or ``"reference"``.

  Returns:
    ``(recv_x, recv_token_indices, recv_token_probs, tokens_per_expert,
    handle)``: ``recv_x`` ``[M, H]`` (a pair for FP8) rank-major with zero
    padding rows; ``recv_token_indices`` ``[M, K]`` local expert ids, -1 where
    the expert lives elsewhere (and on padding rows); ``recv_token_probs``
    ``[M, K]``, 0 there; ``tokens_per_expert`` ``[L]`` int32 rows per local
    expert; ``handle`` for :func:`fused_combine`.
  """
  rows, scales = _check_rows(x, "x")
  ep = _axis_size(axis_name)
  _check_experts(num_experts, ep)
  num_tokens = rows.shape[0]
  check_topk_routing(token_indices, token_probs, num_tokens)
  _routing_check(token_indices, num_experts)
  max_recv = _check_max_recv(max_recv_tokens, num_tokens, ep)
  x = rows if scales is None else (rows, scales)
  return _dispatch(x, token_indices.astype(jnp.int32), token_probs, num_experts,
                   axis_name, max_recv, implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _combine(x, handle, axis_name, implementation):
  return get_backend(implementation).combine(x, handle, axis_name=axis_name)


def _combine_fwd(x, handle, axis_name, implementation):
  return _combine(x, handle, axis_name, implementation), handle


def _combine_bwd(axis_name, implementation, handle, g):
  (grad,) = get_backend(implementation).dispatch_cached([g], handle, axis_name=axis_name)
  return grad, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def fused_combine(
    x: jax.Array,
    handle: DispatchHandle,
    axis_name: str = "ep",
    *,
    implementation: Optional[str] = None,
) -> jax.Array:
  """Return rows to their source ranks and sum them per token.

  Args:
    x: ``[M, H]`` floating rows in the receive layout of ``handle`` (what
      experts made of :func:`fused_dispatch`'s ``recv_x``, already weighted by
      the probabilities; combine only sums).
    handle: from :func:`fused_dispatch`.

  Returns:
    ``[T, H]`` (dtype of ``x``): per token, the sum over the ranks it went to,
    accumulated in float32; zeros for tokens sent nowhere.
  """
  if x.ndim != 2 or x.shape[0] != handle.max_recv:
    raise ValueError(
        f"x must be [M={handle.max_recv}, H] (the receive layout of handle), got shape {x.shape}."
    )
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == FP8_DTYPE:
    raise TypeError(f"x must be bf16/f16/f32 for combine, got {x.dtype}.")
  _axis_size(axis_name)
  return _combine(x, handle, axis_name, implementation)


# ----------------------------------------------------------------------------
# HybridEP semantics: dispatch fused with permute, combine fused with unpermute.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridEPHandle:
  """Metadata of one :func:`hybrid_ep_dispatch`: the dispatch layout and the permutation."""

  dispatch: DispatchHandle
  permutation: _perm.Permutation


def _hybrid_fwd_impl(x, scales, routing_map, probs, num_local, axis_name, max_recv,
                     num_rows, pad_multiple, implementation):
  backend = get_backend(implementation, "hybridep")
  ep = _axis_size(axis_name)
  num_tokens = routing_map.shape[0]
  local_map = routing_map.reshape(num_tokens, ep, num_local)
  local_probs = probs.reshape(num_tokens, ep, num_local)
  dest_mask = local_map.any(axis=-1)
  payloads = [x] if scales is None else [x, scales]
  recv, (recv_map, recv_probs), handle = backend.dispatch(
      dest_mask, payloads, [local_map, local_probs], axis_name=axis_name, max_recv=max_recv
  )
  perm = _perm.make_permutation(recv_map, num_rows, pad_multiple)
  permuted_x = _perm.permute(recv[0], perm)
  permuted_scales = None if scales is None else _perm.permute(recv[1], perm)
  permuted_probs = _perm.permute_values(recv_probs, perm)
  out = (permuted_x, permuted_probs, permuted_scales, perm.tokens_per_expert,
         HybridEPHandle(handle, perm))
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _hybrid_dispatch(x, scales, routing_map, probs, num_local, axis_name, max_recv,
                     num_rows, pad_multiple, implementation):
  return _hybrid_fwd_impl(x, scales, routing_map, probs, num_local, axis_name, max_recv,
                          num_rows, pad_multiple, implementation)


def _hybrid_dispatch_fwd(x, scales, routing_map, probs, num_local, axis_name, max_recv,
                         num_rows, pad_multiple, implementation):
  out = _hybrid_fwd_impl(x, scales, routing_map, probs, num_local, axis_name, max_recv,
                         num_rows, pad_multiple, implementation)
  return out, out[4]


def _hybrid_dispatch_bwd(num_local, axis_name, max_recv, num_rows, pad_multiple,
                         implementation, handle, g):
  g_x, g_probs, g_scales, _, _ = g
  backend = get_backend(implementation, "hybridep")
  perm, dh = handle.permutation, handle.dispatch
  ep = _axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  g_rows = _perm.unpermute(g_x, perm, dh.max_recv, dtype=jnp.float32)
  grad_x = backend.combine(g_rows, dh, axis_name=axis_name).astype(g_x.dtype)
  grad_scales = None
  if g_scales is not None:
    grad_scales = backend.combine(
        _perm.unpermute(g_scales, perm, dh.max_recv, dtype=jnp.float32), dh, axis_name=axis_name
    )
  # Probabilities: place this rank's [M, L] block at its columns of [M, E] so
  # that the cross-rank sum lands every gradient in its own column.
  g_local = _perm.unpermute_values(g_probs, perm)  # [M, L]
  blocks = jnp.zeros((dh.max_recv, ep, num_local), g_local.dtype)
  blocks = jax.lax.dynamic_update_slice_in_dim(blocks, g_local[:, None, :], me, axis=1)
  grad_probs = backend.combine(blocks.reshape(dh.max_recv, ep * num_local), dh,
                               axis_name=axis_name)
  return grad_x, grad_scales, None, grad_probs


_hybrid_dispatch.defvjp(_hybrid_dispatch_fwd, _hybrid_dispatch_bwd)


def hybrid_ep_dispatch(
    x: jax.Array,
    routing_map: jax.Array,
    probs: jax.Array,
    num_local_experts: int,
    axis_name: str = "ep",
    *,
    scaling_factor: Optional[jax.Array] = None,
    num_permuted_tokens: Optional[int] = None,
    pad_multiple: Optional[int] = None,
    topk: Optional[int] = None,
    max_recv_tokens: Optional[int] = None,
    implementation: Optional[str] = None,
) -> tuple[jax.Array, jax.Array, Optional[jax.Array], jax.Array, HybridEPHandle]:
  """Dispatch fused with permute-by-expert (HybridEP semantics).

  Args:
    x: ``[T, H]`` rows; bf16/f16/f32, or ``float8_e4m3fn`` with
      ``scaling_factor``.
    routing_map: ``[T, E]`` bool multi-hot, ``E = ep_size * num_local_experts``.
    probs: ``[T, E]`` floating weights (only routed entries are used).
    num_local_experts: experts per rank.
    axis_name: the expert-parallel axis.
    scaling_factor: ``[T, ceil(H / 128)]`` float32 FP8 scales, permuted with
      the rows.
    num_permuted_tokens: static rows ``N`` of the permuted buffer. Default:
      the worst case for ``topk`` experts per token (see
      :func:`jax_moe_dispatch.permute.max_permuted_rows`); one of the two is
      required. Rows past ``N`` are dropped (last experts' last rows first).
    pad_multiple: pad each expert's group to a multiple of this (default 1).
    topk: most experts one token is routed to; sizes the default ``N``.
    max_recv_tokens: rows of the intermediate receive buffer (default
      ``ep_size * T``).
    implementation: ``"auto"``, ``"native"`` or ``"reference"``.

  Returns:
    ``(permuted_x [N, H], permuted_probs [N], permuted_scaling_factor or None,
    tokens_per_expert [L], handle)``; groups are expert-major, ordered within
    by (source rank, source token), padding rows zero.
  """
  rows, _ = _check_rows(x if scaling_factor is None else (x, scaling_factor), "x")
  ep = _axis_size(axis_name)
  num_tokens = rows.shape[0]
  if not isinstance(num_local_experts, int) or num_local_experts <= 0:
    raise ValueError(f"num_local_experts must be a positive int, got {num_local_experts!r}.")
  num_experts = ep * num_local_experts
  if routing_map.shape != (num_tokens, num_experts):
    raise ValueError(
        f"routing_map must be [T={num_tokens}, E={num_experts}] (ep_size {ep} x "
        f"{num_local_experts} local experts), got {routing_map.shape}."
    )
  if routing_map.dtype != jnp.bool_:
    raise TypeError(f"routing_map must be bool, got {routing_map.dtype}.")
  if probs.shape != routing_map.shape or not jnp.issubdtype(probs.dtype, jnp.floating):
    raise ValueError(f"probs must be floating {routing_map.shape}, got {probs.dtype}{probs.shape}.")
  pad = 1 if pad_multiple is None else pad_multiple
  if not isinstance(pad, int) or pad <= 0:
    raise ValueError(f"pad_multiple must be a positive int, got {pad_multiple!r}.")
  max_recv = _check_max_recv(max_recv_tokens, num_tokens, ep)
  if num_permuted_tokens is None:
    if topk is None:
      raise ValueError(
          "hybrid_ep_dispatch needs a static size for the permuted buffer. Fix: pass "
          "num_permuted_tokens=N, or topk=K (experts per token) to use the worst case."
      )
    num_permuted_tokens = _perm.max_permuted_rows(max_recv, num_local_experts, topk, pad)
  return _hybrid_dispatch(rows, scaling_factor, routing_map, probs, num_local_experts,
                          axis_name, max_recv, num_permuted_tokens, pad, implementation)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _hybrid_combine(x, handle, axis_name, implementation):
  # The per-rank sum over local experts stays float32 through the cross-rank
  # combine, so each token is rounded to x.dtype once.
  rows = _perm.unpermute(x, handle.permutation, handle.dispatch.max_recv, dtype=jnp.float32)
  out = get_backend(implementation, "hybridep").combine(rows, handle.dispatch, axis_name=axis_name)
  return out.astype(x.dtype)


def _hybrid_combine_fwd(x, handle, axis_name, implementation):
  return _hybrid_combine(x, handle, axis_name, implementation), handle


def _hybrid_combine_bwd(axis_name, implementation, handle, g):
  (g_rows,) = get_backend(implementation, "hybridep").dispatch_cached([g], handle.dispatch, axis_name=axis_name)
  return _perm.permute(g_rows, handle.permutation), None


_hybrid_combine.defvjp(_hybrid_combine_fwd, _hybrid_combine_bwd)


def hybrid_ep_combine(
    x: jax.Array,
    handle: HybridEPHandle,
    axis_name: str = "ep",
    *,
    num_permuted_tokens: Optional[int] = None,
    pad_multiple: Optional[int] = None,
    implementation: Optional[str] = None,
) -> jax.Array:
  """Combine fused with unpermute: ``[N, H]`` expert rows -> ``[T, H]`` tokens.

  Each token's rows are summed over its local experts, then over ranks, in
  float32. ``num_permuted_tokens`` and ``pad_multiple`` are accepted for parity
  with the seed and must match the dispatch if given.
  """
  perm = handle.permutation
  if num_permuted_tokens is not None and num_permuted_tokens != perm.num_rows:
    raise ValueError(
        f"num_permuted_tokens={num_permuted_tokens} differs from the dispatch's {perm.num_rows}."
    )
  del pad_multiple  # Encoded in the handle.
  if x.ndim != 2 or x.shape[0] != perm.num_rows:
    raise ValueError(f"x must be [N={perm.num_rows}, H], got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == FP8_DTYPE:
    raise TypeError(f"x must be bf16/f16/f32 for combine, got {x.dtype}.")
  _axis_size(axis_name)
  return _hybrid_combine(x, handle, axis_name, implementation)
