"""Property-based tests of the public ops' input handling (reference backend, emulated CPU devices).

Each drawn case either runs and equals the numpy oracle, or raises a Python
error before anything runs (``ValueError``/``TypeError`` naming the fix);
never a crash, a hang or a silently wrong result. Drawn over: ep sizes, shapes
(``T = 0`` and ``1``, hidden sizes not a multiple of 8 or 128), dtypes, index
values (-1, ``>= num_experts``, below -1), receive and permuted bounds too
small to hold everything (rows are dropped as documented), and argument
mismatches.

Index values are checked only where they are concrete at trace time (numpy
arrays, or jax arrays closed over): a traced index has no value before the op
runs, and reading it back would cost a host sync, so range-checking traced
indices is the caller's contract. The index-range property therefore closes
over its indices.
"""

from __future__ import annotations

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jax_moe_dispatch import fused_combine, fused_dispatch, hybrid_ep_combine, hybrid_ep_dispatch
from jax_moe_dispatch.testing import oracle

REF = dict(implementation="reference")
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
EPS = st.sampled_from([1, 2, 4])
HIDDEN = st.sampled_from([1, 3, 8, 130])  # Not multiples of 8 / 128, and one that is.
FLOATS = st.sampled_from(["float32", "bfloat16", "float16"])


def np_dtype(name: str) -> np.dtype:
  return np.dtype(jnp.dtype(name))


@st.composite
def topk_indices(draw, ep, num_tokens, topk, num_experts):
  """``[ep, T, K]`` distinct expert ids per token, some -1."""
  rows = []
  for _ in range(ep * num_tokens):
    row = draw(st.permutations(range(num_experts)))[:topk]
    row = [e if draw(st.booleans()) or e % 3 else -1 for e in row]
    rows.append(row)
  return np.array(rows, np.int32).reshape(ep, num_tokens, topk)


@st.composite
def fused_cases(draw):
  ep = draw(EPS)
  num_tokens = draw(st.integers(0, 5))
  num_experts = ep * draw(st.integers(1, 3))
  topk = draw(st.integers(1, min(3, num_experts)))
  hidden = draw(HIDDEN)
  dtype = draw(FLOATS)
  max_recv = draw(st.one_of(st.none(), st.integers(1, max(1, ep * num_tokens))))
  idx = draw(topk_indices(ep, num_tokens, topk, num_experts))
  seed = draw(st.integers(0, 2**16))
  return ep, num_tokens, num_experts, topk, hidden, dtype, max_recv, idx, seed


@given(fused_cases())
@SETTINGS
def test_fused_dispatch_combine_any_valid_shape(case):
  ep, num_tokens, num_experts, topk, hidden, dtype, max_recv, idx, seed = case
  rng = np.random.default_rng(seed)
  x = H.rand(rng, (ep, num_tokens, hidden), np_dtype(dtype))
  probs = rng.uniform(0.1, 1.0, size=idx.shape).astype(np.float32)
  m = max_recv or ep * num_tokens
  y = H.rand(rng, (ep, m, hidden), np_dtype(dtype))

  def f(x, idx, probs, y):
    recv_x, ridx, rprobs, tpe, handle = fused_dispatch(x, idx, probs, num_experts, "ep",
                                                       max_recv_tokens=max_recv, **REF)
    return recv_x, ridx, rprobs, tpe, fused_combine(y, handle, "ep", **REF)

  recv_x, ridx, rprobs, tpe, out = H.to_np(H.ep_map(f, ep)(x, idx, probs, y))
  want = oracle.fused_dispatch(x, idx, probs, num_experts, max_recv)
  H.assert_bitwise(recv_x, want["recv_x"], "recv_x")
  H.assert_equal_int(ridx, want["recv_idx"], "recv_token_indices")
  H.assert_bitwise(rprobs, want["recv_probs"], "recv_token_probs")
  H.assert_equal_int(tpe, want["tokens_per_expert"], "tokens_per_expert")
  H.assert_close(out, oracle.combine(want["layout"], y), x.dtype, "fused_combine")


@given(ep=EPS, num_tokens=st.integers(1, 4), per_rank=st.integers(1, 3),
       bad=st.one_of(st.integers(-2**31, -2), st.integers(0, 2**31 - 1)),
       where=st.integers(0, 2**16), seed=st.integers(0, 2**16))
@SETTINGS
def test_fused_dispatch_index_range(ep, num_tokens, per_rank, bad, where, seed):
  """Concrete indices: any value outside [-1, E) is refused; in range, the op equals the oracle."""
  num_experts, topk = ep * per_rank, 1
  rng = np.random.default_rng(seed)
  idx = rng.integers(-1, num_experts, size=(num_tokens, topk)).astype(np.int32)
  idx.flat[where % idx.size] = bad
  x = H.rand(rng, (ep, num_tokens, 3), np.float32)
  probs = rng.uniform(0.1, 1.0, size=(ep, num_tokens, topk)).astype(np.float32)
  run = H.ep_map(lambda x, p: fused_dispatch(x, idx, p, num_experts, "ep", **REF)[:4], ep)
  if not -1 <= bad < num_experts:
    with pytest.raises(ValueError, match=rf"token_indices must lie in \[-1, {num_experts}\)"):
      run(x, probs)
    return
  recv_x, ridx, rprobs, tpe = H.to_np(run(x, probs))
  want = oracle.fused_dispatch(x, np.broadcast_to(idx, probs.shape), probs, num_experts)
  H.assert_bitwise(recv_x, want["recv_x"], "recv_x")
  H.assert_equal_int(ridx, want["recv_idx"], "recv_token_indices")
  H.assert_bitwise(rprobs, want["recv_probs"], "recv_token_probs")
  H.assert_equal_int(tpe, want["tokens_per_expert"], "tokens_per_expert")


@given(ep=EPS, x_shape=st.sampled_from([(5, 4), (5,), (5, 4, 1), (0, 4)]),
       x_dtype=st.sampled_from(["float32", "bfloat16", "int32", "float8_e4m3fn"]),
       idx_shape=st.sampled_from([(5, 2), (4, 2), (5,), (5, 0)]),
       idx_dtype=st.sampled_from(["int32", "int16", "float32"]),
       probs_dtype=st.sampled_from(["float32", "int32"]),
       num_experts=st.sampled_from([0, 3, 8, 12]),
       max_recv=st.sampled_from([None, 0, -1, 1, 7]))
@SETTINGS
def test_fused_dispatch_refuses_bad_arguments_before_running(ep, x_shape, x_dtype, idx_shape,
                                                            idx_dtype, probs_dtype, num_experts,
                                                            max_recv):
  """Any mix of arguments either traces or raises ValueError/TypeError with a message."""
  def sds(shape, dtype):
    return jax.ShapeDtypeStruct((ep,) + shape, jnp.dtype(dtype))

  valid = (len(x_shape) == 2 and x_dtype in ("float32", "bfloat16")
           and len(idx_shape) == 2 and idx_shape[0] == x_shape[0] and idx_dtype != "float32"
           and probs_dtype == "float32" and num_experts > 0 and num_experts % ep == 0
           and (max_recv is None or max_recv > 0))
  run = lambda x, i, p: fused_dispatch(x, i, p, num_experts, "ep", max_recv_tokens=max_recv,
                                       **REF)[0]
  args = sds(x_shape, x_dtype), sds(idx_shape, idx_dtype), sds(idx_shape, probs_dtype)
  if valid:
    out = jax.eval_shape(H.ep_map(run, ep), *args)
    assert out.shape == (ep, max_recv or ep * x_shape[0], x_shape[1])
  else:
    with pytest.raises((ValueError, TypeError)) as err:
      jax.eval_shape(H.ep_map(run, ep), *args)
    assert len(str(err.value)) > 20, err.value


@st.composite
def hybrid_cases(draw):
  ep = draw(EPS)
  num_tokens = draw(st.integers(0, 5))
  num_local = draw(st.integers(1, 3))
  topk = draw(st.integers(1, min(3, ep * num_local)))
  hidden = draw(HIDDEN)
  dtype = draw(FLOATS)
  pad = draw(st.integers(1, 4))
  max_recv = draw(st.one_of(st.none(), st.integers(1, max(1, ep * num_tokens))))
  num_rows = draw(st.one_of(st.none(), st.integers(0, 12)))  # None: the worst case for topk.
  idx = draw(topk_indices(ep, num_tokens, topk, ep * num_local))
  seed = draw(st.integers(0, 2**16))
  return ep, num_tokens, num_local, topk, hidden, dtype, pad, max_recv, num_rows, idx, seed


@given(hybrid_cases())
@SETTINGS
def test_hybrid_dispatch_combine_any_valid_shape(case):
  ep, num_tokens, num_local, topk, hidden, dtype, pad, max_recv, num_rows, idx, seed = case
  rng = np.random.default_rng(seed)
  x = H.rand(rng, (ep, num_tokens, hidden), np_dtype(dtype))
  tprobs = rng.uniform(0.1, 1.0, size=idx.shape).astype(np.float32)
  routing_map, probs = oracle.topk_to_map(idx, tprobs, ep * num_local)
  want = oracle.hybrid_dispatch(x, routing_map, probs, num_local, max_recv, num_rows, pad, topk)
  y = H.rand(rng, (ep, want["num_rows"], hidden), np_dtype(dtype))

  def f(x, routing_map, probs, y):
    px, pp, _, tpe, handle = hybrid_ep_dispatch(
        x, routing_map, probs, num_local, "ep", num_permuted_tokens=num_rows, pad_multiple=pad,
        topk=topk, max_recv_tokens=max_recv, **REF)
    return px, pp, tpe, hybrid_ep_combine(y, handle, "ep", **REF)

  px, pp, tpe, out = H.to_np(H.ep_map(f, ep)(x, routing_map, probs, y))
  H.assert_bitwise(px, want["permuted_x"], "permuted_x")
  H.assert_bitwise(pp, want["permuted_probs"], "permuted_probs")
  H.assert_equal_int(tpe, want["tokens_per_expert"], "tokens_per_expert")
  H.assert_close(out, oracle.hybrid_combine(want, y), x.dtype, "hybrid_ep_combine")


@given(ep=EPS, map_width=st.sampled_from([7, 8, 9]), map_dtype=st.sampled_from(["bool", "int32"]),
       probs_dtype=st.sampled_from(["float32", "int32"]),
       num_local=st.sampled_from([0, 1, 2, 4, 8]), topk=st.sampled_from([None, -1, 0, 2]),
       num_rows=st.sampled_from([None, -1, 0, 9]), pad=st.sampled_from([None, 0, 3]),
       combine_rows=st.integers(-1, 1), wrong_handle=st.booleans())
@SETTINGS
def test_hybrid_refuses_bad_arguments_before_running(ep, map_width, map_dtype, probs_dtype,
                                                     num_local, topk, num_rows, pad, combine_rows,
                                                     wrong_handle):
  """Mismatched ep sizes, bad sizes and a handle from the other protocol raise before running."""
  T, hid = 5, 3

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct((ep,) + shape, jnp.dtype(dtype))

  def f(x, m, p):
    px, *_, handle = hybrid_ep_dispatch(x, m, p, num_local, "ep", num_permuted_tokens=num_rows,
                                        pad_multiple=pad, topk=topk, **REF)
    if wrong_handle:
      handle = handle.dispatch
    rows = px.shape[0] + combine_rows
    y = jnp.ones((rows if rows >= 0 else 1, hid), px.dtype)  # Always a wrong count when != 0.
    return hybrid_ep_combine(y, handle, "ep", **REF)

  valid = (num_local > 0 and map_width == ep * num_local and map_dtype == "bool"
           and probs_dtype == "float32" and pad != 0
           and (num_rows is None and topk is not None and topk > 0
                or num_rows is not None and num_rows >= 0)
           and combine_rows == 0 and not wrong_handle)
  args = sds((T, hid), "float32"), sds((T, map_width), map_dtype), sds((T, map_width), probs_dtype)
  if valid:
    assert jax.eval_shape(H.ep_map(f, ep), *args).shape == (ep, T, hid)
  else:
    with pytest.raises((ValueError, TypeError)) as err:
      jax.eval_shape(H.ep_map(f, ep), *args)
    assert len(str(err.value)) > 20, err.value
