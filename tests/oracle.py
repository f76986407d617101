"""An independent numpy oracle for the dispatch/combine/permute layouts.

Written from the specification only (docstrings of ``backends/base.py``,
``permute.py`` and ``fused_a2a.py``, DESIGN.md section 3), with plain Python
loops over ranks, tokens and rows; it imports no JAX and does not mirror the
library's cumsum/scatter formulation. Every function takes the data of *all*
ranks at once: arrays carry a leading rank axis ``[R, ...]``.

Conventions: ``R`` ranks, ``T`` tokens per rank, ``M`` receive rows per rank,
``L`` local experts per rank, ``N`` permuted rows per rank. Expert ``e`` lives on
rank ``e // L`` as local expert ``e % L``. Row payloads are copied bitwise (the
numpy dtype is kept, ml_dtypes types included); sums are done in float64.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


# ----------------------------------------------------------------------------
# Rank-level layout (backends/base.py).


@dataclasses.dataclass
class Layout:
  """The rank-major receive layout of one dispatch, for all ranks.

  Attributes:
    num_ranks, num_tokens, max_recv: ``R``, ``T``, ``M``.
    sources: ``sources[d][row] = (s, t)``: the kept rows of rank ``d`` in order.
    send_pos: ``[R(src), T, R(dst)]`` position of token ``t`` in the list
      ``s`` sends to ``d``, -1 if not sent or dropped.
    dest_offset: ``[R(src), R(dst)]`` row where ``s``'s list starts at ``d``
      (raw counts, before dropping).
    recv_count: ``[R(dst), R(src)]`` rows ``d`` kept from ``s``.
    recv_token: ``[R(dst), M]`` source token index of each row, -1 padding.
    dropped: set of ``(s, t, d)`` whose row would have been ``>= M``.
  """

  num_ranks: int
  num_tokens: int
  max_recv: int
  sources: list
  send_pos: np.ndarray
  dest_offset: np.ndarray
  recv_count: np.ndarray
  recv_token: np.ndarray
  dropped: set

  def row_of(self, s: int, t: int, d: int):
    """Receive row of ``(s, t)`` at ``d``, or None when not there."""
    for row, src in enumerate(self.sources[d]):
      if src == (s, t):
        return row
    return None


def layout(dest_mask: np.ndarray, max_recv: int | None = None) -> Layout:
  """Layout for ``dest_mask[s, t, d]`` (token ``t`` of rank ``s`` goes to ``d``)."""
  dest_mask = np.asarray(dest_mask, bool)
  num_ranks, num_tokens, num_dst = dest_mask.shape
  assert num_dst == num_ranks
  m = num_ranks * num_tokens if max_recv is None else max_recv
  sources = [[] for _ in range(num_ranks)]
  send_pos = np.full((num_ranks, num_tokens, num_ranks), -1, np.int64)
  dest_offset = np.zeros((num_ranks, num_ranks), np.int64)
  recv_count = np.zeros((num_ranks, num_ranks), np.int64)
  recv_token = np.full((num_ranks, m), -1, np.int64)
  dropped = set()
  for d in range(num_ranks):
    row = 0  # Next row of d's buffer, counting rows that fall off the end.
    for s in range(num_ranks):
      dest_offset[s, d] = row
      pos = 0  # Position in the list s sends to d.
      for t in range(num_tokens):
        if not dest_mask[s, t, d]:
          continue
        if row < m:
          sources[d].append((s, t))
          send_pos[s, t, d] = pos
          recv_count[d, s] += 1
          recv_token[d, row] = t
        else:
          dropped.add((s, t, d))
        row += 1
        pos += 1
  return Layout(num_ranks, num_tokens, m, sources, send_pos, dest_offset,
                recv_count, recv_token, dropped)


def move(lay: Layout, payload: np.ndarray) -> np.ndarray:
  """Dispatch ``[R, T, ...]`` rows: ``[R, M, ...]``, same dtype, zero padding."""
  payload = np.asarray(payload)
  out = np.zeros((lay.num_ranks, lay.max_recv) + payload.shape[2:], payload.dtype)
  for d in range(lay.num_ranks):
    for row, (s, t) in enumerate(lay.sources[d]):
      out[d, row] = payload[s, t]
  return out


def move_sliced(lay: Layout, payload: np.ndarray) -> np.ndarray:
  """Dispatch ``[R, T, R, ...]`` slices: rank ``d`` gets ``payload[s, t, d]``."""
  payload = np.asarray(payload)
  out = np.zeros((lay.num_ranks, lay.max_recv) + payload.shape[3:], payload.dtype)
  for d in range(lay.num_ranks):
    for row, (s, t) in enumerate(lay.sources[d]):
      out[d, row] = payload[s, t, d]
  return out


def combine(lay: Layout, rows: np.ndarray) -> np.ndarray:
  """``[R, M, ...]`` rows back to ``[R, T, ...]`` (float64): sum over kept rows."""
  rows = np.asarray(rows).astype(np.float64)
  out = np.zeros((lay.num_ranks, lay.num_tokens) + rows.shape[2:], np.float64)
  for d in range(lay.num_ranks):
    for row, (s, t) in enumerate(lay.sources[d]):
      out[s, t] += rows[d, row]
  return out


def reach(lay: Layout) -> np.ndarray:
  """``[R, T]``: how many ranks kept a row of each token."""
  out = np.zeros((lay.num_ranks, lay.num_tokens), np.int64)
  for d in range(lay.num_ranks):
    for s, t in lay.sources[d]:
      out[s, t] += 1
  return out


# ----------------------------------------------------------------------------
# DeepEP semantics (fused_dispatch / fused_combine).


def expert_dest_mask(token_indices: np.ndarray, num_experts: int) -> np.ndarray:
  """``[R, T, R]``: token goes to every rank owning at least one of its experts."""
  num_ranks, num_tokens, topk = token_indices.shape
  num_local = num_experts // num_ranks
  mask = np.zeros((num_ranks, num_tokens, num_ranks), bool)
  for s in range(num_ranks):
    for t in range(num_tokens):
      for k in range(topk):
        e = int(token_indices[s, t, k])
        if e >= 0:
          mask[s, t, e // num_local] = True
  return mask


def fused_dispatch(x, token_indices, token_probs, num_experts, max_recv=None, scales=None):
  """Oracle of :func:`fused_dispatch` for all ranks; returns a dict."""
  token_indices = np.asarray(token_indices)
  token_probs = np.asarray(token_probs)
  num_ranks, num_tokens, topk = token_indices.shape
  num_local = num_experts // num_ranks
  lay = layout(expert_dest_mask(token_indices, num_experts), max_recv)
  m = lay.max_recv
  recv_idx = np.full((num_ranks, m, topk), -1, np.int64)
  recv_probs = np.zeros((num_ranks, m, topk), token_probs.dtype)
  tpe = np.zeros((num_ranks, num_local), np.int64)
  for d in range(num_ranks):
    for row, (s, t) in enumerate(lay.sources[d]):
      for k in range(topk):
        e = int(token_indices[s, t, k])
        if e >= 0 and e // num_local == d:
          recv_idx[d, row, k] = e - d * num_local
          recv_probs[d, row, k] = token_probs[s, t, k]
          tpe[d, e - d * num_local] += 1
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
    for row, (s, t) in enumerate(lay.sources[d]):
      for k in range(topk):
        e = int(token_indices[s, t, k])
        if e >= 0 and e // num_local == d:
          grad_probs[s, t, k] += g_probs[d, row, k]
  return grad_x, grad_probs


# ----------------------------------------------------------------------------
# Expert-major permutation (permute.py) and HybridEP semantics.


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
    members = [i for i in range(m) if local_map[i, e]]
    padded = math.ceil(len(members) / pad_multiple) * pad_multiple
    for j, i in enumerate(members):
      p = start + j
      if p < num_rows:  # Rows at or past N are dropped.
        src_row[p] = i
        perm_row[i, e] = p
    for p in range(start, min(start + padded, num_rows)):
      expert_of[p] = e
    tpe[e] = min(start + padded, num_rows) - min(start, num_rows)
    start += padded
  return dict(src_row=src_row, perm_row=perm_row, expert_of=expert_of, tokens_per_expert=tpe)


def permute_rows(rows: np.ndarray, perm: dict) -> np.ndarray:
  """``[M, ...]`` -> ``[N, ...]``, same dtype, zero padding rows."""
  n = perm["src_row"].shape[0]
  out = np.zeros((n,) + rows.shape[1:], rows.dtype)
  for p in range(n):
    if perm["src_row"][p] >= 0:
      out[p] = rows[perm["src_row"][p]]
  return out


def permute_values(values: np.ndarray, perm: dict) -> np.ndarray:
  """``[M, L]`` per (row, expert) -> ``[N]`` (0 on padding)."""
  n = perm["src_row"].shape[0]
  out = np.zeros((n,), values.dtype)
  m, num_local = perm["perm_row"].shape
  for i in range(m):
    for e in range(num_local):
      p = perm["perm_row"][i, e]
      if p >= 0:
        out[p] = values[i, e]
  return out


def unpermute_rows(rows: np.ndarray, perm: dict, num_recv: int) -> np.ndarray:
  """``[N, ...]`` -> ``[M, ...]`` float64: each receive row summed over its experts."""
  out = np.zeros((num_recv,) + rows.shape[1:], np.float64)
  for p, i in enumerate(perm["src_row"]):
    if i >= 0:
      out[i] += np.asarray(rows[p], np.float64)
  return out


def unpermute_values(values: np.ndarray, perm: dict) -> np.ndarray:
  """``[N]`` -> ``[M, L]`` (0 where unrouted/dropped)."""
  m, num_local = perm["perm_row"].shape
  out = np.zeros((m, num_local), values.dtype)
  for i in range(m):
    for e in range(num_local):
      p = perm["perm_row"][i, e]
      if p >= 0:
        out[i, e] = values[p]
  return out


def hybrid_dispatch(x, routing_map, probs, num_local, max_recv=None, num_rows=None,
                    pad_multiple=1, topk=None, scales=None) -> dict:
  """Oracle of :func:`hybrid_ep_dispatch` for all ranks.

  ``routing_map [R, T, E]`` bool, ``probs [R, T, E]``. ``num_rows`` defaults to
  the worst case for ``topk``.
  """
  routing_map = np.asarray(routing_map, bool)
  probs = np.asarray(probs)
  num_ranks, num_tokens, num_experts = routing_map.shape
  assert num_experts == num_ranks * num_local
  mask = np.zeros((num_ranks, num_tokens, num_ranks), bool)
  for s in range(num_ranks):
    for t in range(num_tokens):
      for e in range(num_experts):
        if routing_map[s, t, e]:
          mask[s, t, e // num_local] = True
  lay = layout(mask, max_recv)
  m = lay.max_recv
  if num_rows is None:
    num_rows = max_permuted_rows(m, num_local, topk, pad_multiple)
  recv_x = move(lay, x)
  recv_scales = None if scales is None else move(lay, scales)
  perms, px, pprobs, pscales, tpe = [], [], [], [], []
  for d in range(num_ranks):
    local_map = np.zeros((m, num_local), bool)
    local_probs = np.zeros((m, num_local), probs.dtype)
    for row, (s, t) in enumerate(lay.sources[d]):
      for e in range(num_local):
        local_map[row, e] = routing_map[s, t, d * num_local + e]
        local_probs[row, e] = probs[s, t, d * num_local + e]
    perm = permutation(local_map, num_rows, pad_multiple)
    perms.append(perm)
    px.append(permute_rows(recv_x[d], perm))
    pprobs.append(permute_values(local_probs, perm))
    if scales is not None:
      pscales.append(permute_rows(recv_scales[d], perm))
    tpe.append(perm["tokens_per_expert"])
  return dict(
      layout=lay, perms=perms, num_rows=num_rows, num_local=num_local,
      permuted_x=np.stack(px), permuted_probs=np.stack(pprobs),
      permuted_scales=None if scales is None else np.stack(pscales),
      tokens_per_expert=np.stack(tpe),
      perm_row=np.stack([p["perm_row"] for p in perms]),
      src_row=np.stack([p["src_row"] for p in perms]),
  )


def _permuted_sources(h: dict):
  """Yield ``(d, p, s, t, e)`` for every written permuted row."""
  lay = h["layout"]
  for d, perm in enumerate(h["perms"]):
    for p, i in enumerate(perm["src_row"]):
      if i >= 0:
        s, t = lay.sources[d][i]
        yield d, p, s, t, int(perm["expert_of"][p])


def hybrid_combine(h: dict, y: np.ndarray) -> np.ndarray:
  """``[R, N, ...]`` -> ``[R, T, ...]`` float64: per token, the sum of its rows."""
  lay = h["layout"]
  y = np.asarray(y).astype(np.float64)
  out = np.zeros((lay.num_ranks, lay.num_tokens) + y.shape[2:], np.float64)
  for d, p, s, t, _ in _permuted_sources(h):
    out[s, t] += y[d, p]
  return out


def hybrid_dispatch_vjp(h: dict, g_x: np.ndarray, g_probs: np.ndarray):
  """Cotangents of (permuted_x, permuted_probs) -> (grad x [R,T,H], grad probs [R,T,E])."""
  lay = h["layout"]
  num_local = h["num_local"]
  grad_x = hybrid_combine(h, g_x)
  grad_probs = np.zeros((lay.num_ranks, lay.num_tokens, lay.num_ranks * num_local), np.float64)
  for d, p, s, t, e in _permuted_sources(h):
    grad_probs[s, t, d * num_local + e] += float(g_probs[d, p])
  return grad_x, grad_probs


def hybrid_combine_vjp(h: dict, g: np.ndarray) -> np.ndarray:
  """Cotangent ``[R, T, ...]`` of the combine output -> ``[R, N, ...]``."""
  lay = h["layout"]
  g = np.asarray(g)
  out = np.zeros((lay.num_ranks, h["num_rows"]) + g.shape[2:], g.dtype)
  for d, p, s, t, _ in _permuted_sources(h):
    out[d, p] = g[s, t]
  return out


# ----------------------------------------------------------------------------
# FP8 (fp8.py): per-128-column block scales.


def fp8_block_of_column(hidden: int, block: int = 128) -> np.ndarray:
  """Block index of each column: column ``j`` uses scale ``j // block``."""
  return np.arange(hidden) // block


# ----------------------------------------------------------------------------
# Random routing generators (test data, also numpy only).


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
  """``[R, T, K]`` indices/probs -> ``[R, T, E]`` bool map and dense probs."""
  num_ranks, num_tokens, topk = token_indices.shape
  routing_map = np.zeros((num_ranks, num_tokens, num_experts), bool)
  probs = np.zeros((num_ranks, num_tokens, num_experts), np.asarray(token_probs).dtype)
  for s in range(num_ranks):
    for t in range(num_tokens):
      for k in range(topk):
        e = int(token_indices[s, t, k])
        if e >= 0:
          routing_map[s, t, e] = True
          probs[s, t, e] = token_probs[s, t, k]
  return routing_map, probs
