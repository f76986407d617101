"""FP8 helpers (quantize_fp8 / dequantize_fp8) and FP8 rows through fused_dispatch."""

from __future__ import annotations

import functools

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax.numpy as jnp
import numpy as np
from jax_moe_dispatch.testing import oracle
import pytest

from jax_moe_dispatch import dequantize_fp8, fused_combine, fused_dispatch, quantize_fp8

FP8 = np.dtype(jnp.float8_e4m3fn)


def make_rows(rng, hidden, num_tokens=9):
  x = (rng.normal(size=(num_tokens, hidden)) * rng.uniform(0.01, 100, size=(num_tokens, 1)))
  x = np.where(np.abs(x) < 1e-3, 0.5, x).astype(np.float32)
  x[0] = 0.0  # A zero row: scale 1, rows 0.
  if hidden > 128:
    x[1, 128:256] = 0.0  # A zero block inside a nonzero row.
  return x


def expected_quantize(x):
  """The spec: scale = amax / 448 per 128-column block (1 where amax == 0), q = fp8(x / scale)."""
  num_tokens, hidden = x.shape
  nb = -(-hidden // 128)
  scales = np.ones((num_tokens, nb), np.float32)
  for t in range(num_tokens):
    for b in range(nb):
      amax = np.float32(np.abs(x[t, b * 128:(b + 1) * 128]).max())
      if amax > 0:
        scales[t, b] = amax / np.float32(448.0)
  col_scale = scales[:, oracle.fp8_block_of_column(hidden)]
  return (x / col_scale).astype(FP8), scales


HIDDENS = [64, 128, 256, 129, 200, 300]


@pytest.mark.parametrize("hidden", HIDDENS)
def test_quantize_matches_spec(hidden):
  rng = np.random.default_rng(hidden)
  x = make_rows(rng, hidden)
  q, s = quantize_fp8(jnp.asarray(x))
  q, s = np.asarray(q), np.asarray(s)
  _, want_s = expected_quantize(x)
  assert q.dtype == FP8 and q.shape == x.shape
  assert s.dtype == np.float32 and s.shape == want_s.shape
  # XLA may divide by 448 as a multiply by its reciprocal: allow 2 ulp on the scales.
  np.testing.assert_allclose(s, want_s, rtol=2.0**-22, atol=0)
  assert (s[want_s == 1.0] == 1.0).all()
  # Rows: exactly fp8(x / scale) with the returned scale of the column's block.
  col_scale = s[:, oracle.fp8_block_of_column(hidden)]
  H.assert_bitwise(q, (x / col_scale).astype(FP8), "fp8 rows")
  # Every nonzero block's largest magnitude maps to 448.
  qf = np.abs(q.astype(np.float32))
  for b in range(s.shape[1]):
    blk = qf[:, b * 128:(b + 1) * 128]
    nonzero = np.abs(x[:, b * 128:(b + 1) * 128]).max(axis=1) > 0
    np.testing.assert_array_equal(blk.max(axis=1)[nonzero], 448.0)
    assert (blk[~nonzero] == 0).all()


@pytest.mark.parametrize("hidden", HIDDENS)
@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_roundtrip_error_bound(hidden, out_dtype):
  """|dequantize(quantize(x)) - x| <= 2^-4 |x| (3 mantissa bits) + 2^-10 scale (subnormals)."""
  rng = np.random.default_rng(hidden + 1)
  x = make_rows(rng, hidden)
  q, s = quantize_fp8(jnp.asarray(x))
  deq = np.asarray(dequantize_fp8(q, s, jnp.dtype(out_dtype))).astype(np.float64)
  assert deq.dtype == np.float64 and deq.shape == x.shape
  col_scale = np.asarray(s)[:, oracle.fp8_block_of_column(hidden)].astype(np.float64)
  bound = np.abs(x) * 2.0**-4 + col_scale * 2.0**-10
  if out_dtype == "bfloat16":
    bound = bound * (1 + 2.0**-8) + np.abs(x) * 2.0**-8
  err = np.abs(deq - x)
  bad = np.argwhere(err > bound)
  assert bad.size == 0, f"{len(bad)} elements over the bound, first {tuple(bad[0])}: {deq[tuple(bad[0])]} vs {x[tuple(bad[0])]}"
  assert (deq[0] == 0).all()


def test_dequantize_default_dtype_bf16():
  x = make_rows(np.random.default_rng(0), 128)
  q, s = quantize_fp8(jnp.asarray(x))
  assert dequantize_fp8(q, s).dtype == jnp.bfloat16


@functools.cache
def fp8_dispatch_fn(E, max_recv, ep, mode):
  def f(rows, scales, idx, probs):
    (rx, rs), ridx, rprobs, tpe, handle = fused_dispatch((rows, scales), idx, probs, E, "ep",
                                                         max_recv_tokens=max_recv)
    deq = dequantize_fp8(rx, rs, jnp.float32)
    return rx, rs, ridx, rprobs, tpe, handle, fused_combine(deq, handle, "ep")

  return H.ep_map(f, ep, mode)


@pytest.mark.parametrize("ep,T,K,E,hidden,max_recv,mode", [
    (2, 7, 2, 4, 256, None, "pmap"),
    (4, 13, 2, 8, 200, None, "shard_map"),
    (8, 7, 4, 16, 130, 20, "shard_map"),  # Drops.
])
def test_fused_dispatch_fp8_bitwise(ep, T, K, E, hidden, max_recv, mode):
  rng = np.random.default_rng(ep * 7 + hidden)
  idx = oracle.random_topk(rng, ep, T, K, E, masked_rows=(2,))
  probs = rng.uniform(0.1, 1, size=idx.shape).astype(np.float32)
  rows = H.rand(rng, (ep, T, hidden), np.float32) * 50
  rows = rows.astype(FP8)
  nb = -(-hidden // 128)
  scales = rng.uniform(0.001, 3.0, size=(ep, T, nb)).astype(np.float32)
  rx, rs, ridx, rprobs, tpe, handle, comb = H.to_np(
      fp8_dispatch_fn(E, max_recv, ep, mode)(rows, scales, idx, probs))
  want = oracle.fused_dispatch(rows, idx, probs, E, max_recv, scales=scales)
  lay = want["layout"]
  assert rx.dtype == FP8 and rs.dtype == np.float32
  H.assert_bitwise(rx, want["recv_x"], "fp8 rows")
  H.assert_bitwise(rs, want["recv_scales"], "scales")
  H.assert_equal_int(ridx, want["recv_idx"], "recv_token_indices")
  H.assert_bitwise(rprobs, want["recv_probs"], "recv_token_probs")
  H.assert_equal_int(tpe, want["tokens_per_expert"], "tokens_per_expert")
  H.assert_equal_int(handle.recv_token, lay.recv_token, "recv_token")
  if max_recv is not None:
    assert lay.dropped
  if hidden % 128 == 0:  # dequantize_fp8 is only right there (see test_roundtrip_error_bound).
    deq = rows.astype(np.float64) * np.repeat(scales, 128, axis=2)[..., :hidden]
    H.assert_close(comb, deq * oracle.reach(lay)[..., None], np.float32, "combine(dequantized)")
