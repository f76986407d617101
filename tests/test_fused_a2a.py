"""fused_dispatch / fused_combine and the reference backend primitives vs the numpy oracle."""

from __future__ import annotations

import dataclasses
import functools
import zlib

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.test_util  # noqa: F401  (not imported by `import jax` in 0.10)
import jax.numpy as jnp
import numpy as np
from jax_moe_dispatch.testing import oracle
import pytest

from jax_moe_dispatch import fused_combine, fused_dispatch
from jax_moe_dispatch.backends import ReferenceBackend

HIDDEN = 6


@dataclasses.dataclass(frozen=True)
class Case:
  ep: int
  T: int
  K: int
  E: int
  dtype: str = "float32"
  kind: str = "random"  # or "one_expert"
  masked_rows: tuple = ()
  max_recv: int | None = None
  mode: str = "shard_map"

  @property
  def id(self):
    s = f"ep{self.ep}-T{self.T}-K{self.K}-E{self.E}-{self.dtype}-{self.kind}"
    if self.masked_rows:
      s += "-masked"
    if self.max_recv is not None:
      s += f"-M{self.max_recv}"
    return s + f"-{self.mode}"

  def rng(self, salt=""):
    return np.random.default_rng(zlib.crc32((self.id + salt).encode()))


CASES = [
    Case(1, 7, 2, 4),
    Case(1, 13, 4, 8, "bfloat16", masked_rows=(3,), mode="pmap"),
    Case(2, 13, 1, 4, "bfloat16"),
    Case(2, 7, 4, 8, masked_rows=(0, 6), mode="pmap"),
    Case(2, 7, 2, 4, max_recv=20),  # More rows than the worst case: all extra rows padding.
    Case(4, 7, 2, 8, kind="one_expert", max_recv=40),  # Ditto, with full lists from every rank.
    Case(4, 13, 2, 8, "bfloat16", masked_rows=(0, 5, 12)),
    Case(4, 7, 4, 16, kind="one_expert"),
    Case(4, 13, 2, 8, max_recv=20),  # Drops.
    Case(8, 7, 2, 16),
    Case(8, 13, 4, 32, "bfloat16", masked_rows=(2,), mode="pmap"),
    Case(8, 7, 1, 8, kind="one_expert", max_recv=10),  # Drops at the hot rank.
    Case(8, 13, 4, 16, kind="one_expert", max_recv=50, mode="pmap"),
    Case(2, 7, 4, 8, max_recv=5, mode="pmap"),
]


def make_inputs(case: Case, salt=""):
  rng = case.rng(salt)
  dtype = np.dtype(jnp.dtype(case.dtype))
  idx = oracle.random_topk(rng, case.ep, case.T, case.K, case.E, kind=case.kind,
                           masked_rows=case.masked_rows)
  probs = rng.uniform(0.1, 1.0, size=idx.shape).astype(np.float32)
  x = H.rand(rng, (case.ep, case.T, HIDDEN), dtype)
  m = case.max_recv or case.ep * case.T
  y = H.rand(rng, (case.ep, m, HIDDEN), dtype)  # Garbage in padding/dropped rows too.
  return x, idx, probs, y


@functools.cache
def dispatch_fn(E, max_recv, ep, mode):
  def f(x, idx, probs, y):
    recv_x, ridx, rprobs, tpe, handle = fused_dispatch(x, idx, probs, E, "ep",
                                                       max_recv_tokens=max_recv)
    out = fused_combine(y, handle, "ep")
    roundtrip = fused_combine(recv_x, handle, "ep")
    return recv_x, ridx, rprobs, tpe, handle, out, roundtrip

  return H.ep_map(f, ep, mode)


def check_layout(handle, lay: oracle.Layout):
  H.assert_equal_int(handle.send_pos, lay.send_pos, "handle.send_pos")
  H.assert_equal_int(handle.dest_offset, lay.dest_offset, "handle.dest_offset")
  H.assert_equal_int(handle.recv_count, lay.recv_count, "handle.recv_count")
  H.assert_equal_int(handle.recv_token, lay.recv_token, "handle.recv_token")
  for name in ("send_pos", "dest_offset", "recv_count", "recv_token"):
    assert np.asarray(getattr(handle, name)).dtype == np.int32, name


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dispatch_combine_vs_oracle(case):
  x, idx, probs, y = make_inputs(case)
  fn = dispatch_fn(case.E, case.max_recv, case.ep, case.mode)
  recv_x, ridx, rprobs, tpe, handle, out, roundtrip = H.to_np(fn(x, idx, probs, y))
  want = oracle.fused_dispatch(x, idx, probs, case.E, case.max_recv)
  lay = want["layout"]
  m = lay.max_recv
  L = case.E // case.ep
  assert recv_x.shape == (case.ep, m, HIDDEN)
  H.assert_bitwise(recv_x, want["recv_x"], "recv_x")
  H.assert_equal_int(ridx, want["recv_idx"], "recv_token_indices")
  assert ridx.dtype == np.int32
  H.assert_bitwise(rprobs, want["recv_probs"], "recv_token_probs")
  H.assert_equal_int(tpe, want["tokens_per_expert"], "tokens_per_expert")
  assert tpe.shape == (case.ep, L) and tpe.dtype == np.int32
  check_layout(handle, lay)
  # Combine sums only kept rows; padding/dropped rows of y are ignored.
  assert out.dtype == x.dtype and out.shape == x.shape
  H.assert_close(out, oracle.combine(lay, y), x.dtype, "fused_combine")
  # Round trip: combine(dispatch(x)) == x * number of ranks that kept the token.
  H.assert_close(roundtrip, x.astype(np.float64) * oracle.reach(lay)[..., None], x.dtype,
                 "roundtrip")
  if case.max_recv is not None and case.max_recv < case.ep * case.T:
    # The cases with a bound are chosen so that something is dropped.
    assert lay.dropped, "test case expected drops"


def test_drops_are_the_documented_ones():
  """Rank-major packing: the highest source ranks' last tokens go first (explicit set)."""
  ep, T, E, M = 4, 7, 4, 10
  rng = np.random.default_rng(11)
  # Every token of every rank goes to expert 1 (rank 1) only: rank 1 sees 28 rows, keeps 10.
  idx = np.full((ep, T, 1), 1, np.int32)
  idx[2, 3] = -1  # One token routed nowhere.
  probs = rng.uniform(0.1, 1, size=idx.shape).astype(np.float32)
  x = H.rand(rng, (ep, T, HIDDEN), np.float32)
  y = H.rand(rng, (ep, M, HIDDEN), np.float32)
  recv_x, _, _, tpe, handle, out, _ = H.to_np(dispatch_fn(E, M, ep, "shard_map")(x, idx, probs, y))
  kept = [(0, t) for t in range(7)] + [(1, 0), (1, 1), (1, 2)]
  np.testing.assert_array_equal(handle.recv_token[1], [t for _, t in kept])
  np.testing.assert_array_equal(handle.recv_count[1], [7, 3, 0, 0])
  np.testing.assert_array_equal(handle.recv_count[[0, 2, 3]], 0)
  np.testing.assert_array_equal(handle.dest_offset[:, 1], [0, 7, 14, 20])
  for s, t in kept:
    assert handle.send_pos[s, t, 1] == t
  assert (handle.send_pos[1, 3:, 1] == -1).all() and (handle.send_pos[2:, :, 1] == -1).all()
  np.testing.assert_array_equal(tpe[:, 0], [0, 10, 0, 0])
  H.assert_bitwise(recv_x[1], np.stack([x[s, t] for s, t in kept]), "kept rows")
  want = np.zeros((ep, T, HIDDEN))
  for row, (s, t) in enumerate(kept):
    want[s, t] = y[1, row]
  H.assert_close(out, want, np.float32, "combine with drops")
  assert (out[1, 3:] == 0).all() and (out[2:] == 0).all()


@pytest.mark.parametrize("ep,dtype", [(2, "bfloat16"), (4, "float32"), (8, "bfloat16")])
def test_roundtrip_exact(ep, dtype):
  """Dyadic data: combine(dispatch(x) * 1) is bitwise x * (ranks reached)."""
  rng = np.random.default_rng(ep)
  T, K, E = 13, 4, 2 * ep
  idx = oracle.random_topk(rng, ep, T, K, E, masked_rows=(1,))
  probs = rng.uniform(size=idx.shape).astype(np.float32)
  x = (rng.integers(1, 16, size=(ep, T, HIDDEN)) * rng.choice([-0.5, 0.5], size=(ep, T, HIDDEN)))
  x = x.astype(jnp.dtype(dtype))
  y = H.rand(rng, (ep, ep * T, HIDDEN), x.dtype)
  *_, handle, _, roundtrip = H.to_np(dispatch_fn(E, None, ep, "shard_map")(x, idx, probs, y))
  lay = oracle.layout(oracle.expert_dest_mask(idx, E))
  want = (x.astype(np.float64) * oracle.reach(lay)[..., None] + 0.0).astype(x.dtype)  # +0.0: no -0.
  H.assert_bitwise(roundtrip, want, "roundtrip")
  assert (roundtrip[:, 1] == 0).all()


# ----------------------------------------------------------------------------
# Gradients.


@functools.cache
def weighted_fn(E, max_recv, ep, mode):
  """x, probs -> combine(recv_x * sum of local probs): the Megatron flex pipeline."""

  def f(x, idx, probs):
    recv_x, _, rprobs, _, handle = fused_dispatch(x, idx, probs, E, "ep", max_recv_tokens=max_recv)
    y = recv_x * rprobs.sum(-1, keepdims=True).astype(recv_x.dtype)
    return fused_combine(y, handle, "ep")

  return H.ep_map(f, ep, mode)


@functools.cache
def dispatch_only_fn(E, max_recv, ep, mode):
  def f(x, idx, probs):
    recv_x, _, rprobs, _, _ = fused_dispatch(x, idx, probs, E, "ep", max_recv_tokens=max_recv)
    return recv_x, rprobs

  return H.ep_map(f, ep, mode)


@functools.cache
def combine_only_fn(E, max_recv, ep, mode):
  def f(y, x, idx, probs):
    *_, handle = fused_dispatch(x, idx, probs, E, "ep", max_recv_tokens=max_recv)
    return fused_combine(y, handle, "ep")

  return H.ep_map(f, ep, mode)


GRAD_CASES = [
    Case(2, 7, 2, 4, masked_rows=(2,)),
    Case(4, 13, 4, 8, max_recv=24),
    Case(8, 7, 2, 16, kind="one_expert", max_recv=20, mode="pmap"),
    Case(4, 7, 2, 8, "bfloat16", masked_rows=(0,)),
]


@pytest.mark.parametrize("case", GRAD_CASES[:3], ids=lambda c: c.id)
def test_check_grads(case):
  x, idx, probs, _ = make_inputs(case, "grad")
  fn = weighted_fn(case.E, case.max_recv, case.ep, case.mode)
  jax.test_util.check_grads(lambda a, p: fn(a, idx, p), (x, probs), order=1, modes=["rev"],
                            atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_vjp_vs_oracle(case):
  x, idx, probs, y = make_inputs(case, "vjp")
  rng = case.rng("cot")
  lay = oracle.layout(oracle.expert_dest_mask(idx, case.E), case.max_recv)
  m = lay.max_recv
  # Dispatch: cotangents everywhere, also on padding rows and on slots of other ranks.
  g_x = H.rand(rng, (case.ep, m, HIDDEN), x.dtype)
  g_p = H.rand(rng, (case.ep, m, case.K), np.float32)
  _, vjp = jax.vjp(lambda a, p: dispatch_only_fn(case.E, case.max_recv, case.ep, case.mode)(a, idx, p),
                   x, probs)
  gx, gp = H.to_np(vjp((g_x, g_p)))
  want_x, want_p = oracle.fused_dispatch_vjp(lay, idx, case.E, g_x, g_p)
  assert gx.dtype == x.dtype and gp.dtype == np.float32
  H.assert_close(gx, want_x, x.dtype, "d x")
  H.assert_close(gp, want_p, np.float32, "d probs")
  # Probabilities of unrouted (-1) slots and dropped rows get exactly zero.
  unrouted = idx < 0
  assert (gp[unrouted] == 0).all()
  # Combine: its backward is a cached dispatch, bitwise.
  g = H.rand(rng, x.shape, x.dtype)
  _, vjp = jax.vjp(lambda a: combine_only_fn(case.E, case.max_recv, case.ep, case.mode)(a, x, idx, probs), y)
  (gy,) = H.to_np(vjp(g))
  H.assert_bitwise(gy, oracle.move(lay, g), "d combine input")


# ----------------------------------------------------------------------------
# The reference backend primitives, called directly.


@functools.cache
def backend_fn(ep, max_recv):
  be = ReferenceBackend()

  def f(mask, p_f32, p_i32, p_bf16, s_i32, s_f32, q, y):
    recv, recv_sliced, handle = be.dispatch(mask, [p_f32, p_i32, p_bf16], [s_i32, s_f32],
                                            axis_name="ep", max_recv=max_recv)
    cached = be.dispatch_cached([q, p_i32], handle, axis_name="ep")
    comb = be.combine(y, handle, axis_name="ep")
    comb_bf16 = be.combine(y.astype(jnp.bfloat16), handle, axis_name="ep")
    return recv, recv_sliced, handle, cached, comb, comb_bf16

  return H.ep_map(f, ep)


@pytest.mark.parametrize("ep,T,max_recv", [(1, 5, None), (2, 7, None), (4, 13, 21), (8, 7, 9)])
def test_reference_backend_primitives(ep, T, max_recv):
  rng = np.random.default_rng(100 + ep)
  mask = rng.random((ep, T, ep)) < 0.6
  mask[:, 0] = False  # A token sent nowhere.
  mask[:, -1] = True  # A token sent everywhere.
  m = max_recv or ep * T
  p_f32 = H.rand(rng, (ep, T, 3), np.float32)
  p_i32 = rng.integers(1, 1000, size=(ep, T)).astype(np.int32)
  p_bf16 = H.rand(rng, (ep, T, 2, 3), jnp.bfloat16)
  s_i32 = rng.integers(1, 1000, size=(ep, T, ep)).astype(np.int32)
  s_f32 = H.rand(rng, (ep, T, ep, 2), np.float32)
  q = H.rand(rng, (ep, T, 4), np.float32)
  y = H.rand(rng, (ep, m, 3), np.float32)
  recv, recv_sliced, handle, cached, comb, comb_bf16 = H.to_np(
      backend_fn(ep, m)(mask, p_f32, p_i32, p_bf16, s_i32, s_f32, q, y))
  lay = oracle.layout(mask, m)
  check_layout(handle, lay)
  for got, p, name in zip(recv, (p_f32, p_i32, p_bf16), ("f32", "i32", "bf16")):
    H.assert_bitwise(got, oracle.move(lay, p), f"payload {name}")
  for got, p, name in zip(recv_sliced, (s_i32, s_f32), ("i32", "f32")):
    H.assert_bitwise(got, oracle.move_sliced(lay, p), f"sliced {name}")
  H.assert_bitwise(cached[0], oracle.move(lay, q), "dispatch_cached f32")
  H.assert_bitwise(cached[1], oracle.move(lay, p_i32), "dispatch_cached i32")
  assert comb.dtype == np.float32 and comb_bf16.dtype == jnp.bfloat16
  H.assert_close(comb, oracle.combine(lay, y), np.float32, "combine")
  H.assert_close(comb_bf16, oracle.combine(lay, y.astype(jnp.bfloat16)), jnp.bfloat16, "combine bf16")
  assert (comb[:, 0] == 0).all()
  if max_recv is not None and max_recv < ep * T:
    assert lay.dropped
