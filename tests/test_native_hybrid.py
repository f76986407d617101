"""The fused native HybridEP ops on GPUs: bit-identical to the reference backend and the oracle.

``hybrid_ep_dispatch`` / ``hybrid_ep_combine`` with ``implementation="native"``
run the fused kernels (rows written straight into their permuted rows, combine
summing straight out of them); ``"reference"`` runs dispatch + permute, the
specification. Every test compares every output, the handle and the
permutation, the combine and the gradients bit for bit, and checks against the
numpy float64 oracle. Skipped without GPUs; fails on GPUs when the extension
is missing. Multi-rank cases on one GPU: tests/multirank/worker.py.
"""

from __future__ import annotations


import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
from jax_moe_dispatch.testing import oracle
import pytest
from conftest import gpu_count

import jax_moe_dispatch as jmd

pytestmark = pytest.mark.gpu

IMPLS = ("native", "reference")


@pytest.fixture(params=[1, 2, 4, 8], ids=lambda n: f"ep{n}")
def ep(request):
  return H.native_group(request.param, gpu_count())


rng_for = H.rng_for


def routing(rng, ep, T, K, E, kind="random", masked=None):
  masked = ((1,) if T > 2 else ()) if masked is None else masked
  idx = oracle.random_topk(rng, ep, T, K, E, kind=kind, masked_rows=masked)
  probs = np.where(idx >= 0, rng.random(idx.shape) + 0.1, 0).astype(np.float32)
  return oracle.topk_to_map(idx, probs, E)


def both(fn, ep, *args):
  return H.both_impls(fn, ep, *args, impls=IMPLS)


assert_same = H.assert_same


def _inputs(rng, ep, T, Hd, dtype):
  x = H.rand(rng, (ep, T, Hd), np.float32) * rng.uniform(0.01, 100.0, (ep, T, 1))
  if dtype == "fp8":
    q, s = jax.vmap(jmd.quantize_fp8)(jnp.asarray(x.astype(np.float32)))
    return np.asarray(q), np.asarray(s)
  return x.astype(jnp.dtype(dtype)), None


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "fp8"])
@pytest.mark.parametrize("pad", [None, 16, 128])
@pytest.mark.parametrize("kind,bound", [("random", None), ("one_expert", None), ("random", "N"),
                                        ("random", "M"), ("masked", None)])
def test_hybrid_bitwise(ep, dtype, pad, kind, bound):
  """Outputs, handle, permutation and a weighted combine: native == reference == oracle."""
  T, K, L = 37, 4, 6
  E, Hd = ep * L, 256 if dtype == "fp8" else 136
  rng = rng_for(ep, dtype, pad, kind, bound)
  masked = tuple(range(T)) if kind == "masked" else None
  rmap, dprobs = routing(rng, ep, T, K, E, "random" if kind == "masked" else kind, masked)
  x, scales = _inputs(rng, ep, T, Hd, dtype)
  max_recv = 2 * T // 3 if bound == "M" else None
  num_rows = 3 * T // 2 if bound == "N" else None

  def fn(impl, x, scales, rmap, dprobs):
    px, pprobs, pscales, tpe, handle = jmd.hybrid_ep_dispatch(
        x, rmap, dprobs, L, "ep", scaling_factor=None if dtype != "fp8" else scales, topk=K,
        pad_multiple=pad, num_permuted_tokens=num_rows, max_recv_tokens=max_recv,
        implementation=impl)
    rows = px.astype(jnp.float32) if dtype == "fp8" else px
    y = jmd.hybrid_ep_combine(rows * pprobs[:, None].astype(rows.dtype), handle, "ep",
                              implementation=impl)
    return px, pprobs, pscales, tpe, handle, y

  out = both(fn, ep, x, scales if scales is not None else np.zeros((ep, T, 1), np.float32),
             rmap, dprobs)
  assert_same(out["native"], out["reference"], f"hybrid {dtype}")
  want = oracle.hybrid_dispatch(x, rmap, dprobs, L, max_recv=max_recv, num_rows=num_rows,
                                pad_multiple=pad or 1, topk=K, scales=scales)
  px, pprobs, pscales, tpe = out["native"][:4]
  H.assert_bitwise(px, want["permuted_x"], "permuted_x vs oracle")
  H.assert_bitwise(pprobs, want["permuted_probs"], "permuted_probs vs oracle")
  if dtype == "fp8":
    H.assert_bitwise(pscales, want["permuted_scales"], "permuted_scales vs oracle")
  H.assert_equal_int(tpe, want["tokens_per_expert"], "tokens_per_expert vs oracle")
  rows = px.astype(np.float64) * pprobs.astype(np.float64)[..., None]
  H.assert_close(out["native"][5], oracle.hybrid_combine(want, rows),
                 np.float32 if dtype == "fp8" else x.dtype, "combine vs oracle")


@pytest.mark.parametrize("pad", [None, 16])
def test_hybrid_gradients_equal_reference_and_oracle(ep, pad):
  T, K, L, Hd = 29, 3, 4, 40
  E = ep * L
  rng = rng_for("grad", ep, pad)
  rmap, dprobs = routing(rng, ep, T, K, E)
  x = H.rand(rng, (ep, T, Hd), np.float32).astype(jnp.bfloat16)
  g_x = H.rand(rng, (ep, T, Hd), np.float32)

  def fn(impl, x, rmap, dprobs, g_x):
    def loss(x, dprobs):
      px, pprobs, _, _, handle = jmd.hybrid_ep_dispatch(
          x, rmap, dprobs, L, "ep", topk=K, pad_multiple=pad, implementation=impl)
      y = jmd.hybrid_ep_combine(jnp.tanh(px) * pprobs[:, None].astype(px.dtype), handle, "ep",
                                implementation=impl)
      return (y.astype(jnp.float32) * g_x).sum()

    return jax.grad(loss, argnums=(0, 1))(x, dprobs)

  out = both(fn, ep, x, rmap, dprobs, g_x)
  assert_same(out["native"], out["reference"], "hybrid grads")


def test_hybrid_numeric_gradients(ep):
  """check_grads on the native ops in float32 (dispatch's and combine's VJPs, both orders)."""
  T, K, L, Hd = 11, 2, 2, 8
  E = ep * L
  rng = rng_for("numeric", ep)
  rmap, dprobs = routing(rng, ep, T, K, E)
  x = H.rand(rng, (ep, T, Hd), np.float32)

  def per_rank(x, rmap, dprobs):
    px, pprobs, _, _, handle = jmd.hybrid_ep_dispatch(x, rmap, dprobs, L, "ep", topk=K,
                                                      pad_multiple=4, implementation="native")
    return jmd.hybrid_ep_combine(jnp.sin(px) * pprobs[:, None], handle, "ep",
                                 implementation="native")

  run = H.ep_map(per_rank, ep)
  jax.test_util.check_grads(lambda x, p: run(x, rmap, p), (jnp.asarray(x), jnp.asarray(dprobs)),
                            order=1, modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-3)


def test_hybrid_combine_summation_order(ep):
  """Rows of very different magnitudes on several experts per rank: the order shows in the bits."""
  T, K, L, Hd = 16, 6, 8, 64
  E = ep * L
  rng = rng_for("order", ep)
  rmap, dprobs = routing(rng, ep, T, K, E, masked=())
  x = (H.rand(rng, (ep, T, Hd), np.float32) * 10.0 ** rng.integers(-4, 5, (ep, T, Hd)))

  def fn(impl, x, rmap, dprobs):
    px, pprobs, _, _, handle = jmd.hybrid_ep_dispatch(x, rmap, dprobs, L, "ep", topk=K,
                                                      implementation=impl)
    scale = (jnp.arange(px.shape[0], dtype=jnp.float32) % 7 - 3.0)[:, None] * 1e3 + 1.0
    return jmd.hybrid_ep_combine(px * scale, handle, "ep", implementation=impl)

  out = both(fn, ep, x, rmap, dprobs)
  H.assert_bitwise(out["native"], out["reference"], "combine native vs reference")
