"""The dispatch suite's correctness guard: outputs against :mod:`jax_moe_dispatch.testing.oracle`.

Every comparison is bit for bit. Copied payloads (rows, FP8 rows and scales,
probabilities) must have the oracle's bits; integer outputs its values; sums
(combine) are the oracle's float64 sums rounded once to the output dtype. The
benchmark makes those sums exact (combine inputs are rows scaled by
``2**rank``: a token's sum is ``x * sum(2**d)``, which float32 holds exactly
for up to 8 ranks even after the hybrid path's per-expert sums), so any
summation order gives the same bits. Outputs are global arrays of ``R``
stacked per-rank blocks. A mismatch raises :class:`CheckFailed` naming the
first differing element.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jax_moe_dispatch.testing import oracle


class CheckFailed(Exception):
  """An output differs from what it must be."""


def _bits(a: np.ndarray) -> np.ndarray:
  a = np.ascontiguousarray(a)
  return a.view(f"u{a.dtype.itemsize}")


def expect(name: str, got: Any, want: Any) -> None:
  """Raise :class:`CheckFailed` unless ``got`` is ``want``, bit for bit.

  A float64 ``want`` for a narrower float ``got`` is rounded to its dtype
  first; integer arrays are compared by value whatever their widths.
  """
  got, want = np.asarray(got), np.asarray(want)
  ints = np.issubdtype(got.dtype, np.integer) and np.issubdtype(want.dtype, np.integer)
  if want.dtype == np.float64 and got.dtype != np.float64 and not ints:
    want = want.astype(got.dtype)
  if got.shape != want.shape or (got.dtype != want.dtype and not ints):
    raise CheckFailed(f"{name}: got {got.dtype}{got.shape}, want {want.dtype}{want.shape}")
  bad = np.nonzero(got != want) if ints else np.nonzero(_bits(got) != _bits(want))
  if len(bad[0]):
    where = tuple(int(i[0]) for i in bad)
    raise CheckFailed(f"{name}: {len(bad[0])} elements differ, first at {where}: "
                      f"got {got[where]!r}, want {want[where]!r}")


def per_rank(a: Any, ranks: int) -> np.ndarray:
  """``[R * n, ...]`` global array -> ``[R, n, ...]``."""
  a = np.asarray(a)
  return a.reshape((ranks, a.shape[0] // ranks) + a.shape[1:])


def dispatch(out: Any, want: dict) -> None:
  """``fused_dispatch`` outputs vs :func:`oracle.fused_dispatch` (with ``scales`` for FP8 rows)."""
  ranks = want["recv_idx"].shape[0]
  if "recv_scales" in want:
    expect("recv_x (fp8 rows)", per_rank(out[0][0], ranks), want["recv_x"])
    expect("recv_x (fp8 scales)", per_rank(out[0][1], ranks), want["recv_scales"])
  else:
    expect("recv_x", per_rank(out[0], ranks), want["recv_x"])
  expect("recv_token_indices", per_rank(out[1], ranks), want["recv_idx"])
  expect("recv_token_probs", per_rank(out[2], ranks), want["recv_probs"])
  expect("tokens_per_expert", per_rank(out[3], ranks), want["tokens_per_expert"])


def combine(out: Any, lay: oracle.Layout, y: Any) -> None:
  """``fused_combine(y)`` vs :func:`oracle.combine` of the same input rows."""
  ranks = lay.num_ranks
  expect("combine output", per_rank(out, ranks), oracle.combine(lay, per_rank(y, ranks)))


def hybrid_dispatch(out: Any, want: dict) -> None:
  """``hybrid_ep_dispatch`` outputs vs :func:`oracle.hybrid_dispatch` (bf16 rows, no scales)."""
  ranks = want["permuted_x"].shape[0]
  expect("permuted_x", per_rank(out[0], ranks), want["permuted_x"])
  expect("permuted_probs", per_rank(out[1], ranks), want["permuted_probs"])
  expect("tokens_per_expert", per_rank(out[3], ranks), want["tokens_per_expert"])


def hybrid_combine(out: Any, h: dict, y: Any) -> None:
  """``hybrid_ep_combine(y)`` vs :func:`oracle.hybrid_combine` of the same permuted rows."""
  ranks = h["layout"].num_ranks
  expect("hybrid_combine output", per_rank(out, ranks), oracle.hybrid_combine(h, per_rank(y, ranks)))


def _local_map(recv_idx: np.ndarray, num_local: int) -> np.ndarray:
  """``[M, K]`` local expert ids (-1: none) -> ``[M, L]`` bool."""
  rows, k = np.nonzero(recv_idx >= 0)
  local_map = np.zeros((recv_idx.shape[0], num_local), bool)
  local_map[rows, recv_idx[rows, k]] = True
  return local_map


def permute(out: Any, want: dict, num_local: int, num_rows: int, pad: int) -> None:
  """The dispatcher's permutation of the received rows vs :func:`oracle.permutation` of the
  oracle's received rows (:func:`oracle.fused_dispatch`)."""
  ranks = want["recv_idx"].shape[0]
  rows, probs, perm = out
  got = {name: per_rank(getattr(perm, name), ranks)
         for name in ("perm_row", "src_row", "tokens_per_expert")}
  rows, probs = per_rank(rows, ranks), per_rank(probs, ranks)
  for r in range(ranks):
    local_map = _local_map(want["recv_idx"][r], num_local)
    p = oracle.permutation(local_map, num_rows, pad)
    for name in got:
      expect(f"rank {r} {name}", got[name][r], p[name])
    expect(f"rank {r} permuted rows", rows[r], oracle.permute_rows(want["recv_x"][r], p))
    local_probs = np.zeros(local_map.shape, want["recv_probs"].dtype)
    i, k = np.nonzero(want["recv_idx"][r] >= 0)
    local_probs[i, want["recv_idx"][r][i, k]] = want["recv_probs"][r][i, k]
    expect(f"rank {r} permuted probs", probs[r], oracle.permute_values(local_probs, p))


def unpermute(out: Any, permuted: Any, ranks: int) -> None:
  """Unpermute of the permuted rows vs :func:`oracle.unpermute_rows`: each row's permuted rows
  are copies of it, so their float32 sum is exact and rounds to the oracle's bits."""
  rows, _, perm = permuted
  rows, perm_row, out = per_rank(rows, ranks), per_rank(perm.perm_row, ranks), per_rank(out, ranks)
  for r in range(ranks):
    want = oracle.unpermute_rows(rows[r], {"perm_row": perm_row[r]}, out.shape[1])
    expect(f"rank {r} unpermute", out[r], want)


def ragged(out: Any, want: dict) -> None:
  """The ragged baseline's ``(rows, [ids | probs bits])`` vs :func:`oracle.fused_dispatch` with ``M = R * T``.

  Rows are checked whole (zero padding included); metadata on the kept rows.
  """
  lay = want["layout"]
  rows, meta = per_rank(out[0], lay.num_ranks), per_rank(out[1], lay.num_ranks)
  topk = want["recv_idx"].shape[-1]
  expect("ragged rows", rows, want["recv_x"])
  for d in range(lay.num_ranks):
    n = len(lay.kept(d)[0])
    expect(f"rank {d} ragged ids", meta[d, :n, :topk], want["recv_idx"][d, :n])
    expect(f"rank {d} ragged probs", meta[d, :n, topk:].view(np.float32), want["recv_probs"][d, :n])


def dense(out: Any, lay: oracle.Layout, x: np.ndarray) -> None:
  """The dense all_to_all's received slots vs :func:`oracle.padded_slots`."""
  ranks, tokens = lay.num_ranks, lay.num_tokens
  got = per_rank(out, ranks).reshape((ranks, ranks, tokens) + x.shape[2:])
  expect("dense slots", got, oracle.padded_slots(lay, x))


def ring(out: Any, buf: Any, ranks: int) -> None:
  """The ppermute ring: rank ``d`` holds rank ``d - 1``'s buffer."""
  expect("ppermute ring", per_rank(out, ranks), np.roll(per_rank(buf, ranks), 1, axis=0))


def same(out: Any, ref: Any) -> None:
  """Every output leaf (handles included) equal to the reference backend's, bit for bit."""
  got_l, ref_l = jax.tree.leaves(out), jax.tree.leaves(ref)
  if len(got_l) != len(ref_l):
    raise CheckFailed(f"vs reference: {len(got_l)} outputs, the reference backend gives {len(ref_l)}")
  for i, (g, r) in enumerate(zip(got_l, ref_l)):
    expect(f"vs reference: output leaf {i}", g, r)
