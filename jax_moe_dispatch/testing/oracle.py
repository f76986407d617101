"""An independent NumPy oracle of dispatch, combine and the expert-major permutation.

The tests and the benchmark check the library against this module. It is
written from the specification (the docstrings of :mod:`jax_moe_dispatch.fused_a2a`,
:mod:`jax_moe_dispatch.core.permute` and :mod:`jax_moe_dispatch.backends.base`) and
imports no JAX. It lists rows explicitly: for each destination rank, its
sources in rank order and, for each source, the tokens it sends in token order
(``np.flatnonzero``); for each local expert, its rows in receive order. It never
uses the library's prefix-sum/scatter formulation. Work is vectorised within
each (destination, source) or (rank, expert) block, so benchmark-size data
(8 ranks x 4096 tokens, hidden 7168) is checked in seconds.

Every function takes the data of *all* ranks at once: arrays carry a leading
rank axis ``[R, ...]``. Conventions: ``R`` ranks, ``T`` tokens per rank, ``M``
receive rows per rank, ``L`` local experts per rank, ``N`` permuted rows per
rank. Expert ``e`` lives on rank ``e // L`` as local expert ``e % L``. Row
payloads are copied bitwise (the NumPy dtype is kept, ml_dtypes types
included); sums are done in float64.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional

import numpy as np


# ----------------------------------------------------------------------------
# Rank-level layout (backends/base.py).


@dataclasses.dataclass
class Layout:
  """The rank-major receive layout of one dispatch, for all ranks.

  Rank ``d`` receives, in this order, the tokens of rank 0 routed to it (in
  token order), then those of rank 1, and so on; rows at or past ``M`` are
  dropped. Kept rows fill rows ``0 .. recv_count[d].sum() - 1``.

  Attributes:
    num_ranks, num_tokens, max_recv: ``R``, ``T``, ``M``.
    recv_rank: ``[R(dst), M]`` source rank of each row, -1 padding.
    recv_token: ``[R(dst), M]`` source token index of each row, -1 padding.
    send_pos: ``[R(src), T, R(dst)]`` position of token ``t`` in the list
      ``s`` sends to ``d``, -1 if not sent or dropped.
    dest_offset: ``[R(src), R(dst)]`` row where ``s``'s list starts at ``d``
      (raw counts, before dropping).
    recv_count: ``[R(dst), R(src)]`` rows ``d`` kept from ``s``.
    dropped: set of ``(s, t, d)`` whose row would have been ``>= M``.
  """

  num_ranks: int
  num_tokens: int
  max_recv: int
  recv_rank: np.ndarray
  recv_token: np.ndarray
  send_pos: np.ndarray
  dest_offset: np.ndarray
  recv_count: np.ndarray
  dropped: set

  def kept(self, d: int) -> tuple[np.ndarray, np.ndarray]:
    """``(source ranks, source tokens)`` of rank ``d``'s kept rows, in row order."""
    n = int(self.recv_count[d].sum())
    return self.recv_rank[d, :n], self.recv_token[d, :n]

  def blocks(self, d: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(s, first row, tokens)`` for each source of rank ``d``, in row order."""
    row = 0
    for s in range(self.num_ranks):
      count = int(self.recv_count[d, s])
      yield s, row, self.recv_token[d, row:row + count]
      row += count

  @property
  def sources(self) -> list[list[tuple[int, int]]]:
    """``sources[d][row] = (s, t)``: the kept rows of rank ``d`` in order."""
    return [list(zip(*(a.tolist() for a in self.kept(d)))) for d in range(self.num_ranks)]


def layout(dest_mask: np.ndarray, max_recv: Optional[int] = None) -> Layout:
  """Layout for ``dest_mask[s, t, d]`` (token ``t`` of rank ``s`` goes to ``d``)."""
  dest_mask = np.asarray(dest_mask, bool)
  num_ranks, num_tokens, num_dst = dest_mask.shape
  assert num_dst == num_ranks, dest_mask.shape
  m = num_ranks * num_tokens if max_recv is None else max_recv
  recv_rank = np.full((num_ranks, m), -1, np.int64)
  recv_token = np.full((num_ranks, m), -1, np.int64)
  send_pos = np.full((num_ranks, num_tokens, num_ranks), -1, np.int64)
  dest_offset = np.zeros((num_ranks, num_ranks), np.int64)
  recv_count = np.zeros((num_ranks, num_ranks), np.int64)
  dropped = set()
  for d in range(num_ranks):
    row = 0  # Next row of d's buffer, counting rows that fall off the end.
    for s in range(num_ranks):
      tokens = np.flatnonzero(dest_mask[s, :, d])
      keep = min(len(tokens), max(0, m - row))
      dest_offset[s, d] = row
      send_pos[s, tokens[:keep], d] = np.arange(keep)
      recv_count[d, s] = keep
      recv_rank[d, row:row + keep] = s
      recv_token[d, row:row + keep] = tokens[:keep]
      dropped.update((s, int(t), d) for t in tokens[keep:])
      row += len(tokens)
  return Layout(num_ranks, num_tokens, m, recv_rank, recv_token, send_pos, dest_offset,
                recv_count, dropped)


def move(lay: Layout, payload: np.ndarray) -> np.ndarray:
  """Dispatch ``[R, T, ...]`` rows: ``[R, M, ...]``, same dtype, zero padding."""
  payload = np.asarray(payload)
  out = np.zeros((lay.num_ranks, lay.max_recv) + payload.shape[2:], payload.dtype)
  for d in range(lay.num_ranks):
    for s, row, tokens in lay.blocks(d):
      out[d, row:row + len(tokens)] = payload[s, tokens]
  return out


def move_sliced(lay: Layout, payload: np.ndarray) -> np.ndarray:
  """Dispatch ``[R, T, R, ...]`` slices: rank ``d`` gets ``payload[s, t, d]``."""
  payload = np.asarray(payload)
  out = np.zeros((lay.num_ranks, lay.max_recv) + payload.shape[3:], payload.dtype)
  for d in range(lay.num_ranks):
    for s, row, tokens in lay.blocks(d):
      out[d, row:row + len(tokens)] = payload[s, tokens, d]
  return out


def combine(lay: Layout, rows: np.ndarray) -> np.ndarray:
  """``[R, M, ...]`` rows back to ``[R, T, ...]`` (float64): sum over kept rows."""
  rows = np.asarray(rows)
  out = np.zeros((lay.num_ranks, lay.num_tokens) + rows.shape[2:], np.float64)
  for d in range(lay.num_ranks):
    for s, row, tokens in lay.blocks(d):  # Tokens of one block are distinct.
      out[s, tokens] += rows[d, row:row + len(tokens)].astype(np.float64)
  return out


def reach(lay: Layout) -> np.ndarray:
  """``[R, T]``: how many ranks kept a row of each token."""
  out = np.zeros((lay.num_ranks, lay.num_tokens), np.int64)
  for d in range(lay.num_ranks):
    for s, _, tokens in lay.blocks(d):
      out[s, tokens] += 1
  return out


def padded_slots(lay: Layout, payload: np.ndarray) -> np.ndarray:
  """``[R(dst), R(src), T, ...]``: what a dense all-to-all of padded slots delivers.

  ``out[d, s]`` holds the rows rank ``s`` keeps for ``d``, in token order, zero
  padded to ``T`` rows.
  """
  payload = np.asarray(payload)
  num_ranks, num_tokens = lay.num_ranks, lay.num_tokens
  out = np.zeros((num_ranks, num_ranks, num_tokens) + payload.shape[2:], payload.dtype)
  for d in range(num_ranks):
    for s, _, tokens in lay.blocks(d):
      out[d, s, :len(tokens)] = payload[s, tokens]
  return out


# ----------------------------------------------------------------------------
# DeepEP semantics (fused_dispatch / fused_combine).


def expert_dest_mask(token_indices: np.ndarray, num_experts: int) -> np.ndarray:
  """``[R, T, R]``: token goes to every rank owning at least one of its experts."""
  token_indices = np.asarray(token_indices)
  num_ranks, num_tokens, _ = token_indices.shape
  num_local = num_experts // num_ranks
  mask = np.zeros((num_ranks, num_tokens, num_ranks), bool)
  s, t, k = np.nonzero(token_indices >= 0)
  mask[s, t, token_indices[s, t, k] // num_local] = True
  return mask


def _owned(token_indices: np.ndarray, num_local: int, d: int) -> np.ndarray:
  """Where ``token_indices`` names an expert of rank ``d``."""
  return (token_indices >= 0) & (token_indices // num_local == d)


def fused_dispatch(x, token_indices, token_probs, num_experts, max_recv=None, scales=None):
  """Oracle of :func:`fused_dispatch` for all ranks; returns a dict.

  Keys: ``layout``, ``recv_x [R, M, ...]``, ``recv_idx [R, M, K]`` (local expert
  ids, -1 where the expert is elsewhere, unrouted or a padding row),
  ``recv_probs [R, M, K]`` (0 where ``recv_idx`` is -1), ``tokens_per_expert
  [R, L]`` and, with ``scales``, ``recv_scales``.
  """
  token_indices = np.asarray(token_indices)
  token_probs = np.asarray(token_probs)
  num_ranks, _, topk = token_indices.shape
  num_local = num_experts // num_ranks
  lay = layout(expert_dest_mask(token_indices, num_experts), max_recv)
  m = lay.max_recv
  recv_idx = np.full((num_ranks, m, topk), -1, np.int64)
  recv_probs = np.zeros((num_ranks, m, topk), token_probs.dtype)
  tpe = np.zeros((num_ranks, num_local), np.int64)
  for d in range(num_ranks):
    rs, ts = lay.kept(d)
    ids = token_indices[rs, ts]  # [n, K] global expert ids.
    own = _owned(ids, num_local, d)
    recv_idx[d, :len(rs)] = np.where(own, ids - d * num_local, -1)
    recv_probs[d, :len(rs)] = np.where(own, token_probs[rs, ts], np.zeros((), token_probs.dtype))
    tpe[d] = np.bincount(ids[own] - d * num_local, minlength=num_local)
  out = dict(layout=lay, recv_x=move(lay, x), recv_idx=recv_idx,
             recv_probs=recv_probs, tokens_per_expert=tpe)
  if scales is not None:
    out["recv_scales"] = move(lay, scales)
  return out


def fused_dispatch_vjp(lay: Layout, token_indices, num_experts, g_x, g_probs):
  """Cotangents of (recv_x, recv_probs) -> (grad x, grad probs), float64.

  Dispatch's backward is a combine: each source token gets the sum of the
  gradient rows of the ranks that kept it; a probability gets the gradient of
  the one rank that owns its expert (0 if dropped there or unrouted).
  """
  token_indices = np.asarray(token_indices)
  num_ranks, num_tokens, topk = token_indices.shape
  num_local = num_experts // num_ranks
  grad_x = combine(lay, g_x)
  g_probs = np.asarray(g_probs).astype(np.float64)
  grad_probs = np.zeros((num_ranks, num_tokens, topk), np.float64)
  for d in range(num_ranks):
    rs, ts = lay.kept(d)  # Distinct (s, t) within one rank.
    own = _owned(token_indices[rs, ts], num_local, d)
    grad_probs[rs, ts] += np.where(own, g_probs[d, :len(rs)], 0.0)
  return grad_x, grad_probs


# ----------------------------------------------------------------------------
# Expert-major permutation (core/permute.py) and HybridEP semantics.


def max_permuted_rows(max_recv, num_local, topk, pad_multiple):
  """Worst case: every received row on min(topk, L) experts, each group padded."""
  return max_recv * min(topk, num_local) + num_local * (pad_multiple - 1)


def permutation(local_map: np.ndarray, num_rows: int, pad_multiple: int = 1) -> dict:
  """One rank's permutation of ``[M, L]`` routed rows into ``N`` expert-major rows.

  Returns dict with ``src_row [N]`` (-1 padding), ``perm_row [M, L]`` (-1 where
  unrouted or dropped), ``expert_of [N]`` (group of each written row, -1 for
  rows past the last group), ``tokens_per_expert [L]`` (padded group sizes,
  clipped at N).
  """
  local_map = np.asarray(local_map, bool)
  m, num_local = local_map.shape
  src_row = np.full((num_rows,), -1, np.int64)
  perm_row = np.full((m, num_local), -1, np.int64)
  expert_of = np.full((num_rows,), -1, np.int64)
  tpe = np.zeros((num_local,), np.int64)
  start = 0
  for e in range(num_local):
    members = np.flatnonzero(local_map[:, e])  # Receive order.
    padded = math.ceil(len(members) / pad_multiple) * pad_multiple
    pos = start + np.arange(len(members))
    written = pos < num_rows  # Rows at or past N are dropped.
    src_row[pos[written]] = members[written]
    perm_row[members[written], e] = pos[written]
    expert_of[start:min(start + padded, num_rows)] = e
    tpe[e] = min(start + padded, num_rows) - min(start, num_rows)
    start += padded
  return dict(src_row=src_row, perm_row=perm_row, expert_of=expert_of, tokens_per_expert=tpe)


def permute_rows(rows: np.ndarray, perm: dict) -> np.ndarray:
  """``[M, ...]`` -> ``[N, ...]``, same dtype, zero padding rows."""
  rows = np.asarray(rows)
  src = perm["src_row"]
  out = np.zeros((src.shape[0],) + rows.shape[1:], rows.dtype)
  written = src >= 0
  out[written] = rows[src[written]]
  return out


def permute_values(values: np.ndarray, perm: dict) -> np.ndarray:
  """``[M, L]`` per (row, expert) -> ``[N]`` (0 on padding)."""
  values = np.asarray(values)
  out = np.zeros(perm["src_row"].shape, values.dtype)
  i, e = np.nonzero(perm["perm_row"] >= 0)
  out[perm["perm_row"][i, e]] = values[i, e]
  return out


def unpermute_rows(rows: np.ndarray, perm: dict, num_recv: int) -> np.ndarray:
  """``[N, ...]`` -> ``[M, ...]`` float64: each receive row summed over its experts."""
  rows = np.asarray(rows)
  out = np.zeros((num_recv,) + rows.shape[1:], np.float64)
  perm_row = perm["perm_row"]
  for e in range(perm_row.shape[1]):  # Receive rows of one expert are distinct.
    i = np.flatnonzero(perm_row[:, e] >= 0)
    out[i] += rows[perm_row[i, e]].astype(np.float64)
  return out


def unpermute_values(values: np.ndarray, perm: dict) -> np.ndarray:
  """``[N]`` -> ``[M, L]`` (0 where unrouted/dropped)."""
  values = np.asarray(values)
  perm_row = perm["perm_row"]
  out = np.zeros(perm_row.shape, values.dtype)
  i, e = np.nonzero(perm_row >= 0)
  out[i, e] = values[perm_row[i, e]]
  return out


def hybrid_dispatch(x, routing_map, probs, num_local, max_recv=None, num_rows=None,
                    pad_multiple=1, topk=None, scales=None) -> dict:
  """Oracle of :func:`hybrid_ep_dispatch` for all ranks.

  ``routing_map [R, T, E]`` bool, ``probs [R, T, E]``. ``num_rows`` defaults to
  the worst case for ``topk``.
  """
  routing_map = np.asarray(routing_map, bool)
  probs = np.asarray(probs)
  scales = None if scales is None else np.asarray(scales)
  num_ranks, num_tokens, num_experts = routing_map.shape
  assert num_experts == num_ranks * num_local, (routing_map.shape, num_local)
  mask = routing_map.reshape(num_ranks, num_tokens, num_ranks, num_local).any(axis=-1)
  lay = layout(mask, max_recv)
  m = lay.max_recv
  if num_rows is None:
    num_rows = max_permuted_rows(m, num_local, topk, pad_multiple)
  x = np.asarray(x)
  px = np.zeros((num_ranks, num_rows) + x.shape[2:], x.dtype)
  pprobs = np.zeros((num_ranks, num_rows), probs.dtype)
  pscales = None if scales is None else np.zeros((num_ranks, num_rows) + scales.shape[2:], scales.dtype)
  perms = []
  for d in range(num_ranks):
    rs, ts = lay.kept(d)
    cols = slice(d * num_local, (d + 1) * num_local)
    local_map = np.zeros((m, num_local), bool)
    local_probs = np.zeros((m, num_local), probs.dtype)
    local_map[:len(rs)] = routing_map[rs, ts, cols]
    local_probs[:len(rs)] = probs[rs, ts, cols]
    perm = permutation(local_map, num_rows, pad_multiple)
    perms.append(perm)
    # Permuted row p holds receive row src[p], which holds token ts[src[p]] of rank rs[src[p]].
    src = perm["src_row"]
    written = src >= 0
    px[d, written] = x[rs[src[written]], ts[src[written]]]
    if scales is not None:
      pscales[d, written] = scales[rs[src[written]], ts[src[written]]]
    pprobs[d] = permute_values(local_probs, perm)
  return dict(
      layout=lay, perms=perms, num_rows=num_rows, num_local=num_local,
      permuted_x=px, permuted_probs=pprobs, permuted_scales=pscales,
      tokens_per_expert=np.stack([p["tokens_per_expert"] for p in perms]),
      perm_row=np.stack([p["perm_row"] for p in perms]),
      src_row=np.stack([p["src_row"] for p in perms]),
  )


def _expert_groups(h: dict) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
  """``(d, e, permuted rows, source ranks, source tokens)`` of every (rank, expert) group.

  Within one group the sources are distinct (a token has one row per rank and
  that row at most one copy per expert).
  """
  lay = h["layout"]
  for d, perm in enumerate(h["perms"]):
    src = perm["src_row"]
    for e in range(h["num_local"]):
      p = np.flatnonzero((perm["expert_of"] == e) & (src >= 0))
      yield d, e, p, lay.recv_rank[d, src[p]], lay.recv_token[d, src[p]]


def hybrid_combine(h: dict, y: np.ndarray) -> np.ndarray:
  """``[R, N, ...]`` -> ``[R, T, ...]`` float64: per token, the sum of its rows."""
  lay = h["layout"]
  y = np.asarray(y)
  out = np.zeros((lay.num_ranks, lay.num_tokens) + y.shape[2:], np.float64)
  for d, _, p, s, t in _expert_groups(h):
    out[s, t] += y[d, p].astype(np.float64)
  return out


def hybrid_dispatch_vjp(h: dict, g_x: np.ndarray, g_probs: np.ndarray):
  """Cotangents of (permuted_x, permuted_probs) -> (grad x [R,T,H], grad probs [R,T,E])."""
  lay = h["layout"]
  num_local = h["num_local"]
  g_probs = np.asarray(g_probs).astype(np.float64)
  grad_x = hybrid_combine(h, g_x)
  grad_probs = np.zeros((lay.num_ranks, lay.num_tokens, lay.num_ranks * num_local), np.float64)
  for d, e, p, s, t in _expert_groups(h):
    grad_probs[s, t, d * num_local + e] += g_probs[d, p]
  return grad_x, grad_probs


def hybrid_combine_vjp(h: dict, g: np.ndarray) -> np.ndarray:
  """Cotangent ``[R, T, ...]`` of the combine output -> ``[R, N, ...]``."""
  lay = h["layout"]
  g = np.asarray(g)
  out = np.zeros((lay.num_ranks, h["num_rows"]) + g.shape[2:], g.dtype)
  for d, _, p, s, t in _expert_groups(h):
    out[d, p] = g[s, t]
  return out


# ----------------------------------------------------------------------------
# FP8 (core/fp8.py): per-128-column block scales.


def fp8_block_of_column(hidden: int, block: int = 128) -> np.ndarray:
  """Block index of each column: column ``j`` uses scale ``j // block``."""
  return np.arange(hidden) // block


# ----------------------------------------------------------------------------
# Routing: random test data, and top-k to multi-hot.


def random_topk(rng, num_ranks, num_tokens, topk, num_experts, *, mask_frac=0.2,
                masked_rows=(), kind="random"):
  """``[R, T, K]`` int32 distinct experts per token with some -1 entries.

  kind: ``"random"`` or ``"one_expert"`` (every token's first slot is the same
  expert, its other slots distinct experts of the same rank or -1: the receive
  worst case). ``masked_rows``: token indices whose whole row is -1 on every
  rank.
  """
  idx = np.full((num_ranks, num_tokens, topk), -1, np.int32)
  num_local = num_experts // num_ranks
  hot = int(rng.integers(num_experts))
  owner = hot // num_local
  for s in range(num_ranks):
    for t in range(num_tokens):
      if kind == "random":
        idx[s, t] = rng.permutation(num_experts)[:topk]
        drop = rng.random(topk) < mask_frac
        idx[s, t][drop] = -1
      else:
        others = [e for e in range(owner * num_local, (owner + 1) * num_local) if e != hot]
        others = list(rng.permutation(others)) if others else []
        row = [hot] + others[: topk - 1]
        row += [-1] * (topk - len(row))
        idx[s, t] = rng.permutation(np.array(row, np.int32))
  for t in masked_rows:
    idx[:, t] = -1
  return idx


def topk_to_map(token_indices, token_probs, num_experts):
  """``[R, T, K]`` indices/probs -> ``[R, T, E]`` bool map and dense probs (-1 = unrouted)."""
  token_indices = np.asarray(token_indices)
  token_probs = np.asarray(token_probs)
  num_ranks, num_tokens, _ = token_indices.shape
  routing_map = np.zeros((num_ranks, num_tokens, num_experts), bool)
  probs = np.zeros((num_ranks, num_tokens, num_experts), token_probs.dtype)
  s, t, k = np.nonzero(token_indices >= 0)
  routing_map[s, t, token_indices[s, t, k]] = True
  probs[s, t, token_indices[s, t, k]] = token_probs[s, t, k]
  return routing_map, probs
