"""Trace-time validation of the public ops: bad inputs fail before anything runs, naming the fix."""

from __future__ import annotations

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_moe_dispatch import (fused_combine, fused_dispatch, hybrid_ep_combine,
                              hybrid_ep_dispatch, quantize_fp8)

EP, T, HID, K, E = 2, 5, 4, 2, 8


def trace(fn, *args, ep=EP):
  """Trace ``fn`` per rank under jit(shard_map) without running it."""
  return jax.eval_shape(H.ep_map(fn, ep), *args)


def sds(shape, dtype):
  return jax.ShapeDtypeStruct((EP,) + tuple(shape), jnp.dtype(dtype))


X = sds((T, HID), jnp.float32)
IDX = sds((T, K), jnp.int32)
PROBS = sds((T, K), jnp.float32)


def dispatch(num_experts=E, axis_name="ep", **kw):
  return lambda x, i, p: fused_dispatch(x, i, p, num_experts, axis_name, **kw)[0]


def test_good_inputs_trace():
  out = trace(dispatch(), X, IDX, PROBS)
  assert out.shape == (EP, EP * T, HID)


@pytest.mark.parametrize("args,exc,match", [
    ((sds((T, HID, 1), "float32"), IDX, PROBS), ValueError, r"x must be \[T, H\].*\(5, 4, 1\)"),
    ((sds((T,), "float32"), IDX, PROBS), ValueError, r"x must be \[T, H\]"),
    ((sds((T, HID), "int32"), IDX, PROBS), TypeError, r"x must be floating.*int32"),
    ((X, sds((T + 1, K), "int32"), sds((T + 1, K), "float32")), ValueError,
     r"token_indices must be \[T=5, K\].*\(6, 2\)"),
    ((X, sds((T,), "int32"), sds((T,), "float32")), ValueError, r"token_indices must be \[T=5, K\]"),
    ((X, sds((T, K), "float32"), PROBS), TypeError, r"token_indices must be int32.*float32"),
    ((X, IDX, sds((T, K + 1), "float32")), ValueError, r"token_probs must have the shape of token_indices"),
    ((X, IDX, sds((T, K), "int32")), TypeError, r"token_probs must be floating"),
], ids=["x-rank3", "x-rank1", "x-int", "idx-T", "idx-rank1", "idx-float", "probs-shape", "probs-int"])
def test_fused_dispatch_bad_inputs(args, exc, match):
  with pytest.raises(exc, match=match):
    trace(dispatch(), *args)


def test_fp8_pair_validation():
  rows8 = sds((T, 200), jnp.float8_e4m3fn)
  good = sds((T, 2), jnp.float32)
  trace(lambda r, s, i, p: fused_dispatch((r, s), i, p, E, "ep")[0][0], rows8, good, IDX, PROBS)
  with pytest.raises(ValueError, match=r"scales must be float32 \(5, 2\).*quantize_fp8"):
    trace(lambda r, s, i, p: fused_dispatch((r, s), i, p, E, "ep")[0], rows8, sds((T, 1), "float32"),
          IDX, PROBS)
  with pytest.raises(ValueError, match=r"scales must be float32"):
    trace(lambda r, s, i, p: fused_dispatch((r, s), i, p, E, "ep")[0], rows8, sds((T, 2), "bfloat16"),
          IDX, PROBS)
  with pytest.raises(TypeError, match=r"FP8 rows must be float8_e4m3fn"):
    trace(lambda r, s, i, p: fused_dispatch((r, s), i, p, E, "ep")[0], sds((T, 200), "bfloat16"),
          good, IDX, PROBS)
  with pytest.raises(TypeError, match=r"pair"):
    trace(lambda r, s, i, p: fused_dispatch((r, s, s), i, p, E, "ep")[0], rows8, good, IDX, PROBS)


def test_fp8_rows_without_scales_rejected():
  with pytest.raises(TypeError, match="scales"):
    trace(dispatch(), sds((T, HID), jnp.float8_e4m3fn), IDX, PROBS)


@pytest.mark.parametrize("num_experts,match", [
    (7, r"num_experts=7 is not divisible by the expert-parallel size 2"),
    (0, r"num_experts must be a positive int"),
    (8.0, r"num_experts must be a positive int"),
])
def test_num_experts(num_experts, match):
  with pytest.raises(ValueError, match=match):
    trace(dispatch(num_experts), X, IDX, PROBS)


def test_num_experts_not_divisible_by_larger_axis():
  with pytest.raises(ValueError, match=r"num_experts=12 is not divisible.*size 8.*Fix"):
    trace(dispatch(12), jax.ShapeDtypeStruct((8, T, HID), jnp.float32),
          jax.ShapeDtypeStruct((8, T, K), jnp.int32),
          jax.ShapeDtypeStruct((8, T, K), jnp.float32), ep=8)


def test_unbound_axis_name():
  with pytest.raises(ValueError, match=r"axis_name='tp' is not bound.*Fix: call this op inside"):
    trace(dispatch(axis_name="tp"), X, IDX, PROBS)
  with pytest.raises(ValueError, match=r"axis_name='ep' is not bound.*Fix"):
    fused_dispatch(jnp.ones((T, HID)), jnp.zeros((T, K), jnp.int32), jnp.ones((T, K)), E, "ep")


def test_unbound_axis_name_combine():
  def f(x, i, p):
    recv_x, _, _, _, handle = fused_dispatch(x, i, p, E, "ep")
    return fused_combine(recv_x, handle, "tp")

  with pytest.raises(ValueError, match=r"axis_name='tp' is not bound"):
    trace(f, X, IDX, PROBS)


@pytest.mark.parametrize("bad", [E, E + 5, -2])
def test_constant_indices_out_of_range(bad):
  const = np.zeros((T, K), np.int32)
  const[3, 1] = bad
  with pytest.raises(ValueError, match=r"token_indices must lie in \[-1, 8\)"):
    trace(lambda x, p: fused_dispatch(x, const, p, E, "ep")[0], X, PROBS)
  const[3, 1] = -1  # In range: fine.
  trace(lambda x, p: fused_dispatch(x, const, p, E, "ep")[0], X, PROBS)


@pytest.mark.parametrize("max_recv", [0, -3, 2.5])
def test_bad_max_recv_tokens(max_recv):
  with pytest.raises(ValueError, match=r"max_recv_tokens must be a positive int"):
    trace(dispatch(max_recv_tokens=max_recv), X, IDX, PROBS)


@pytest.mark.parametrize("rows,exc,match", [
    ((EP * T - 1, HID), ValueError, r"x must be \[M=10, H\].*\(9, 4\)"),
    ((EP * T + 1, HID), ValueError, r"x must be \[M=10, H\]"),
    ((EP * T,), ValueError, r"x must be \[M=10, H\]"),
])
def test_combine_wrong_rows(rows, exc, match):
  def f(x, i, p):
    *_, handle = fused_dispatch(x, i, p, E, "ep")
    return fused_combine(jnp.ones(rows, jnp.float32), handle, "ep")

  with pytest.raises(exc, match=match):
    trace(f, X, IDX, PROBS)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float8_e4m3fn])
def test_combine_wrong_dtype(dtype):
  def f(x, i, p):
    *_, handle = fused_dispatch(x, i, p, E, "ep")
    return fused_combine(jnp.ones((EP * T, HID), dtype), handle, "ep")

  with pytest.raises(TypeError, match=r"bf16/f16/f32 for combine"):
    trace(f, X, IDX, PROBS)


# ----------------------------------------------------------------------------
# HybridEP.

L = E // EP
MAP = sds((T, E), jnp.bool_)
DPROBS = sds((T, E), jnp.float32)


def hybrid(num_local=L, **kw):
  return lambda x, m, p: hybrid_ep_dispatch(x, m, p, num_local, "ep", **kw)[0]


def test_hybrid_good_inputs_trace():
  out = trace(hybrid(topk=K, pad_multiple=4), X, MAP, DPROBS)
  assert out.shape == (EP, EP * T * K + L * 3, HID)
  out = trace(hybrid(num_permuted_tokens=17), X, MAP, DPROBS)
  assert out.shape == (EP, 17, HID)


def test_hybrid_needs_a_static_size():
  with pytest.raises(ValueError, match=r"Fix: pass num_permuted_tokens=N, or topk=K"):
    trace(hybrid(), X, MAP, DPROBS)


@pytest.mark.parametrize("args,kw,exc,match", [
    ((X, sds((T, E + 1), "bool"), sds((T, E + 1), "float32")), {}, ValueError,
     r"routing_map must be \[T=5, E=8\] \(ep_size 2 x 4 local experts\)"),
    ((X, sds((T + 1, E), "bool"), sds((T + 1, E), "float32")), {}, ValueError, r"routing_map must be \[T=5, E=8\]"),
    ((X, sds((T, E), "int32"), DPROBS), {}, TypeError, r"routing_map must be bool"),
    ((X, MAP, sds((T, E - 1), "float32")), {}, ValueError, r"probs must be floating \(5, 8\)"),
    ((X, MAP, sds((T, E), "int32")), {}, ValueError, r"probs must be floating"),
    ((sds((T, HID), "int32"), MAP, DPROBS), {}, TypeError, r"x must be floating"),
    ((X, MAP, DPROBS), dict(pad_multiple=0), ValueError, r"pad_multiple must be a positive int"),
    ((X, MAP, DPROBS), dict(num_local=0), ValueError, r"num_local_experts must be a positive int"),
    ((X, MAP, DPROBS), dict(max_recv_tokens=0), ValueError, r"max_recv_tokens must be a positive int"),
], ids=["map-E", "map-T", "map-int", "probs-shape", "probs-int", "x-int", "pad0", "L0", "M0"])
def test_hybrid_bad_inputs(args, kw, exc, match):
  num_local = kw.pop("num_local", L)
  with pytest.raises(exc, match=match):
    trace(hybrid(num_local, topk=K, **kw), *args)


def test_hybrid_scaling_factor_needs_fp8_rows():
  fn = lambda x, s, m, p: hybrid_ep_dispatch(x, m, p, L, "ep", scaling_factor=s, topk=K)[0]
  with pytest.raises(TypeError, match=r"FP8 rows must be float8_e4m3fn"):
    trace(fn, X, sds((T, 1), "float32"), MAP, DPROBS)
  with pytest.raises(ValueError, match=r"scales must be float32 \(5, 1\)"):
    trace(fn, sds((T, HID), jnp.float8_e4m3fn), sds((T, 2), "float32"), MAP, DPROBS)
  trace(fn, sds((T, HID), jnp.float8_e4m3fn), sds((T, 1), "float32"), MAP, DPROBS)


def test_hybrid_unbound_axis():
  with pytest.raises(ValueError, match=r"axis_name='tp' is not bound"):
    trace(lambda x, m, p: hybrid_ep_dispatch(x, m, p, L, "tp", topk=K)[0], X, MAP, DPROBS)


@pytest.mark.parametrize("rows,kw,exc,match", [
    (16, {}, ValueError, r"x must be \[N=17, H\].*\(16, 4\)"),
    (17, dict(num_permuted_tokens=18), ValueError, r"num_permuted_tokens=18 differs from the dispatch's 17"),
    (17, dict(dtype=jnp.int32), TypeError, r"bf16/f16/f32 for combine"),
], ids=["rows", "N-mismatch", "int"])
def test_hybrid_combine_bad_inputs(rows, kw, exc, match):
  dtype = kw.pop("dtype", jnp.float32)

  def f(x, m, p):
    *_, handle = hybrid_ep_dispatch(x, m, p, L, "ep", num_permuted_tokens=17)
    return hybrid_ep_combine(jnp.ones((rows, HID), dtype), handle, "ep", **kw)

  with pytest.raises(exc, match=match):
    trace(f, X, MAP, DPROBS)


def test_quantize_helper_shapes():
  q, s = quantize_fp8(jnp.ones((3, 130)))
  assert q.shape == (3, 130) and s.shape == (3, 2)


def test_index_range_is_checked_on_concrete_values_only():
  """Concrete indices (numpy, or jax arrays closed over) are range-checked; traced ones are not.

  A traced index has no value at trace time, and reading it back would be a
  host sync, so out-of-range traced ids are the caller's contract (docstring of
  :func:`jax_moe_dispatch.core.routing.check_index_range`).
  """
  const = jnp.full((T, K), E, jnp.int32)
  with pytest.raises(ValueError, match=r"token_indices must lie in \[-1, 8\)"):
    trace(lambda x, p: fused_dispatch(x, const, p, E, "ep")[0], X, PROBS)
  out = trace(dispatch(), X, IDX, PROBS)  # Traced: nothing to check, the trace succeeds.
  assert out.shape == (EP, EP * T, HID)


def test_handle_from_the_other_protocol():
  def hybrid_into_fused(x, m, p):
    permuted, *_, handle = hybrid_ep_dispatch(x, m, p, L, "ep", num_permuted_tokens=EP * T)
    return fused_combine(permuted, handle, "ep")

  def fused_into_hybrid(x, i, p):
    recv_x, *_, handle = fused_dispatch(x, i, p, E, "ep")
    return hybrid_ep_combine(recv_x, handle, "ep")

  with pytest.raises(TypeError, match=r"fused_combine needs the DispatchHandle.*got HybridEPHandle.*Fix"):
    trace(hybrid_into_fused, X, MAP, DPROBS)
  with pytest.raises(TypeError, match=r"hybrid_ep_combine needs the HybridEPHandle.*got DispatchHandle"):
    trace(fused_into_hybrid, X, IDX, PROBS)


@pytest.mark.parametrize("kw,match", [
    (dict(topk=0), r"topk must be a positive int, got 0"),
    (dict(topk=-1), r"topk must be a positive int"),
    (dict(topk=2.5), r"topk must be a positive int"),
    (dict(num_permuted_tokens=-2), r"num_permuted_tokens must be an int >= 0, got -2.*Fix"),
    (dict(num_permuted_tokens=3.0), r"num_permuted_tokens must be an int >= 0"),
])
def test_hybrid_bad_sizes(kw, match):
  with pytest.raises(ValueError, match=match):
    trace(lambda x, m, p: hybrid_ep_dispatch(x, m, p, L, "ep", **kw)[0], X, MAP, DPROBS)
