"""The local expert-major permutation (jax_moe_dispatch.core.permute) vs the numpy oracle."""

from __future__ import annotations

import functools

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.numpy as jnp
import numpy as np
from jax_moe_dispatch.testing import oracle
import pytest
from jax.test_util import check_grads

from jax_moe_dispatch.core import permute as P


def random_map(rng, m, num_local, num_recv, density):
  """``[M, L]`` bool: rows ``>= num_recv`` are padding (all False)."""
  local_map = rng.random((m, num_local)) < density
  local_map[num_recv:] = False
  return local_map


@functools.cache
def perm_fn(num_rows, pad):
  def f(local_map, rows_f32, rows_bf16, rows_fp8, rows_i32, values, y, yv):
    perm = P.make_permutation(local_map, num_rows, pad)
    num_recv = local_map.shape[0]
    return (perm, P.permute(rows_f32, perm), P.permute(rows_bf16, perm), P.permute(rows_fp8, perm),
            P.permute(rows_i32, perm), P.permute_values(values, perm),
            P.unpermute(y, perm, num_recv), P.unpermute(y.astype(jnp.bfloat16), perm, num_recv),
            P.unpermute_values(yv, perm))

  return jax.jit(f)


# (M, num_recv, L, density, N, pad): N None = the worst case (no drops).
PERM_CASES = [
    (13, 13, 1, 0.7, None, 1),
    (13, 9, 4, 0.5, None, 1),
    (13, 10, 4, 0.5, None, 4),
    (20, 17, 3, 0.6, None, 3),
    (20, 20, 4, 0.6, 17, 4),   # Drops in the last groups.
    (20, 15, 4, 0.9, 5, 2),    # Drops: later groups start past N, tokens_per_expert 0.
    (7, 7, 2, 1.0, 7, 8),      # Padding larger than groups; drops inside padding only.
    (16, 0, 3, 0.5, None, 2),  # Nothing received.
]


@pytest.mark.parametrize("m,num_recv,L,density,N,pad", PERM_CASES)
def test_permutation_vs_oracle(m, num_recv, L, density, N, pad):
  rng = np.random.default_rng(m * 1000 + num_recv * 10 + L)
  local_map = random_map(rng, m, L, num_recv, density)
  if N is None:
    N = P.max_permuted_rows(m, L, L, pad)
    assert N == oracle.max_permuted_rows(m, L, L, pad)
  rows_f32 = H.rand(rng, (m, 5), np.float32)
  rows_bf16 = H.rand(rng, (m, 2, 3), jnp.bfloat16)
  rows_fp8 = H.rand(rng, (m, 4), np.float32).astype(jnp.float8_e4m3fn)
  rows_i32 = rng.integers(1, 1 << 30, size=(m,)).astype(np.int32)
  values = H.rand(rng, (m, L), np.float32)
  y = H.rand(rng, (N, 5), np.float32)
  yv = H.rand(rng, (N,), np.float32)
  got = H.to_np(perm_fn(N, pad)(local_map, rows_f32, rows_bf16, rows_fp8, rows_i32, values, y, yv))
  perm, p_f32, p_bf16, p_fp8, p_i32, p_vals, u, u_bf16, uv = got
  want = oracle.permutation(local_map, N, pad)
  H.assert_equal_int(perm.src_row, want["src_row"], "src_row")
  H.assert_equal_int(perm.perm_row, want["perm_row"], "perm_row")
  H.assert_equal_int(perm.tokens_per_expert, want["tokens_per_expert"], "tokens_per_expert")
  assert perm.src_row.dtype == perm.perm_row.dtype == perm.tokens_per_expert.dtype == np.int32
  assert perm.tokens_per_expert.sum() <= N
  for a, b, name in ((p_f32, rows_f32, "f32"), (p_bf16, rows_bf16, "bf16"),
                     (p_fp8, rows_fp8, "fp8"), (p_i32, rows_i32, "i32")):
    H.assert_bitwise(a, oracle.permute_rows(b, want), f"permute {name}")
  H.assert_bitwise(p_vals, oracle.permute_values(values, want), "permute_values")
  H.assert_close(u, oracle.unpermute_rows(y, want, m), np.float32, "unpermute")
  assert u_bf16.dtype == jnp.bfloat16
  H.assert_close(u_bf16, oracle.unpermute_rows(y.astype(jnp.bfloat16), want, m), jnp.bfloat16,
                 "unpermute bf16")
  H.assert_bitwise(uv, oracle.unpermute_values(yv, want), "unpermute_values")
  # Padding/dropped rows: permute gives zeros, unpermute ignores what is there.
  assert (p_f32[want["src_row"] < 0] == 0).all()
  routed = local_map.sum()
  if N >= oracle.max_permuted_rows(m, L, L, pad):
    assert (want["src_row"] >= 0).sum() == routed


def test_tokens_per_expert_ready_for_ragged_dot():
  """Group sizes from make_permutation drive jax.lax.ragged_dot to the per-expert products."""
  rng = np.random.default_rng(3)
  m, L, pad, hdim, out = 11, 3, 4, 5, 2
  local_map = random_map(rng, m, L, 9, 0.6)
  N = P.max_permuted_rows(m, L, L, pad)
  rows = H.rand(rng, (m, hdim), np.float32)
  w = H.rand(rng, (L, hdim, out), np.float32)

  @jax.jit
  def f(local_map, rows, w):
    perm = P.make_permutation(local_map, N, pad)
    y = jax.lax.ragged_dot(P.permute(rows, perm), w, perm.tokens_per_expert)
    return y

  y = np.asarray(f(local_map, rows, w))
  want = oracle.permutation(local_map, N, pad)
  ref = np.zeros((N, out))
  for p in range(N):
    if want["src_row"][p] >= 0:
      ref[p] = rows[want["src_row"][p]].astype(np.float64) @ w[want["expert_of"][p]]
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_recv,L,topk,pad,want", [
    (16, 4, 2, 1, 32), (16, 4, 8, 1, 64), (16, 4, 2, 8, 32 + 28), (10, 1, 3, 4, 13),
])
def test_max_permuted_rows(max_recv, L, topk, pad, want):
  assert P.max_permuted_rows(max_recv, L, topk, pad) == want
  assert oracle.max_permuted_rows(max_recv, L, topk, pad) == want


@pytest.mark.parametrize("L,K", [(5, 2), (6, 6), (40, 3), (40, None)])
def test_top_k_bound(L, K):
  """``max_experts_per_row=K``: a row keeps its K smallest local experts (the rest drop, as
  rows past N do); unpermute sums a row's rows in ascending expert order in float32, rounding
  once (bit for bit a numpy float32 sum in that order). ``(40, 3)`` and ``(6, 6)`` take
  the unrolled path, ``(40, None)`` the loop (no top-k bound, K = L > 8)."""
  rng = np.random.default_rng(L * 7 + (K or 0))
  m, num_recv, pad = 24, 21, 2
  local_map = random_map(rng, m, L, num_recv, 0.5)
  N = P.max_permuted_rows(m, L, K or L, pad)
  y = H.rand(rng, (N, 6), np.float32)
  f = jax.jit(lambda lm, y: (lambda p: (p, P.unpermute(y, p, m)))(
      P.make_permutation(lm, N, pad, K)))
  perm, u = H.to_np(f(local_map, y))
  kept = local_map & (np.cumsum(local_map, axis=1) <= (K or L))
  assert kept.sum() < local_map.sum() or K is None or K >= L  # The bound binds in (5, 2), (40, 3).
  want = oracle.permutation(kept, N, pad)
  H.assert_equal_int(perm.perm_row, want["perm_row"], "perm_row")
  H.assert_equal_int(perm.src_row, want["src_row"], "src_row")
  H.assert_equal_int(perm.tokens_per_expert, want["tokens_per_expert"], "tokens_per_expert")
  exp = np.zeros((m, 6), np.float32)
  for i in range(m):
    for e in range(L):
      if want["perm_row"][i, e] >= 0:
        exp[i] = exp[i] + y[want["perm_row"][i, e]]
  H.assert_bitwise(u, exp, "unpermute ascending-expert float32 sum")
  rows_listed = perm.expert_rows
  assert rows_listed.shape == (m, min(K or L, L))
  assert ((rows_listed >= 0).sum(axis=1) == (want["perm_row"] >= 0).sum(axis=1)).all()


@pytest.mark.parametrize("K", [2, None])
def test_permute_unpermute_gradients(K):
  """permute and unpermute are each other's transposes (custom VJPs): numeric gradients agree,
  and unpermute's backward is a gather (no scatter in its jaxpr)."""
  rng = np.random.default_rng(11 + (K or 0))
  m, L, pad = 9, 4, 2
  local_map = random_map(rng, m, L, 8, 0.6)
  N = P.max_permuted_rows(m, L, K or L, pad)
  perm = P.make_permutation(local_map, N, pad, K)
  rows = jnp.asarray(H.rand(rng, (m, 3), np.float64 if jax.config.jax_enable_x64 else np.float32))
  y = jnp.asarray(H.rand(rng, (N, 3), np.float32)).astype(rows.dtype)
  check_grads(lambda r: P.permute(r, perm), (rows,), order=1, modes=("rev",),
                            atol=1e-2, rtol=1e-2)
  check_grads(lambda v: P.unpermute(v, perm, m), (y,), order=1, modes=("rev",),
                            atol=1e-2, rtol=1e-2)
  bwd = jax.make_jaxpr(jax.grad(lambda v: jnp.sum(P.unpermute(v, perm, m) ** 2)))(y)
  assert "scatter" not in str(bwd)
