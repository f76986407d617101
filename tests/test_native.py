"""The native CUDA backend on GPUs: bit-identical to the reference backend and the oracle.

Every test runs the same per-rank function with ``implementation="native"`` and
``implementation="reference"`` on fresh random data and compares the results
bit for bit (dispatch layouts, handles, combine sums, gradients), and checks the
native result against the numpy float64 oracle. Skipped without GPUs; fails
(does not skip) on GPUs when the extension is missing, so a broken build shows.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.numpy as jnp
import jax.test_util  # noqa: F401
import numpy as np
from jax_moe_dispatch.testing import oracle
import pytest
from conftest import gpu_count

import jax_moe_dispatch as jmd
from jax_moe_dispatch.backends import buffer

pytestmark = pytest.mark.gpu

IMPLS = ("native", "reference")


@pytest.fixture(params=[2, 4, 8], ids=lambda n: f"ep{n}")
def ep(request):
  return H.native_group(request.param, gpu_count())


rng_for = H.rng_for


def routing(rng, ep, T, K, E, kind="random"):
  idx = oracle.random_topk(rng, ep, T, K, E, kind=kind, masked_rows=(1,) if T > 2 else ())
  probs = np.where(idx >= 0, rng.random(idx.shape) + 0.1, 0).astype(np.float32)
  return idx, probs


def both(fn, ep, *args):
  return H.both_impls(fn, ep, *args, impls=IMPLS)


assert_same = H.assert_same


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "fp8"])
@pytest.mark.parametrize("kind,max_recv", [("random", None), ("one_expert", None), ("random", 9)])
def test_dispatch_and_combine_bitwise(ep, dtype, kind, max_recv):
  T, K, E, Hd = 37, 4, 8 * ep, 256 if dtype == "fp8" else 72
  rng = rng_for(ep, dtype, kind, max_recv)
  idx, probs = routing(rng, ep, T, K, E, kind)
  x = H.rand(rng, (ep, T, Hd), np.float32)
  if dtype == "fp8":
    q, s = jax.vmap(jmd.quantize_fp8)(jnp.asarray(x))
    args = (np.asarray(q), np.asarray(s), idx, probs)
  else:
    args = (x.astype(jnp.dtype(dtype)), idx, probs)

  def fn(impl, *a):
    xs = (a[0], a[1]) if dtype == "fp8" else a[0]
    i, p = a[-2], a[-1]
    recv_x, recv_idx, recv_probs, tpe, handle = jmd.fused_dispatch(
        xs, i, p, E, "ep", max_recv_tokens=max_recv, implementation=impl)
    rows = recv_x[0].astype(jnp.float32) if dtype == "fp8" else recv_x
    weight = (jnp.arange(rows.shape[0]) % 3 + 1).astype(rows.dtype)[:, None]
    y = jmd.fused_combine(rows * weight, handle, "ep", implementation=impl)
    return recv_x, recv_idx, recv_probs, tpe, handle, y

  out = both(fn, ep, *args)
  assert_same(out["native"], out["reference"], f"dispatch/combine {dtype}")
  want = oracle.fused_dispatch(args[0], idx, probs, E, max_recv,
                               scales=args[1] if dtype == "fp8" else None)
  recv_x = out["native"][0]
  H.assert_bitwise(recv_x[0] if dtype == "fp8" else recv_x, want["recv_x"], "recv_x vs oracle")
  H.assert_equal_int(out["native"][1], want["recv_idx"], "recv_idx vs oracle")
  H.assert_equal_int(out["native"][3], want["tokens_per_expert"], "tokens_per_expert vs oracle")
  rows = (recv_x[0].astype(np.float64) if dtype == "fp8" else recv_x.astype(np.float64))
  weight = (np.arange(rows.shape[1]) % 3 + 1)[None, :, None]
  expect = oracle.combine(want["layout"], rows * weight)
  H.assert_close(out["native"][5], expect, np.float32 if dtype == "fp8" else args[0].dtype,
                 "combine vs oracle")


def test_gradients_equal_reference_and_numeric(ep):
  T, K, E, Hd = 19, 2, 4 * ep, 24
  rng = rng_for("grad", ep)
  idx, probs = routing(rng, ep, T, K, E)
  x = H.rand(rng, (ep, T, Hd), np.float32)
  w = H.rand(rng, (ep, ep * T, Hd), np.float32)

  def loss(impl, x, probs, idx, w):
    recv_x, _, recv_probs, _, handle = jmd.fused_dispatch(x, idx, probs, E, "ep", implementation=impl)
    y = jmd.fused_combine(jnp.tanh(recv_x * w) * recv_probs.sum(-1, keepdims=True), handle, "ep",
                          implementation=impl)
    return (y * y).sum()

  def grads(impl, x, probs, idx, w):
    return jax.grad(lambda a, b: loss(impl, a, b, idx, w), argnums=(0, 1))(x, probs)

  out = both(grads, ep, x, probs, idx, w)
  # Our ops are bitwise equal (tested above); XLA may fuse the code around them
  # differently in the two programs, so the gradients agree to float32 rounding.
  for a, b in zip(out["native"], out["reference"]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  f = H.ep_map(lambda a, b, i, ww: loss("native", a, b, i, ww)[None], ep)
  jax.test_util.check_grads(lambda a, b: f(a, b, idx, w).sum(), (jnp.asarray(x), jnp.asarray(probs)),
                            order=1, modes=("rev",), atol=2e-2, rtol=2e-2, eps=1e-3)


@pytest.mark.parametrize("pad", [None, 16])
def test_hybrid_ep_bitwise_with_grads(ep, pad):
  """Every output of hybrid dispatch + combine vs the reference and the oracle, bit for bit.

  The combine's input is the permuted rows times powers of two (exact in any
  precision, so XLA's excess-precision fusions cannot change it), and its float32
  sums are exact (bfloat16 values in [0.05, 20], K <= 3 terms need under 24
  mantissa bits), so the oracle's float64 sum rounded once to bfloat16 is the
  result whatever the order of the adds.
  """
  T, K, L, Hd = 29, 3, 4, 40
  E = ep * L
  rng = rng_for("hybrid", ep, pad)
  idx, probs = routing(rng, ep, T, K, E)
  rmap, dprobs = oracle.topk_to_map(idx, probs, E)
  x = H.rand(rng, (ep, T, Hd), np.float32).astype(jnp.bfloat16)

  def scale(n):  # [n, 1] powers of two.
    return (2.0 ** (np.arange(n) % 3))[:, None]

  def fn(impl, x, rmap, dprobs):
    def loss(x, dprobs):
      px, pprobs, _, tpe, handle = jmd.hybrid_ep_dispatch(
          x, rmap, dprobs, L, "ep", topk=K, pad_multiple=pad, implementation=impl)
      y = jmd.hybrid_ep_combine(px * jnp.asarray(scale(px.shape[0]), px.dtype), handle, "ep",
                                implementation=impl)
      total = y.astype(jnp.float32).sum() + (pprobs * jnp.asarray(scale(px.shape[0])[:, 0], pprobs.dtype)).sum()
      return total, (px, pprobs, tpe, handle, y)

    (_, aux), g = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, dprobs)
    return aux, g

  out = both(fn, ep, x, rmap, dprobs)
  assert_same(out["native"], out["reference"], "hybrid")
  (px, pprobs, tpe, handle, y), _ = out["native"]
  want = oracle.hybrid_dispatch(x, rmap, dprobs, L, pad_multiple=pad or 1, topk=K)
  lay = want["layout"]
  H.assert_bitwise(px, want["permuted_x"], "permuted_x vs oracle")
  H.assert_bitwise(pprobs, want["permuted_probs"], "permuted_probs vs oracle")
  H.assert_equal_int(tpe, want["tokens_per_expert"], "tokens_per_expert vs oracle")
  H.assert_equal_int(handle.dispatch.send_pos, lay.send_pos, "handle send_pos vs oracle")
  H.assert_equal_int(handle.dispatch.dest_offset, lay.dest_offset, "handle dest_offset vs oracle")
  H.assert_equal_int(handle.dispatch.recv_count, lay.recv_count, "handle recv_count vs oracle")
  H.assert_equal_int(handle.dispatch.recv_token, lay.recv_token, "handle recv_token vs oracle")
  H.assert_equal_int(handle.permutation.perm_row, want["perm_row"], "handle perm_row vs oracle")
  H.assert_equal_int(handle.permutation.src_row, want["src_row"], "handle src_row vs oracle")
  weighted = want["permuted_x"].astype(np.float64) * scale(want["num_rows"])[None]
  H.assert_bitwise(y, oracle.hybrid_combine(want, weighted).astype(jnp.bfloat16), "combine vs oracle")


def _bits(a: jax.Array) -> jax.Array:
  """``a``'s bits as unsigned ints of its width (integers as they are)."""
  if jnp.issubdtype(a.dtype, jnp.integer):
    return a
  return jax.lax.bitcast_convert_type(a, {2: jnp.uint16, 4: jnp.uint32}[a.dtype.itemsize])


def test_thousand_calls_fresh_routing(ep):
  """1000 calls in one jitted loop, native vs reference on each, every output compared.

  Each iteration draws fresh routing and probabilities, then runs a bfloat16
  dispatch + combine with a small receive buffer (rows are dropped) and a
  float32 dispatch + combine through its backward pass (cached dispatch and a
  combine of gradients). Forward outputs and gradients must be bit-identical.
  """
  T, K, E, Hd, n = 64, 4, 8 * ep, 128, 1000
  max_recv = T  # Below what most ranks receive: the last sources' rows are dropped.

  def per_rank(seed):
    me = jax.lax.axis_index("ep")

    def body(i, bad):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed[0]), i), me)
      k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
      scores = jax.random.uniform(k1, (T, E))
      idx = jax.lax.top_k(scores, K)[1].astype(jnp.int32)
      idx = jnp.where(jax.random.uniform(k2, (T, K)) < 0.1, -1, idx)
      probs = jnp.where(idx >= 0, jax.random.uniform(k4, (T, K)) + 0.1, 0.0)
      x = jax.random.normal(k3, (T, Hd), jnp.float32)
      cot = jax.random.normal(k5, (T, Hd), jnp.float32)
      outs = []
      for impl in IMPLS:
        recv_x, _, recv_probs, tpe, handle = jmd.fused_dispatch(
            x.astype(jnp.bfloat16), idx, probs, E, "ep", max_recv_tokens=max_recv,
            implementation=impl)
        y = jmd.fused_combine(recv_x, handle, "ep", implementation=impl)

        def loss(x, probs, impl=impl):
          # Linear in the ops' outputs: the gradients are the ops' own backward passes
          # (a cached dispatch and combines), with no XLA reduction of their own.
          rx, _, rp, _, h = jmd.fused_dispatch(x, idx, probs, E, "ep", implementation=impl)
          weight = (jnp.arange(rx.shape[0]) % 3 + 1).astype(rx.dtype)[:, None]
          cot_p = jax.random.normal(k6, rp.shape, rp.dtype)
          y = jmd.fused_combine(rx * weight, h, "ep", implementation=impl)
          return (y * cot).sum() + (rp * cot_p).sum()

        grads = jax.grad(loss, argnums=(0, 1))(x, probs)
        outs.append((recv_x, recv_probs, tpe, handle, y, grads))
      (a, b) = [jax.tree.leaves(o) for o in outs]
      mismatch = sum((_bits(u) != _bits(v)).sum() for u, v in zip(a, b))
      return bad + mismatch.astype(jnp.int32)

    zero = (me * 0).astype(jnp.int32)  # Varying over "ep", like the loop's result.
    return jax.lax.fori_loop(0, n, body, zero)[None]

  seeds = np.arange(ep, dtype=np.int32)[:, None] * 0 + 7
  start = time.perf_counter()
  bad = H.to_np(H.ep_map(per_rank, ep)(seeds))
  assert (bad == 0).all(), f"native differs from reference in {bad.tolist()} elements over {n} calls"
  assert time.perf_counter() - start < 240


def _one_gpu():
  """This machine's first GPU with a native buffer of its own (a group of one)."""
  if gpu_count() < 1:
    pytest.skip("needs a GPU")
  from jax_moe_dispatch.backends import native

  assert native.native_available(), native.native_unavailable_reason()
  gpu = jax.devices("gpu")[0]
  buffer.get_buffer([gpu], 256)
  return gpu, native.extension()


def _raw_combine(send_pos, rows, *, num_blocks=1, axis_index=None):
  """jmd_combine called directly, as any caller of the registered target could."""
  axis_index = jnp.zeros((1,), jnp.int32) if axis_index is None else axis_index
  send_pos = jnp.asarray(send_pos, jnp.int32)
  return jax.ffi.ffi_call(
      "jmd_combine", jax.ShapeDtypeStruct((send_pos.shape[0], rows.shape[1]), rows.dtype),
      has_side_effect=True)(axis_index, send_pos, jnp.zeros((1,), jnp.int32), rows,
                            num_blocks=np.int64(num_blocks))


def _raw_dispatch(x, *, num_payloads=1, num_blocks=1, max_recv=8):
  """jmd_dispatch called directly (one rank), every token sent to it."""
  T = x.shape[0]
  i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
  outs = [i32(T, 1), i32(1), i32(1), i32(max_recv), i32(1, T),
          jax.ShapeDtypeStruct((max_recv,) + x.shape[1:], x.dtype)]
  return jax.ffi.ffi_call("jmd_dispatch", outs, has_side_effect=True)(
      jnp.zeros((1,), jnp.int32), jnp.ones((T, 1), bool), x,
      num_payloads=np.int64(num_payloads), num_blocks=np.int64(num_blocks))


def test_handlers_refuse_bad_attributes_and_sizes():
  """The FFI targets check what any caller could pass them; a refused call changes nothing.

  Each bad call fails with InvalidArgument naming the value; afterwards a valid
  call on the same buffer still runs (the call counter did not move) and is exact.
  """
  gpu, _ = _one_gpu()
  rows = jax.device_put(jnp.asarray(H.rand(rng_for("raw"), (8, 8), np.float32)), gpu)
  send_pos = np.array([[0], [2], [-1], [7]], np.int32)
  bad = [
      (lambda: _raw_combine(send_pos, rows, num_blocks=0), "num_blocks must be in [1, 65536], got 0"),
      (lambda: _raw_combine(send_pos, rows, num_blocks=1 << 20), "got 1048576"),
      (lambda: _raw_combine(send_pos, rows, axis_index=jnp.zeros((2,), jnp.int32)),
       "axis_index must hold one int32, got 2"),
      (lambda: _raw_combine(send_pos, rows.astype(jnp.int32)), "combine rows must be float32"),
      (lambda: _raw_combine(np.zeros((4, 9), np.int32), rows), "R in [1, 8], got 9"),
      (lambda: _raw_dispatch(rows, num_payloads=-1), "num_payloads must be in [0, 1], got -1"),
      (lambda: _raw_dispatch(rows, num_payloads=2), "num_payloads must be in [0, 1], got 2"),
      (lambda: _raw_dispatch(rows, num_blocks=-3), "got -3"),
  ]
  for call, message in bad:
    with pytest.raises(Exception, match=re.escape(message)):
      jax.block_until_ready(jax.jit(call)())
  assert buffer.last_error() == ""
  out = np.asarray(jax.jit(lambda: _raw_combine(send_pos, rows))())
  want = np.stack([np.asarray(rows)[0], np.asarray(rows)[2], np.zeros(8, np.float32), np.asarray(rows)[7]])
  H.assert_bitwise(out, want, "combine after refused calls")
  received = jax.jit(lambda: _raw_dispatch(rows[:4], max_recv=6))()
  H.assert_bitwise(np.asarray(received[5])[:4], np.asarray(rows)[:4], "dispatch after refused calls")
  H.assert_bitwise(np.asarray(received[5])[4:], np.zeros((2, 8), np.float32), "dispatch padding")


def test_buffer_cycles_leave_memory_where_it_was():
  """100 x (get_buffer or init_hybrid_ep_buffer -> calls -> [reset] -> free_buffer): no leak.

  Device memory is read with cudaMemGetInfo (the extension's mem_info), which
  sees the native buffers (outside XLA's pool), and XLA's own bytes in use.
  """
  gpu, ext = _one_gpu()
  ordinal = int(gpu.local_hardware_id)
  rows = jax.device_put(jnp.asarray(H.rand(rng_for("leak"), (8, 8), np.float32)), gpu)
  send_pos = np.array([[0], [2], [-1], [7]], np.int32)
  combine = jax.jit(lambda r: _raw_combine(send_pos, r))
  dispatch = jax.jit(lambda r: _raw_dispatch(r, max_recv=8))

  def cycle(i):
    if i % 2:
      buffer.init_hybrid_ep_buffer([gpu], 128, 64)
    else:
      buffer.get_buffer([gpu], 256)
    jax.block_until_ready((combine(rows), dispatch(rows)))
    if i % 2:
      buffer.reset_hybrid_ep_buffer()
    buffer.free_buffer()
    assert not buffer.has_buffer()

  cycle(0)  # Warm-up: compiled, first allocations made.
  free0, used0 = ext.mem_info(ordinal)[0], (gpu.memory_stats() or {}).get("bytes_in_use")
  for i in range(100):
    cycle(i)
  free1, used1 = ext.mem_info(ordinal)[0], (gpu.memory_stats() or {}).get("bytes_in_use")
  assert free1 >= free0 - (2 << 20), f"cudaMemGetInfo free bytes: {free0} -> {free1}"
  if used0 is not None:
    assert used1 <= used0 + (1 << 20), f"XLA bytes_in_use: {used0} -> {used1}"
  buffer.get_buffer([gpu], 256)
  out = np.asarray(combine(rows))  # The buffer still works after the cycles.
  H.assert_bitwise(out[1], np.asarray(rows)[2], "combine after the cycles")


def test_peer_that_never_arrives_fails_fast():
  """Only GPU 0 of a two-GPU group calls combine: it gives up after the timeout, not a hang.

  The kernel records the diagnosis (which peer, which call) and the next call on
  that GPU fails with it as an XLA error.
  """
  if gpu_count() < 2:
    pytest.skip("needs 2 GPUs")
  script = textwrap.dedent("""
      import faulthandler, os, sys
      faulthandler.enable()
      import jax, jax.numpy as jnp, numpy as np
      from jax_moe_dispatch.backends import buffer, native
      gpus = jax.devices("gpu")[:2]
      buffer.get_buffer(gpus, 256, timeout_s=2.0)
      native.native_available()  # Registers the FFI targets.
      print("start", flush=True)
      def alone(rows):
          return jax.ffi.ffi_call("jmd_combine", jax.ShapeDtypeStruct((4, 8), jnp.float32),
                                  has_side_effect=True)(
              jnp.zeros((1,), jnp.int32), jnp.zeros((4, 2), jnp.int32), jnp.zeros((2,), jnp.int32),
              rows, num_blocks=np.int64(2))
      rows = jax.device_put(jnp.ones((8, 8), jnp.float32), gpus[0])
      jax.block_until_ready(jax.jit(alone)(rows))  # Gives up after timeout_s.
      print("first call returned; last_error:", buffer.last_error(), flush=True)
      try:
          jax.block_until_ready(jax.jit(alone)(rows))
      except Exception as e:
          print("XLA error:", str(e)[:600], flush=True)
          os._exit(3)
      print("no error", flush=True)
  """)
  start = time.perf_counter()
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # The parent holds most memory.
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                       env=env)
  elapsed = time.perf_counter() - start
  report = f"rc={out.returncode}\n" + out.stdout[-2000:] + out.stderr[-3000:]
  assert "no error" not in out.stdout, report
  assert "first call returned; last_error: GPU" in out.stdout and "timed out" in out.stdout, report
  assert "XLA error:" in out.stdout and "gave up" in out.stdout and "waiting for GPU" in out.stdout, report
  assert out.returncode == 3, report
  assert elapsed < 120, elapsed
