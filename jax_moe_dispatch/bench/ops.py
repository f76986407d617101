"""What the dispatch suite times: our public ops and the JAX baselines, as per-rank functions.

Every call of the library's public API made by the benchmark is in this
module. Each builder returns a function of per-rank arrays, to run inside
``jax.shard_map`` over a 1-D mesh whose axis is :data:`AXIS`; ours take the
implementation and the native kernels' SM count as arguments.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jax_moe_dispatch import fused_a2a
from jax_moe_dispatch.backends import buffer
from jax_moe_dispatch.core import native_permute, permute as xla_permute, routing
from jax_moe_dispatch.core.fp8 import quantize_fp8

AXIS = "ep"


def native_status() -> tuple[bool, str]:
  """(whether the native backend can run here, why not or ``"available"``)."""
  try:
    from jax_moe_dispatch.backends import native
  except Exception as e:  # Not built or not importable.
    return False, f"native backend not importable ({type(e).__name__}: {e})"
  if native.native_available():
    return True, "available"
  return False, native.native_unavailable_reason()


def prepare_native(mesh: jax.sharding.Mesh, hidden_bytes: int, num_tokens: int) -> None:
  """Set up the native backend's buffers for rows of up to ``hidden_bytes``."""
  buffer.get_buffer(mesh, hidden_bytes, axis_name=AXIS, max_num_tokens=num_tokens)


# ----------------------------------------------------------------------------
# Ours.


def dispatch(impl: str, num_sms: int, num_experts: int, max_recv: int) -> Callable:
  """``(x [T, H], idx [T, K], probs [T, K]) -> fused_dispatch outputs``; ``x`` may be ``(rows, scales)``."""
  def f(x, idx, probs):
    return fused_a2a.fused_dispatch(x, idx, probs, num_experts, AXIS, max_recv_tokens=max_recv,
                                    implementation=impl, num_sms=num_sms)
  return f


def dispatch_fp8(impl: str, num_sms: int, num_experts: int, max_recv: int) -> Callable:
  """``(xq, scales, idx, probs) -> fused_dispatch outputs`` of FP8 rows with their scales."""
  bf16 = dispatch(impl, num_sms, num_experts, max_recv)
  return lambda xq, xs, idx, probs: bf16((xq, xs), idx, probs)


def combine(impl: str, num_sms: int) -> Callable:
  """``(y [M, H], handle) -> fused_combine output [T, H]``."""
  return lambda y, handle: fused_a2a.fused_combine(y, handle, AXIS, implementation=impl, num_sms=num_sms)


def hybrid_dispatch(impl: str, num_sms: int, num_local: int, num_rows: int, pad_multiple: int,
                    max_recv: int) -> Callable:
  """``(x [T, H], routing_map [T, E], probs [T, E]) -> hybrid_ep_dispatch outputs``."""
  def f(x, routing_map, probs):
    return fused_a2a.hybrid_ep_dispatch(x, routing_map, probs, num_local, AXIS, num_permuted_tokens=num_rows,
                                        pad_multiple=pad_multiple, max_recv_tokens=max_recv,
                                        implementation=impl, num_sms=num_sms)
  return f


def permute(impl: str, num_local: int, num_rows: int, pad_multiple: int, topk: int) -> Callable:
  """``(recv_x [M, H], recv_idx [M, K], recv_probs [M, K]) -> (rows [N, H], probs [N], permutation)``:
  the deepep dispatcher's ``dispatch_postprocess``, on the native kernels (``impl="native"``,
  ``moe_permute_fusion=True``) or in XLA (``"reference"``)."""
  mod = native_permute if impl == "native" else xla_permute

  def f(x, idx, probs):
    local_map, local_probs = routing.topk_to_multihot(idx, probs, num_local)
    return mod.group_by_expert(x, local_map, local_probs, num_rows, pad_multiple, topk)
  return f


def unpermute(impl: str, max_recv: int) -> Callable:
  """``(rows [N, H], permutation) -> [M, H]``: the deepep dispatcher's ``combine_preprocess``,
  native or XLA as :func:`permute`."""
  mod = native_permute if impl == "native" else xla_permute
  return lambda rows, perm: mod.unpermute(rows, perm, max_recv)


def hybrid_combine(impl: str, num_sms: int) -> Callable:
  """``(y [N, H], handle) -> hybrid_ep_combine output [T, H]``."""
  return lambda y, handle: fused_a2a.hybrid_ep_combine(y, handle, AXIS, implementation=impl, num_sms=num_sms)


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """FP8 rows and their per-128-column scales (``quantize_fp8``), made before timing."""
  return quantize_fp8(x)


def scale_by_rank(rows: jax.Array) -> jax.Array:
  """``rows * 2**rank``, exact in bf16: combine inputs whose sums are exact, so checkable bit for bit."""
  s = jnp.exp2(jax.lax.axis_index(AXIS).astype(jnp.float32))
  return (rows.astype(jnp.float32) * s).astype(rows.dtype)


# ----------------------------------------------------------------------------
# Baselines.


def ragged_dispatch(num_experts: int) -> Callable:
  """What a user writes to dispatch with ``jax.lax.ragged_all_to_all``.

  Same tokens and output layout as ``fused_dispatch`` (rank-major, token
  order, zero padding, ``R * T`` rows): destination mask -> packed send buffer
  (gather) -> counts all-gathered -> offsets -> ``ragged_all_to_all`` of the
  rows, and a second one of the ``[ids | probs bits]`` metadata.
  """
  def f(x, idx, probs):
    ranks = jax.lax.axis_size(AXIS)
    me = jax.lax.axis_index(AXIS)
    tokens, topk = idx.shape
    num_local = num_experts // ranks
    on_rank = idx[:, None, :] // num_local == jnp.arange(ranks)[None, :, None]  # [T, R, K]
    dest = on_rank.any(axis=-1)  # [T, R]
    d32 = dest.astype(jnp.int32)
    counts = d32.sum(axis=0)  # [R]
    starts = jnp.cumsum(counts) - counts
    slot = jnp.where(dest, starts[None, :] + jnp.cumsum(d32, axis=0) - 1, ranks * tokens)  # [T, R]
    tok = jnp.broadcast_to(jnp.arange(tokens, dtype=jnp.int32)[:, None], (tokens, ranks))
    dst = jnp.broadcast_to(jnp.arange(ranks, dtype=jnp.int32)[None, :], (tokens, ranks))
    src_tok = jnp.zeros((ranks * tokens,), jnp.int32).at[slot].set(tok, mode="drop")
    src_dst = jnp.zeros((ranks * tokens,), jnp.int32).at[slot].set(dst, mode="drop")
    send = jnp.take(x, src_tok, axis=0)
    local_ids = jnp.where(on_rank, idx[:, None, :] - jnp.arange(ranks)[None, :, None] * num_local, -1)
    local_probs = jnp.where(on_rank, probs[:, None, :], 0.0).astype(jnp.float32)
    meta = jnp.concatenate(
        [local_ids.astype(jnp.int32), jax.lax.bitcast_convert_type(local_probs, jnp.int32)], axis=-1)
    send_meta = meta[src_tok, src_dst]  # [R*T, 2K]
    all_counts = jax.lax.all_gather(counts, AXIS)  # [R(src), R(dst)]
    out_offsets = (jnp.cumsum(all_counts, axis=0) - all_counts)[me]
    recv_sizes = all_counts[:, me]
    rows = jax.lax.ragged_all_to_all(send, jnp.zeros((ranks * tokens,) + x.shape[1:], x.dtype), starts,
                                     counts, out_offsets, recv_sizes, axis_name=AXIS)
    meta_out = jax.lax.ragged_all_to_all(send_meta, jnp.zeros((ranks * tokens, 2 * topk), jnp.int32),
                                         starts, counts, out_offsets, recv_sizes, axis_name=AXIS)
    return rows, meta_out
  return f


def dense_slots(num_experts: int) -> Callable:
  """``(x [T, H], idx [T, K]) -> [R, T, H]``: slot ``d`` holds rank ``d``'s tokens, packed, zero padded."""
  def f(x, idx):
    ranks = jax.lax.axis_size(AXIS)
    tokens = x.shape[0]
    dest = (idx[:, :, None] // (num_experts // ranks) == jnp.arange(ranks)).any(axis=1)  # [T, R]
    pos = jnp.where(dest, jnp.cumsum(dest.astype(jnp.int32), axis=0) - 1, tokens)
    dst = jnp.broadcast_to(jnp.arange(ranks)[None, :], pos.shape)
    slots = jnp.zeros((ranks, tokens) + x.shape[1:], x.dtype)
    return slots.at[dst, pos].set(jnp.broadcast_to(x[:, None], (tokens, ranks) + x.shape[1:]), mode="drop")
  return f


def dense_all_to_all(slots: jax.Array) -> jax.Array:
  """The dense baseline: ``jax.lax.all_to_all`` of the padded ``[R, T, H]`` slots."""
  return jax.lax.all_to_all(slots, AXIS, 0, 0, tiled=True)


def ppermute_ring(buf: jax.Array) -> jax.Array:
  """The copy baseline: every rank sends ``buf`` to the next rank (``jax.lax.ppermute``)."""
  ranks = jax.lax.axis_size(AXIS)
  return jax.lax.ppermute(buf, AXIS, [(i, (i + 1) % ranks) for i in range(ranks)])
