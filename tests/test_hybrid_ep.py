"""hybrid_ep_dispatch / hybrid_ep_combine vs the numpy oracle, and vs the DeepEP path."""

from __future__ import annotations

import dataclasses
import functools
import zlib

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401
import numpy as np
from jax_moe_dispatch.testing import oracle
import pytest

from jax_moe_dispatch import fused_dispatch, hybrid_ep_combine, hybrid_ep_dispatch
from jax_moe_dispatch.core import permute as perm_lib


@dataclasses.dataclass(frozen=True)
class Case:
  ep: int
  T: int
  L: int
  K: int
  pad: int | None = None
  N: int | None = None  # None: default sizing from topk=K.
  max_recv: int | None = None
  dtype: str = "float32"
  kind: str = "random"
  masked_rows: tuple = ()
  mode: str = "shard_map"
  H: int = 6

  @property
  def E(self):
    return self.ep * self.L

  @property
  def id(self):
    s = f"ep{self.ep}-T{self.T}-L{self.L}-K{self.K}-pad{self.pad}-N{self.N}-M{self.max_recv}"
    s += f"-{self.dtype}-{self.kind}-H{self.H}"
    if self.masked_rows:
      s += "-masked"
    return s + f"-{self.mode}"

  def rng(self, salt=""):
    return np.random.default_rng(zlib.crc32((self.id + salt).encode()))


CASES = [
    Case(1, 7, 4, 2),
    Case(2, 13, 2, 4, pad=4, dtype="bfloat16", mode="pmap", masked_rows=(5,)),
    Case(2, 7, 4, 2, pad=16, dtype="float8_e4m3fn", H=130),  # FP8 rows + 2 scale columns.
    Case(4, 7, 2, 2, pad=3, N=12),  # Permuted-buffer drops.
    Case(4, 13, 4, 4, pad=8, max_recv=30, dtype="bfloat16"),  # Receive drops.
    Case(8, 7, 2, 2, pad=2, kind="one_expert"),
    Case(8, 13, 1, 1, N=40, mode="pmap", kind="one_expert"),  # Drops at the hot rank's expert.
    Case(4, 13, 2, 4, pad=4, N=40, max_recv=25, dtype="float8_e4m3fn", masked_rows=(0,)),
]


def make_inputs(case: Case, salt=""):
  rng = case.rng(salt)
  idx = oracle.random_topk(rng, case.ep, case.T, case.K, case.E, kind=case.kind,
                           masked_rows=case.masked_rows)
  routing_map, _ = oracle.topk_to_map(idx, np.zeros(idx.shape, np.float32), case.E)
  probs = rng.uniform(0.1, 1.0, size=routing_map.shape).astype(np.float32)  # Unrouted too.
  dtype = np.dtype(jnp.dtype(case.dtype))
  scales = None
  if dtype == np.dtype(jnp.float8_e4m3fn):
    x = H.rand(rng, (case.ep, case.T, case.H), np.float32).astype(dtype)
    scales = rng.uniform(0.01, 2.0, size=(case.ep, case.T, -(-case.H // 128))).astype(np.float32)
  else:
    x = H.rand(rng, (case.ep, case.T, case.H), dtype)
  return x, scales, routing_map, probs, idx


def expected(case: Case, x, scales, routing_map, probs):
  return oracle.hybrid_dispatch(x, routing_map, probs, case.L, case.max_recv, case.N,
                                case.pad or 1, topk=case.K, scales=scales)


@functools.cache
def hybrid_fn(L, N, pad, K, max_recv, with_scales, ep, mode, combine_dtype):
  def f(x, scales, routing_map, probs, y):
    px, pp, ps, tpe, handle = hybrid_ep_dispatch(
        x, routing_map, probs, L, "ep", scaling_factor=scales if with_scales else None,
        num_permuted_tokens=N, pad_multiple=pad, topk=None if N is not None else K,
        max_recv_tokens=max_recv)
    out = hybrid_ep_combine(y, handle, "ep", num_permuted_tokens=px.shape[0], pad_multiple=pad)
    rt = hybrid_ep_combine(px.astype(combine_dtype), handle, "ep")
    return px, pp, ps, tpe, handle, out, rt

  return H.ep_map(f, ep, mode)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_hybrid_vs_oracle(case):
  x, scales, routing_map, probs, _ = make_inputs(case)
  want = expected(case, x, scales, routing_map, probs)
  lay, n = want["layout"], want["num_rows"]
  if case.N is None:  # Default sizing: worst case for topk experts per token.
    m = case.max_recv or case.ep * case.T
    assert n == m * min(case.K, case.L) + case.L * ((case.pad or 1) - 1)
  fp8 = scales is not None
  combine_dtype = np.float32 if fp8 else x.dtype
  y = H.rand(case.rng("y"), (case.ep, n, case.H), combine_dtype)  # Garbage on padding rows too.
  fn = hybrid_fn(case.L, case.N, case.pad, case.K, case.max_recv, fp8, case.ep, case.mode,
                 jnp.dtype(combine_dtype))
  args = (x, scales if fp8 else np.zeros((case.ep, 1), np.float32), routing_map, probs, y)
  px, pp, ps, tpe, handle, out, rt = H.to_np(fn(*args))
  H.assert_bitwise(px, want["permuted_x"], "permuted_x")
  H.assert_bitwise(pp, want["permuted_probs"], "permuted_probs")
  if fp8:
    H.assert_bitwise(ps, want["permuted_scales"], "permuted scaling_factor")
  else:
    assert ps is None
  H.assert_equal_int(tpe, want["tokens_per_expert"], "tokens_per_expert")
  assert tpe.dtype == np.int32
  H.assert_equal_int(handle.permutation.src_row, want["src_row"], "permutation.src_row")
  H.assert_equal_int(handle.permutation.perm_row, want["perm_row"], "permutation.perm_row")
  H.assert_equal_int(handle.permutation.tokens_per_expert, want["tokens_per_expert"], "perm tpe")
  d = handle.dispatch
  H.assert_equal_int(d.send_pos, lay.send_pos, "send_pos")
  H.assert_equal_int(d.dest_offset, lay.dest_offset, "dest_offset")
  H.assert_equal_int(d.recv_count, lay.recv_count, "recv_count")
  H.assert_equal_int(d.recv_token, lay.recv_token, "recv_token")
  assert out.dtype == combine_dtype
  H.assert_close(out, oracle.hybrid_combine(want, y), combine_dtype, "hybrid_ep_combine")
  H.assert_close(rt, oracle.hybrid_combine(want, px.astype(combine_dtype)), combine_dtype, "roundtrip")
  bounded = case.N is not None or case.max_recv is not None
  if bounded:  # Cases with a bound are chosen so that something is dropped.
    written = sum(int((s >= 0).sum()) for s in want["src_row"])
    total = int(routing_map.sum())
    assert written < total, "test case expected drops"


# ----------------------------------------------------------------------------
# Same routing through the DeepEP path (fused_dispatch + permute) gives the same layout.


@functools.cache
def both_paths_fn(L, N, pad, ep, max_recv):
  def f(x, idx, tprobs, routing_map, probs):
    recv_x, ridx, rprobs, tpe_d, dh = fused_dispatch(x, idx, tprobs, ep * L, "ep",
                                                     max_recv_tokens=max_recv)
    onehot = (ridx[:, :, None] == jnp.arange(L)[None, None, :])  # [M, K, L]
    local_map = onehot.any(axis=1)
    local_probs = jnp.where(onehot, rprobs[:, :, None], 0.0).sum(axis=1)
    perm = perm_lib.make_permutation(local_map, N, pad)
    deepep = (perm_lib.permute(recv_x, perm), perm_lib.permute_values(local_probs, perm),
              perm.tokens_per_expert, perm.src_row, dh, tpe_d)
    px, pp, _, tpe, hh = hybrid_ep_dispatch(x, routing_map, probs, L, "ep",
                                            num_permuted_tokens=N, pad_multiple=pad,
                                            max_recv_tokens=max_recv)
    return deepep, (px, pp, tpe, hh.permutation.src_row, hh.dispatch)

  return H.ep_map(f, ep)


@pytest.mark.parametrize("ep,T,L,K,pad,N,max_recv", [
    (2, 13, 4, 4, 4, 64, None),
    (4, 7, 2, 2, 2, 30, None),
    (8, 7, 2, 4, 8, 60, 30),
])
def test_deepep_path_equals_hybrid_path(ep, T, L, K, pad, N, max_recv):
  rng = np.random.default_rng(ep * 31 + T)
  idx = oracle.random_topk(rng, ep, T, K, ep * L, masked_rows=(1,))
  tprobs = rng.uniform(0.1, 1, size=idx.shape).astype(np.float32)
  routing_map, probs = oracle.topk_to_map(idx, tprobs, ep * L)
  x = H.rand(rng, (ep, T, 5), jnp.bfloat16)
  deepep, hybrid = H.to_np(both_paths_fn(L, N, pad, ep, max_recv)(x, idx, tprobs, routing_map, probs))
  for a, b, name in zip(deepep[:3], hybrid[:3], ("permuted_x", "permuted_probs", "tokens_per_expert")):
    H.assert_bitwise(a, b, name)
  H.assert_equal_int(deepep[3], hybrid[3], "src_row")
  for f in ("send_pos", "dest_offset", "recv_count", "recv_token"):
    H.assert_equal_int(getattr(deepep[4], f), getattr(hybrid[4], f), f)
  want = oracle.hybrid_dispatch(x, routing_map, probs, L, max_recv, N, pad)
  H.assert_bitwise(hybrid[0], want["permuted_x"], "permuted_x vs oracle")
  # fused_dispatch's tokens_per_expert counts rows; the permutation's pads them (no drops here).
  written = sum(int((r >= 0).sum()) for r in want["src_row"])
  received = sum(int(routing_map[s_, t_, d * L:(d + 1) * L].sum())
                 for d in range(ep) for s_, t_ in want["layout"].sources[d])
  if written == received:
    np.testing.assert_array_equal(hybrid[2], -(-deepep[5] // pad) * pad)


# ----------------------------------------------------------------------------
# Gradients.


@functools.cache
def hybrid_loss_fn(L, N, pad, K, ep, mode):
  def f(x, routing_map, probs):
    px, pp, _, _, handle = hybrid_ep_dispatch(x, routing_map, probs, L, "ep",
                                              num_permuted_tokens=N, pad_multiple=pad,
                                              topk=K)
    return hybrid_ep_combine(px * pp[:, None].astype(px.dtype), handle, "ep")

  return H.ep_map(f, ep, mode)


@functools.cache
def hybrid_parts_fn(L, N, pad, K, max_recv, ep, mode):
  def f(x, routing_map, probs, y):
    px, pp, _, _, handle = hybrid_ep_dispatch(x, routing_map, probs, L, "ep",
                                              num_permuted_tokens=N, pad_multiple=pad,
                                              topk=K, max_recv_tokens=max_recv)
    return px, pp, hybrid_ep_combine(y, handle, "ep")

  return H.ep_map(f, ep, mode)


GRAD_CASES = [
    Case(2, 7, 2, 2, pad=2),
    Case(4, 13, 2, 4, pad=4, N=40, max_recv=40),
    Case(8, 7, 1, 2, pad=3, mode="pmap", kind="one_expert"),
    Case(4, 7, 4, 2, pad=2, dtype="bfloat16", masked_rows=(3,)),
]


@pytest.mark.parametrize("case", [GRAD_CASES[0], GRAD_CASES[2]], ids=lambda c: c.id)
def test_hybrid_check_grads(case):
  x, _, routing_map, probs, _ = make_inputs(case, "grad")
  fn = hybrid_loss_fn(case.L, case.N, case.pad, case.K, case.ep, case.mode)
  jax.test_util.check_grads(lambda a, p: fn(a, routing_map, p), (x, probs), order=1,
                            modes=["rev"], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_hybrid_vjp_vs_oracle(case):
  x, _, routing_map, probs, _ = make_inputs(case, "vjp")
  want = expected(case, x, None, routing_map, probs)
  n = want["num_rows"]
  rng = case.rng("cot")
  y = H.rand(rng, (case.ep, n, case.H), x.dtype)
  fn = hybrid_parts_fn(case.L, case.N, case.pad, case.K, case.max_recv, case.ep, case.mode)
  _, vjp = jax.vjp(lambda a, p, b: fn(a, routing_map, p, b), x, probs, y)
  g_x = H.rand(rng, (case.ep, n, case.H), x.dtype)  # Also on padding rows.
  g_p = H.rand(rng, (case.ep, n), np.float32)
  g_out = H.rand(rng, x.shape, x.dtype)
  gx, gp, gy = H.to_np(vjp((g_x, g_p, g_out)))
  want_x, want_p = oracle.hybrid_dispatch_vjp(want, g_x, g_p)
  assert gx.dtype == x.dtype and gp.dtype == np.float32 and gy.dtype == x.dtype
  H.assert_close(gx, want_x, x.dtype, "d x")
  H.assert_close(gp, want_p, np.float32, "d probs")
  assert (gp[~routing_map] == 0).all(), "unrouted probabilities must get exactly zero"
  H.assert_bitwise(gy, oracle.hybrid_combine_vjp(want, g_out), "d hybrid_ep_combine input")


@pytest.mark.parametrize("ep,T,L,K,pad,N", [(4, 7, 2, 2, 2, 8)])
def test_hybrid_check_grads_with_drops(ep, T, L, K, pad, N):
  rng = np.random.default_rng(5)
  idx = oracle.random_topk(rng, ep, T, K, ep * L)
  routing_map, _ = oracle.topk_to_map(idx, np.zeros(idx.shape, np.float32), ep * L)
  probs = rng.uniform(0.1, 1, size=routing_map.shape).astype(np.float32)
  x = H.rand(rng, (ep, T, 4), np.float32)
  fn = hybrid_loss_fn(L, N, pad, K, ep, "shard_map")
  want = oracle.hybrid_dispatch(x, routing_map, probs, L, None, N, pad)
  assert sum(int((s >= 0).sum()) for s in want["src_row"]) < routing_map.sum()
  jax.test_util.check_grads(lambda a, p: fn(a, routing_map, p), (x, probs), order=1,
                            modes=["rev"], atol=1e-2, rtol=1e-2)


@functools.cache
def _double_rounding_fn():
  def f(x, routing_map, probs, y):
    _, _, _, _, handle = hybrid_ep_dispatch(x, routing_map, probs, 2, "ep", num_permuted_tokens=2)
    return hybrid_ep_combine(y, handle, "ep")

  return H.ep_map(f, 2)


def test_hybrid_combine_accumulates_in_f32_across_experts_and_ranks():
  # Token 0 of rank 0 goes to experts 0, 1 (rank 0) and 2 (rank 1).
  routing_map = np.zeros((2, 1, 4), bool)
  routing_map[0, 0, [0, 1, 2]] = True
  probs = np.ones((2, 1, 4), np.float32)
  x = np.ones((2, 1, 2), jnp.bfloat16)
  y = np.zeros((2, 2, 2), jnp.bfloat16)
  y[0, 0], y[0, 1], y[1, 0] = 1.0, 2.0**-8, 2.0**-8  # Sum 1 + 2^-7: exact in bf16.
  out = np.asarray(_double_rounding_fn()(x, routing_map, probs, y))
  np.testing.assert_array_equal(out[0, 0].astype(np.float32), 1.0 + 2.0**-7)
