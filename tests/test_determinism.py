"""Determinism: the same inputs give bit-identical outputs and gradients, run after run.

Each check runs one compiled function ``RUNS`` times, then once more through a
fresh ``jax.jit`` (a recompile), and compares every output and gradient
bitwise with the first run. On CPU: the reference backend's four ops and
their gradients at ep=4 (emulated devices), and ``grouped_matmul`` with
``implementation="xla"``; ``implementation="interpret"`` (the Hopper kernels
under Pallas's interpreter) is slow on CPU, so it gets ``INTERPRET_RUNS`` runs
on one small layout. The native backend's variant is ``gpu``-marked (ep=1,
one GPU).
"""

from __future__ import annotations

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gpu_count

from jax_moe_dispatch import (fused_combine, fused_dispatch, grouped_matmul, hybrid_ep_combine,
                              hybrid_ep_dispatch)
from jax_moe_dispatch.testing import oracle

RUNS = 20
INTERPRET_RUNS = 3
T, HID, K = 9, 12, 2


def assert_repeatable(make_fn, args, runs: int, what: str) -> None:
  """``make_fn()`` returns a fresh jitted function: ``runs`` calls and one recompile are bit-identical."""
  fn = make_fn()
  first = H.to_np(fn(*args))
  results = [H.to_np(fn(*args)) for _ in range(runs - 1)]
  results.append(H.to_np(make_fn()(*args)))  # A new jit: traced and compiled again.
  leaves = jax.tree.leaves(first)
  assert leaves, what
  for i, result in enumerate(results):
    for j, (got, want) in enumerate(zip(jax.tree.leaves(result), leaves, strict=True)):
      H.assert_bitwise(got, want, f"{what}: run {i + 2}, output {j}")


def moe_inputs(ep: int, num_local: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  E = ep * num_local
  idx = oracle.random_topk(rng, ep, T, K, E, masked_rows=(1,))
  tprobs = np.where(idx >= 0, rng.uniform(0.1, 1.0, idx.shape), 0).astype(np.float32)
  routing_map, probs = oracle.topk_to_map(idx, tprobs, E)
  x = H.rand(rng, (ep, T, HID), np.float32)
  w = H.rand(rng, (ep, HID), np.float32)  # An elementwise "expert", so gradients reach x.
  return x, idx, tprobs, routing_map, probs, w


def moe_step(implementation: str, num_experts: int, num_local: int):
  """Per rank: both protocols' dispatch and combine, and the gradients of a loss through them."""
  impl = dict(implementation=implementation)

  def loss(x, idx, tprobs, routing_map, probs, w):
    recv_x, _, rprobs, tpe, handle = fused_dispatch(x, idx, tprobs, num_experts, "ep", **impl)
    y = fused_combine(recv_x * w * rprobs.sum(-1, keepdims=True), handle, "ep", **impl)
    px, pp, _, htpe, hhandle = hybrid_ep_dispatch(x, routing_map, probs, num_local, "ep",
                                                  topk=K, pad_multiple=2, **impl)
    hy = hybrid_ep_combine(px * w * pp[:, None], hhandle, "ep", **impl)
    total = jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(hy) * x)
    return total, (recv_x, rprobs, tpe, y, px, pp, htpe, hy)

  def step(*args):
    (value, outs), grads = jax.value_and_grad(loss, argnums=(0, 2, 4, 5), has_aux=True)(*args)
    return value[None], outs, grads

  return step


def test_reference_ops_and_gradients_are_bitwise_repeatable():
  ep, num_local = 4, 2
  args = moe_inputs(ep, num_local)
  assert_repeatable(lambda: H.ep_map(moe_step("reference", ep * num_local, num_local), ep),
                    args, RUNS, "reference ops, ep=4")


@pytest.mark.gpu
def test_native_ops_and_gradients_are_bitwise_repeatable():
  if gpu_count() < 1:
    pytest.skip("needs a GPU")
  from jax_moe_dispatch.backends import buffer, native

  assert native.native_available(), native.native_unavailable_reason()
  buffer.get_buffer(H.mesh(1), 4096, axis_name="ep")
  num_local = 4
  args = moe_inputs(1, num_local)
  assert_repeatable(lambda: H.ep_map(moe_step("native", num_local, num_local), 1),
                    args, RUNS, "native ops, ep=1")


def gemm_step(sizes, implementation: str):
  group_sizes = jnp.asarray(sizes, jnp.int32)

  def step(x, w, dy):
    y, pullback = jax.vjp(lambda x, w: grouped_matmul(
        x, w, group_sizes, preferred_element_type=jnp.float32, implementation=implementation), x, w)
    return (y, *pullback(dy))

  return lambda: jax.jit(step)


def gemm_inputs(num_rows, sizes, k, m, dtype, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(H.rand(rng, (num_rows, k), np.float32), dtype)
  w = jnp.asarray(H.rand(rng, (len(sizes), k, m), np.float32) / np.sqrt(k), dtype)
  dy = jnp.asarray(H.rand(rng, (num_rows, m), np.float32))
  return x, w, dy


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_matmul_xla_is_bitwise_repeatable(dtype):
  sizes = [5, 0, 17, 9]
  args = gemm_inputs(40, sizes, 24, 16, jnp.dtype(dtype))
  assert_repeatable(gemm_step(sizes, "xla"), args, RUNS, f"grouped_matmul xla {dtype}")


def test_grouped_matmul_interpret_is_bitwise_repeatable():
  """The interpreted kernels: INTERPRET_RUNS runs (the interpreter is slow on CPU)."""
  sizes = [40, 0, 70, 17]
  args = gemm_inputs(128, sizes, 128, 128, jnp.bfloat16)
  assert_repeatable(gemm_step(sizes, "interpret"), args, INTERPRET_RUNS, "grouped_matmul interpret")
