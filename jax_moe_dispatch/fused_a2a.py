"""Fused MoE token dispatch and combine: the DeepEP and HybridEP protocols in JAX.

This module has every public name of NeMo AutoModel's ``fused_a2a`` (the
PyTorch seed): the four ops, the buffer lifecycle, the UCCL-EP names (which
raise: UCCL-EP has no JAX port), the ``HAVE_*`` flags, and the seed's autograd
``Function`` classes as namespaces whose ``apply`` is the matching op (the ops
are differentiable themselves).

Call the ops per rank inside :func:`jax.shard_map` (or :func:`jax.pmap`) with
the expert-parallel axis name; experts are sharded contiguously, rank ``r``
owning global experts ``[r * L, (r + 1) * L)`` with ``L = num_experts /
ep_size``. Shapes are static; nothing here synchronises with the host. An op
is a :func:`jax_moe_dispatch.core.transport.dispatch` or
:func:`~jax_moe_dispatch.core.transport.combine` (one ``custom_vjp`` pair, each the
other's backward) plus plain JAX around it, so gradients come from autodiff.
Layouts: :mod:`jax_moe_dispatch.backends.base` and
:mod:`jax_moe_dispatch.core.permute`.

What shapes a trace is an argument: ``implementation`` and ``num_sms`` (the
native kernels' SM budget; ``None`` takes the default of
:func:`set_deepep_num_sms` / :func:`set_hybridep_num_sms` when the op is
called), and the static row counts.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe_dispatch.backends import (DispatchHandle, default_num_sms, set_deepep_num_sms,
                                       set_hybridep_num_sms)
from jax_moe_dispatch.backends.buffer import (free_buffer, get_buffer, get_hidden_bytes,
                                              init_hybrid_ep_buffer, reset_hybrid_ep_buffer)
from jax_moe_dispatch.core import hybrid as _hybrid
from jax_moe_dispatch.core import permute as _perm
from jax_moe_dispatch.core import routing
from jax_moe_dispatch.core.routing import Rows
from jax_moe_dispatch.core.transport import Transport, combine, dispatch

__all__ = [
    "HAVE_DEEP_EP",
    "HAVE_HYBRIDEP",
    "HAVE_UCCL_EP",
    "DispatchHandle",
    "FusedCombine",
    "FusedDispatch",
    "HybridEPCombine",
    "HybridEPDispatch",
    "HybridEPHandle",
    "UCCLFusedCombine",
    "UCCLFusedDispatch",
    "free_buffer",
    "fused_combine",
    "fused_dispatch",
    "get_buffer",
    "get_hidden_bytes",
    "get_uccl_buffer",
    "hybrid_ep_combine",
    "hybrid_ep_dispatch",
    "init_hybrid_ep_buffer",
    "reset_hybrid_ep_buffer",
    "set_deepep_num_sms",
    "set_hybridep_num_sms",
    "set_uccl_num_sms",
    "uccl_fused_combine",
    "uccl_fused_dispatch",
]

# What this build can run: both protocols run on every platform (the reference
# backend needs nothing; jax_moe_dispatch.backends.native.native_available()
# says whether the CUDA kernels run here); UCCL-EP is not available.
HAVE_DEEP_EP = True
HAVE_HYBRIDEP = True
HAVE_UCCL_EP = False


def _transport(axis_name: str, implementation: Optional[str], num_sms: Optional[int],
               protocol: str) -> Transport:
  """The static transport of one op call (``num_sms=None``: the protocol's default now)."""
  return Transport(axis_name, implementation or "auto",
                   default_num_sms(protocol) if num_sms is None else num_sms)


# ----------------------------------------------------------------------------
# DeepEP semantics: fused_dispatch / fused_combine.


def fused_dispatch(
    x: Rows,
    token_indices: jax.Array,
    token_probs: jax.Array,
    num_experts: int,
    axis_name: str = "ep",
    *,
    max_recv_tokens: Optional[int] = None,
    implementation: Optional[str] = None,
    num_sms: Optional[int] = None,
) -> tuple[Rows, jax.Array, jax.Array, jax.Array, DispatchHandle]:
  """Send each token once to every rank that owns one of its experts.

  Args:
    x: ``[T, H]`` rows (bf16/f16/f32), or ``(rows, scales)`` with rows
      ``float8_e4m3fn [T, H]`` and float32 scales ``[T, ceil(H / 128)]``
      (see :func:`jax_moe_dispatch.quantize_fp8`); scales travel with rows.
    token_indices: ``[T, K]`` int32 global expert ids, ``-1`` for no expert.
      The K experts of a token should be distinct. Concrete ids (numpy, or
      jax arrays closed over) outside ``[-1, num_experts)`` raise
      ``ValueError``; traced ids are not checked (that would need a host
      sync), so keeping them in range is the caller's contract.
    token_probs: ``[T, K]`` floating routing weights.
    num_experts: total experts, divisible by the axis size.
    axis_name: the expert-parallel axis.
    max_recv_tokens: static receive rows ``M``; default ``ep_size * T`` (never
      drops). Smaller values drop rows deterministically (base.py).
    implementation: ``"auto"`` (default), ``"native"`` or ``"reference"``.
    num_sms: SMs the native kernels use; default :func:`set_deepep_num_sms`'s.

  Returns:
    ``(recv_x, recv_token_indices, recv_token_probs, tokens_per_expert,
    handle)``: ``recv_x`` ``[M, H]`` (a pair for FP8) rank-major with zero
    padding rows; ``recv_token_indices`` ``[M, K]`` local expert ids, -1 where
    the expert lives elsewhere (and on padding rows); ``recv_token_probs``
    ``[M, K]``, 0 there; ``tokens_per_expert`` ``[L]`` int32 rows per local
    expert; ``handle`` for :func:`fused_combine`.

  Gradients reach ``x`` and ``token_probs`` (a combine of the cotangents).
  """
  rows, scales = routing.check_rows(x, "x")
  ep = routing.axis_size(axis_name)
  transport = _transport(axis_name, implementation, num_sms, "deepep")
  num_local = routing.num_local_experts(num_experts, ep)
  num_tokens = rows.shape[0]
  routing.check_topk_routing(token_indices, token_probs, num_tokens)
  routing.check_index_range(token_indices, num_experts)
  max_recv = routing.max_recv_rows(max_recv_tokens, num_tokens, ep)
  token_indices = token_indices.astype(jnp.int32)
  owner = jnp.where(token_indices >= 0, token_indices // num_local, -1)  # [T, K]
  dest_mask = (owner[:, None, :] == jnp.arange(ep, dtype=jnp.int32)[None, :, None]).any(-1)
  # Global ids travel shifted by one, so that zero padding rows decode to -1.
  payloads = (rows,) + (() if scales is None else (scales,)) + (token_indices + 1, token_probs)
  recv, _, handle = dispatch(dest_mask, payloads, (), transport, max_recv)
  recv_rows, (recv_ids, recv_probs) = recv[:-2], recv[-2:]
  first = jax.lax.axis_index(axis_name) * num_local
  local = recv_ids - 1 - first
  here = (recv_ids > 0) & (local >= 0) & (local < num_local)
  recv_idx = jnp.where(here, local, -1)
  recv_probs = jnp.where(here, recv_probs, jnp.zeros((), recv_probs.dtype))
  tokens_per_expert = jnp.zeros((num_local,), jnp.int32).at[
      jnp.where(here, local, num_local)].add(1, mode="drop")
  recv_x = recv_rows[0] if scales is None else recv_rows
  return recv_x, recv_idx, recv_probs, tokens_per_expert, handle


def fused_combine(
    x: jax.Array,
    handle: DispatchHandle,
    axis_name: str = "ep",
    *,
    implementation: Optional[str] = None,
    num_sms: Optional[int] = None,
) -> jax.Array:
  """Return rows to their source ranks and sum them per token.

  Args:
    x: ``[M, H]`` floating rows in the receive layout of ``handle`` (what
      experts made of :func:`fused_dispatch`'s ``recv_x``, already weighted by
      the probabilities; combine only sums).
    handle: from :func:`fused_dispatch`.
    axis_name, implementation, num_sms: as for :func:`fused_dispatch`.

  Returns:
    ``[T, H]`` (dtype of ``x``): per token, the sum over the ranks it went to,
    accumulated in float32; zeros for tokens sent nowhere. Its backward pass
    dispatches the cotangent along ``handle``.
  """
  routing.check_handle(handle, DispatchHandle, "fused_combine", "fused_dispatch")
  routing.check_combine_rows(x, handle.max_recv, "M")
  routing.axis_size(axis_name)
  return combine(x, handle, _transport(axis_name, implementation, num_sms, "deepep"))


# ----------------------------------------------------------------------------
# HybridEP semantics: dispatch fused with permute, combine fused with unpermute.


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridEPHandle:
  """Metadata of one :func:`hybrid_ep_dispatch`: the dispatch layout and the permutation."""

  dispatch: DispatchHandle
  permutation: _perm.Permutation


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
    num_sms: Optional[int] = None,
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
      :func:`jax_moe_dispatch.core.permute.max_permuted_rows`); one of the two is
      required. Rows past ``N`` are dropped (last experts' last rows first).
    pad_multiple: pad each expert's group to a multiple of this (default 1).
    topk: most experts one token is routed to; sizes the default ``N``.
    max_recv_tokens: rows of the intermediate receive buffer (default
      ``ep_size * T``).
    implementation: ``"auto"``, ``"native"`` or ``"reference"``.
    num_sms: SMs the native kernels use; default :func:`set_hybridep_num_sms`'s.

  Returns:
    ``(permuted_x [N, H], permuted_probs [N], permuted_scaling_factor or None,
    tokens_per_expert [L], handle)``; groups are expert-major, ordered within
    by (source rank, source token), padding rows zero.

  Gradients reach ``x`` and ``probs`` (routed entries; the others get zero).
  """
  rows, _ = routing.check_rows(x if scaling_factor is None else (x, scaling_factor), "x")
  ep = routing.axis_size(axis_name)
  transport = _transport(axis_name, implementation, num_sms, "hybridep")
  num_tokens = rows.shape[0]
  routing.check_positive_int("num_local_experts", num_local_experts)
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
  pad = 1 if pad_multiple is None else routing.check_positive_int("pad_multiple", pad_multiple)
  max_recv = routing.max_recv_rows(max_recv_tokens, num_tokens, ep)
  if num_permuted_tokens is None:
    if topk is None:
      raise ValueError(
          "hybrid_ep_dispatch needs a static size for the permuted buffer. Fix: pass "
          "num_permuted_tokens=N, or topk=K (experts per token) to use the worst case."
      )
    routing.check_positive_int("topk", topk)
    num_permuted_tokens = _perm.max_permuted_rows(max_recv, num_local_experts, topk, pad)
  elif (isinstance(num_permuted_tokens, bool)
        or not isinstance(num_permuted_tokens, (int, np.integer)) or num_permuted_tokens < 0):
    raise ValueError(
        f"num_permuted_tokens must be an int >= 0, got {num_permuted_tokens!r}. Fix: pass the "
        "static row count of the permuted buffer, or topk=K to use the worst case.")
  # Each destination gets its own [L] slice of the routing map and probabilities.
  local_map = routing_map.reshape(num_tokens, ep, num_local_experts)
  local_probs = probs.reshape(num_tokens, ep, num_local_experts)
  payloads = (rows,) if scaling_factor is None else (rows, scaling_factor)
  permuted, permuted_probs, handle, perm = _hybrid.dispatch(
      local_map.any(axis=-1), payloads, local_map, local_probs, transport, max_recv,
      num_permuted_tokens, pad)
  permuted_scales = None if scaling_factor is None else permuted[1]
  return (permuted[0], permuted_probs, permuted_scales, perm.tokens_per_expert,
          HybridEPHandle(handle, perm))


def hybrid_ep_combine(
    x: jax.Array,
    handle: HybridEPHandle,
    axis_name: str = "ep",
    *,
    num_permuted_tokens: Optional[int] = None,
    pad_multiple: Optional[int] = None,
    implementation: Optional[str] = None,
    num_sms: Optional[int] = None,
) -> jax.Array:
  """Combine fused with unpermute: ``[N, H]`` expert rows -> ``[T, H]`` tokens.

  Each token's rows are summed in float32 and rounded once to the dtype of
  ``x``: for each rank the token went to, in ascending rank order, the sum of
  its rows there in ascending local-expert order is added to the token's
  total (:mod:`jax_moe_dispatch.core.hybrid`). ``num_permuted_tokens`` and
  ``pad_multiple`` are accepted for parity with the seed and must match the
  dispatch if given. Its backward pass dispatches the cotangent along the
  handle straight into the permuted rows.
  """
  routing.check_handle(handle, HybridEPHandle, "hybrid_ep_combine", "hybrid_ep_dispatch")
  perm = handle.permutation
  if num_permuted_tokens is not None and num_permuted_tokens != perm.num_rows:
    raise ValueError(
        f"num_permuted_tokens={num_permuted_tokens} differs from the dispatch's {perm.num_rows}."
    )
  del pad_multiple  # Encoded in the handle.
  routing.check_combine_rows(x, perm.num_rows, "N")
  routing.axis_size(axis_name)
  transport = _transport(axis_name, implementation, num_sms, "hybridep")
  return _hybrid.combine(x, handle.dispatch, perm, transport)


# ----------------------------------------------------------------------------
# The seed's autograd Functions: here the ops are differentiable themselves, so
# each class is a namespace whose ``apply`` is the op (arguments as the op's).


class FusedDispatch:
  """``FusedDispatch.apply(...)`` is :func:`fused_dispatch`."""

  apply = staticmethod(fused_dispatch)


class FusedCombine:
  """``FusedCombine.apply(...)`` is :func:`fused_combine`."""

  apply = staticmethod(fused_combine)


class HybridEPDispatch:
  """``HybridEPDispatch.apply(...)`` is :func:`hybrid_ep_dispatch`."""

  apply = staticmethod(hybrid_ep_dispatch)


class HybridEPCombine:
  """``HybridEPCombine.apply(...)`` is :func:`hybrid_ep_combine`."""

  apply = staticmethod(hybrid_ep_combine)


# ----------------------------------------------------------------------------
# UCCL-EP: the names exist for import compatibility and raise.


def _uccl_unavailable(name: str) -> NotImplementedError:
  return NotImplementedError(
      f"{name}: UCCL-EP is not available in this build of jax_moe_dispatch (it has no JAX "
      "port). Fix: use the DeepEP protocol (fused_dispatch / fused_combine, or "
      "moe_flex_dispatcher_backend='deepep') or HybridEP (hybrid_ep_dispatch / "
      "hybrid_ep_combine, 'hybridep'); both run on every platform.")


def get_uccl_buffer(*args, **kwargs):
  """Raises ``NotImplementedError``: UCCL-EP is not available in this build."""
  raise _uccl_unavailable("get_uccl_buffer")


def set_uccl_num_sms(num_sms: int) -> None:
  """Raises ``NotImplementedError``: UCCL-EP is not available in this build."""
  raise _uccl_unavailable("set_uccl_num_sms")


def uccl_fused_dispatch(*args, **kwargs):
  """Raises ``NotImplementedError``: UCCL-EP is not available in this build."""
  raise _uccl_unavailable("uccl_fused_dispatch")


def uccl_fused_combine(*args, **kwargs):
  """Raises ``NotImplementedError``: UCCL-EP is not available in this build."""
  raise _uccl_unavailable("uccl_fused_combine")


class UCCLFusedDispatch:
  """``UCCLFusedDispatch.apply(...)`` is :func:`uccl_fused_dispatch` (raises)."""

  apply = staticmethod(uccl_fused_dispatch)


class UCCLFusedCombine:
  """``UCCLFusedCombine.apply(...)`` is :func:`uccl_fused_combine` (raises)."""

  apply = staticmethod(uccl_fused_combine)
