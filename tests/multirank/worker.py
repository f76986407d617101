"""One rank of a multi-process test run, started by ``scripts/launch_ranks.py``.

Every process joins the ``jax.distributed`` job, builds the global mesh (one
device per process, axis ``"ep"``), makes the inputs of *all* ranks from a
seed, runs the ops for its own rank inside ``jit(shard_map(...))`` and checks
its rank's outputs against the NumPy oracle (:mod:`jax_moe_dispatch.testing.oracle`):
rows, routing metadata and handles bit for bit, combine sums bit for bit
against float32 sums in the documented order (ascending rank) wherever the
library fixes that order. No rank needs another rank's results, so no XLA
collective runs here unless the implementation itself uses one (the reference
backend on CPU does; the native backend on GPU does not, which is what lets N
processes share one GPU).

Before each case the ranks compile its programs, then meet (key-value store),
so that no rank's kernel waits for a peer that is still compiling. After each
case they swap their status; if any rank failed, the native buffers are reset
so that the next case starts in step.

Results: one JSON line per case in ``<out>/rank<i>.jsonl`` (written as soon as
the case ends); the process exits 0 if every case passed on it.

    python scripts/launch_ranks.py -n 4 --gpus 1 -- python tests/multirank/worker.py \
        --impl native --out /tmp/ranks
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pathlib
import sys
import time
import traceback
import zlib

ROOT = pathlib.Path(__file__).resolve().parents[2]

CASES = {
    # name: implementations it runs with.
    "dispatch_combine_bf16": ("native", "reference"),
    "dispatch_combine_f32": ("native", "reference"),
    "fp8": ("native", "reference"),
    "drop": ("native", "reference"),
    "skew": ("native", "reference"),
    "cached_and_grads": ("native", "reference"),
    "hybrid": ("native", "reference"),
    "many_calls": ("native", "reference"),
    "exchange_timeout": ("native", "reference"),
    "straggler": ("native",),
    "mismatch_ops": ("native",),
    "mismatch_shape": ("native",),
    "leak_cycles": ("native",),
    "example": ("native", "reference"),  # Runs XLA collectives: one GPU per process.
    "hybrid_fused": ("native", "reference"),
    "hybrid_grow": ("native",),
    "permute_fusion": ("native", "reference"),
    "dead_peer": ("native",),  # Last: one rank exits.
}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--impl", choices=("native", "reference"), required=True)
  p.add_argument("--cases", default="all", help="comma-separated case names, or 'all'")
  p.add_argument("--out", required=True, help="folder for rank<i>.jsonl")
  p.add_argument("--timeout", type=float, default=120.0,
                 help="native: how long a rank waits for a peer (get_buffer's timeout_s)")
  p.add_argument("--short-timeout", type=float, default=5.0,
                 help="native: the timeout in the straggler and dead-peer cases")
  p.add_argument("--calls", type=int, default=1000, help="many_calls: dispatch+combine pairs")
  p.add_argument("--chunk", type=int, default=50, help="many_calls: pairs per program run")
  p.add_argument("--calls-budget", type=float, default=120.0,
                 help="many_calls: seconds after which no further chunk starts")
  p.add_argument("--example-steps", type=int, default=2)
  p.add_argument("--leak-cycles", type=int, default=100,
                 help="leak_cycles: get_buffer -> dispatch+combine -> free_buffer cycles")
  args = p.parse_args(argv)
  names = list(CASES) if args.cases == "all" else args.cases.split(",")
  unknown = [c for c in names if c not in CASES]
  if unknown:
    p.error(f"unknown cases {unknown}; known: {list(CASES)}")
  args.cases = [c for c in names if args.impl in CASES[c]]
  return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.impl == "reference":
  # One CPU device per process, whatever the parent's XLA_FLAGS said.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "xla_force_host_platform_device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=1"])
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import jax_moe_dispatch as jmd  # noqa: E402
from jax_moe_dispatch.backends import buffer, default_num_sms, distributed, native  # noqa: E402
from jax_moe_dispatch.backends.base import DispatchHandle  # noqa: E402
from jax_moe_dispatch.testing import oracle  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)


# ----------------------------------------------------------------------------
# Checks.


def bits(a: np.ndarray) -> np.ndarray:
  a = np.ascontiguousarray(a)
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


class Checks:
  """Collects mismatches; :meth:`done` raises them all at once."""

  def __init__(self):
    self.failures: list[str] = []
    self.count = 0

  def _fail(self, what, got, want, bad):
    first = tuple(int(i) for i in bad[0])
    self.failures.append(f"{what}: {len(bad)} of {want.size} elements differ, first at {first}: "
                         f"got {got[first]!r}, want {want[first]!r}")

  def bitwise(self, what: str, got, want) -> None:
    got, want = np.asarray(got), np.asarray(want)
    self.count += 1
    if got.shape != want.shape or got.dtype != want.dtype:
      self.failures.append(
          f"{what}: {got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)}")
      return
    bad = np.argwhere(bits(got) != bits(want))
    if bad.size:
      self._fail(what, got, want, bad)

  def equal(self, what: str, got, want) -> None:
    """Integers, compared by value (dtypes may differ)."""
    got, want = np.asarray(got), np.asarray(want)
    self.count += 1
    if got.shape != want.shape:
      self.failures.append(f"{what}: shape {list(got.shape)} != {list(want.shape)}")
      return
    bad = np.argwhere(got != want)
    if bad.size:
      self._fail(what, got, want, bad)

  def close(self, what: str, got, want, *, rtol: float, atol: float) -> None:
    got, want = np.asarray(got).astype(np.float64), np.asarray(want, np.float64)
    self.count += 1
    if got.shape != want.shape:
      self.failures.append(f"{what}: shape {list(got.shape)} != {list(want.shape)}")
      return
    bad = np.argwhere(~np.isclose(got, want, rtol=rtol, atol=atol))
    if bad.size:
      self._fail(what, got, want, bad)

  def true(self, what: str, ok: bool) -> None:
    self.count += 1
    if not ok:
      self.failures.append(what)

  def done(self) -> dict:
    if self.failures:
      raise AssertionError("; ".join(self.failures))
    return {"checks": self.count}


def exact_combine(lay: oracle.Layout, rows: np.ndarray, dtype) -> np.ndarray:
  """``[R, M, ...]`` rows back to their sources as combine sums them, for all ranks.

  The library's contract: float32 accumulation over the ranks a token was kept
  at, in ascending rank order, starting from 0, rounded once to ``dtype``. The
  order and the float32 adds are fixed, so the result is exact (numpy float32
  adds are IEEE adds, as on the GPU).
  """
  rows = np.asarray(rows)
  out = np.zeros((lay.num_ranks, lay.num_tokens) + rows.shape[2:], np.float32)
  for d in range(lay.num_ranks):
    for s, row, tokens in lay.blocks(d):
      out[s, tokens] += rows[d, row:row + len(tokens)].astype(np.float32)
  return out.astype(dtype)


def rng_for(*salt) -> np.random.Generator:
  return np.random.default_rng(zlib.crc32(repr(salt).encode()))


def rand(rng, shape, dtype) -> np.ndarray:
  a = rng.normal(size=shape)
  return np.where(np.abs(a) < 0.05, 0.5, a).astype(dtype)  # Never exactly zero.


def routing(rng, ep, num_tokens, topk, num_experts, kind="random"):
  idx = oracle.random_topk(rng, ep, num_tokens, topk, num_experts, kind=kind, masked_rows=(1,))
  probs = np.where(idx >= 0, rng.random(idx.shape) + 0.1, 0).astype(np.float32)
  return idx, probs


# ----------------------------------------------------------------------------
# This process's rank.


class Rank:
  """This process's rank of the ``"ep"`` axis and how to run per-rank functions on it."""

  def __init__(self, args):
    self.args = args
    self.impl = args.impl
    self.mesh = Mesh(np.array(jax.devices()), ("ep",))
    self.ep = self.mesh.size
    self.device = jax.local_devices()[0]
    self.rank = list(self.mesh.devices.flat).index(self.device)
    self.names = [f"process {d.process_index}" for d in self.mesh.devices.flat]
    self.meetings = 0
    self.hidden_bytes = 4 * 256  # The widest rows the cases move: float32, 256 columns.
    self.max_tokens = 64

  def get_buffer(self, timeout_s: float) -> None:
    if self.impl == "native":
      buffer.get_buffer(self.mesh, self.hidden_bytes, max_num_tokens=self.max_tokens,
                        timeout_s=timeout_s)

  def meet(self, tag: str, status: str = "", ranks=None) -> list[str]:
    """Wait for ``ranks`` (default: all) and return their statuses (by rank)."""
    ranks = list(range(self.ep)) if ranks is None else list(ranks)
    self.meetings += 1
    out = distributed.exchange(f"multirank/{self.meetings}/{tag}", ranks.index(self.rank),
                               status.encode(), [self.names[r] for r in ranks],
                               timeout_s=max(300.0, self.args.timeout), what=tag)
    return [v.decode() for v in out]

  def put(self, a: np.ndarray) -> jax.Array:
    """``[R, ...]`` data of all ranks as a global array, this process holding its row."""
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, NamedSharding(self.mesh, P("ep")),
                                        lambda index: a[index])

  def program(self, fn, *inputs):
    """``fn`` per rank (leading ``[R]`` axis on inputs and outputs), compiled; returns a runner.

    The runner runs the compiled program and returns this rank's outputs as numpy.
    """
    def per_rank(*xs):
      out = fn(*jax.tree.map(lambda v: v[0], xs))
      return jax.tree.map(lambda v: v[None], out)

    arrays = [self.put(a) for a in inputs]
    compiled = jax.jit(jax.shard_map(per_rank, mesh=self.mesh, in_specs=P("ep"),
                                     out_specs=P("ep"))).lower(*arrays).compile()

    def run(*new_inputs):
      args = [self.put(a) for a in new_inputs] if new_inputs else arrays
      out = compiled(*args)
      return jax.tree.map(lambda o: np.asarray(o.addressable_shards[0].data)[0], out)

    return run


# ----------------------------------------------------------------------------
# Cases. Each returns a small dict of facts for the record or raises.


def _fused(ctx: Rank, dtype: str, kind: str = "random", max_recv=None) -> dict:
  ep, T, K = ctx.ep, 37, 4
  E, H = 4 * ep, (256 if dtype == "fp8" else 72)
  impl = ctx.impl
  rng = rng_for("fused", ep, dtype, kind, max_recv)
  idx, probs = routing(rng, ep, T, K, E, kind)
  x = rand(rng, (ep, T, H), np.float32)
  if dtype == "fp8":
    q, s = jax.vmap(jmd.quantize_fp8)(jnp.asarray(x))
    inputs = (np.asarray(q), np.asarray(s), idx, probs)
  else:
    inputs = (x.astype(BF16 if dtype == "bfloat16" else np.float32), idx, probs)
  m = max_recv or ep * T
  weight = (2.0 ** (np.arange(m) % 3))[:, None]  # Powers of two: exact in every dtype.

  def fn(*a):
    xs = (a[0], a[1]) if dtype == "fp8" else a[0]
    recv_x, recv_idx, recv_probs, tpe, handle = jmd.fused_dispatch(
        xs, a[-2], a[-1], E, "ep", max_recv_tokens=max_recv, implementation=impl)
    rows = recv_x[0].astype(jnp.float32) if dtype == "fp8" else recv_x
    y = jmd.fused_combine(rows * jnp.asarray(weight, rows.dtype), handle, "ep",
                          implementation=impl)
    return recv_x, recv_idx, recv_probs, tpe, handle, y

  run = ctx.program(fn, *inputs)
  ctx.meet("ready")
  recv_x, recv_idx, recv_probs, tpe, handle, y = run()

  r, c = ctx.rank, Checks()
  want = oracle.fused_dispatch(inputs[0], idx, probs, E, max_recv,
                               scales=inputs[1] if dtype == "fp8" else None)
  lay = want["layout"]
  if dtype == "fp8":
    c.bitwise("recv_x rows", recv_x[0], want["recv_x"][r])
    c.bitwise("recv_x scales", recv_x[1], want["recv_scales"][r])
    rows = want["recv_x"].astype(np.float32)
  else:
    c.bitwise("recv_x", recv_x, want["recv_x"][r])
    rows = want["recv_x"]
  c.equal("recv_token_indices", recv_idx, want["recv_idx"][r])
  c.bitwise("recv_token_probs", recv_probs, want["recv_probs"][r])
  c.equal("tokens_per_expert", tpe, want["tokens_per_expert"][r])
  c.equal("handle.send_pos", handle.send_pos, lay.send_pos[r])
  c.equal("handle.dest_offset", handle.dest_offset, lay.dest_offset[r])
  c.equal("handle.recv_count", handle.recv_count, lay.recv_count[r])
  c.equal("handle.recv_token", handle.recv_token, lay.recv_token[r])
  c.bitwise("combine", y, exact_combine(lay, rows * weight.astype(rows.dtype), rows.dtype)[r])
  return {**c.done(), "received": int(lay.recv_count[r].sum()), "dropped": len(lay.dropped)}


def case_dispatch_combine_bf16(ctx):
  return _fused(ctx, "bfloat16")


def case_dispatch_combine_f32(ctx):
  return _fused(ctx, "float32")


def case_fp8(ctx):
  return _fused(ctx, "fp8")


def case_drop(ctx):
  return _fused(ctx, "bfloat16", max_recv=9)


def case_skew(ctx):
  return _fused(ctx, "bfloat16", kind="one_expert")


def case_cached_and_grads(ctx):
  """Cached dispatch (combine's backward) and dispatch's backward (a combine of gradients)."""
  ep, T, K, H = ctx.ep, 23, 3, 40
  E, M = 2 * ep, ep * 23
  impl = ctx.impl
  rng = rng_for("cached", ep)
  idx, probs = routing(rng, ep, T, K, E)
  x = rand(rng, (ep, T, H), np.float32)
  g_y = rand(rng, (ep, T, H), np.float32)
  g_x = rand(rng, (ep, M, H), np.float32)
  g_p = rand(rng, (ep, M, K), np.float32)

  def fn(x, idx, probs, g_y, g_x, g_p):
    def dispatch(x, p):
      recv_x, _, recv_probs, _, handle = jmd.fused_dispatch(x, idx, p, E, "ep",
                                                            implementation=impl)
      return (recv_x, recv_probs), handle

    (recv_x, _), vjp_dispatch, handle = jax.vjp(dispatch, x, probs, has_aux=True)
    grad_x, grad_p = vjp_dispatch((g_x, g_p))
    _, vjp_combine = jax.vjp(
        lambda rows: jmd.fused_combine(rows, handle, "ep", implementation=impl), recv_x)
    (g_rows,) = vjp_combine(g_y)
    return g_rows, grad_x, grad_p

  run = ctx.program(fn, x, idx, probs, g_y, g_x, g_p)
  ctx.meet("ready")
  g_rows, grad_x, grad_p = run()

  r, c = ctx.rank, Checks()
  want = oracle.fused_dispatch(x, idx, probs, E)
  lay = want["layout"]
  c.bitwise("cached dispatch of the combine cotangent", g_rows, oracle.move(lay, g_y)[r])
  c.bitwise("grad x (combine of row gradients)", grad_x, exact_combine(lay, g_x, np.float32)[r])
  # One rank owns each (token, slot): its gradient arrives alone, so float64 is exact.
  _, want_p = oracle.fused_dispatch_vjp(lay, idx, E, g_x, g_p)
  c.bitwise("grad probs", grad_p, want_p.astype(np.float32)[r])
  return c.done()


def case_hybrid(ctx):
  """hybrid_ep_dispatch/combine with padding, and their gradients."""
  ep, T, K, L, H, pad = ctx.ep, 29, 3, 4, 40, 16
  E = ep * L
  impl = ctx.impl
  rng = rng_for("hybrid", ep)
  idx, probs = routing(rng, ep, T, K, E)
  rmap, dprobs = oracle.topk_to_map(idx, probs, E)
  x = rand(rng, (ep, T, H), np.float32).astype(BF16)

  def fn(x, rmap, dprobs):
    def loss(x, dprobs):
      px, pprobs, _, tpe, handle = jmd.hybrid_ep_dispatch(
          x, rmap, dprobs, L, "ep", topk=K, pad_multiple=pad, implementation=impl)
      y = jmd.hybrid_ep_combine(px * pprobs[:, None].astype(px.dtype), handle, "ep",
                                implementation=impl)
      return y.astype(jnp.float32).sum(), (px, pprobs, tpe, y)

    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, dprobs)
    return aux, grads

  run = ctx.program(fn, x, rmap, dprobs)
  ctx.meet("ready")
  (px, pprobs, tpe, y), (gx, gp) = run()

  r, c = ctx.rank, Checks()
  want = oracle.hybrid_dispatch(x, rmap, dprobs, L, pad_multiple=pad, topk=K)
  c.bitwise("permuted_x", px, want["permuted_x"][r])
  c.bitwise("permuted_probs", pprobs, want["permuted_probs"][r])
  c.equal("tokens_per_expert", tpe, want["tokens_per_expert"][r])
  weighted = want["permuted_x"].astype(np.float64) * want["permuted_probs"][..., None]
  c.close("combine", y, oracle.hybrid_combine(want, weighted)[r], rtol=2e-2, atol=2e-2)
  want_gx, want_gp = oracle.hybrid_dispatch_vjp(
      want, np.broadcast_to(want["permuted_probs"][..., None], want["permuted_x"].shape),
      want["permuted_x"].astype(np.float64).sum(-1))
  c.close("grad x", gx, want_gx[r], rtol=2e-2, atol=2e-2)
  c.close("grad probs", gp, want_gp[r], rtol=2e-2, atol=5e-2)
  return c.done()


def exact_hybrid_combine(h: dict, rows: np.ndarray, dtype) -> np.ndarray:
  """``[R, N, ...]`` permuted rows back to their tokens as hybrid combine sums them.

  The library's contract: per token, for each rank it went to in ascending
  order, the float32 sum (from 0) of its rows there in ascending local-expert
  order, added to the token's float32 total (from 0), rounded once to
  ``dtype``. numpy float32 adds are IEEE adds, so the result is exact.
  """
  lay, rows = h["layout"], np.asarray(rows)
  out = np.zeros((lay.num_ranks, lay.num_tokens) + rows.shape[2:], np.float32)
  for d, perm in enumerate(h["perms"]):
    part = np.zeros_like(out)
    perm_row = perm["perm_row"]
    for e in range(h["num_local"]):  # A token has at most one row per (rank, expert).
      i = np.flatnonzero(perm_row[:, e] >= 0)
      part[lay.recv_rank[d, i], lay.recv_token[d, i]] += rows[d, perm_row[i, e]].astype(np.float32)
    out += part
  return out.astype(dtype)


# (dtype, pad_multiple, routing, bound): skew, all rows masked, pads, drops at N and at M.
HYBRID_VARIANTS = [("bfloat16", None, "random", None), ("bfloat16", 16, "one_expert", None),
                   ("float32", 128, "masked", None), ("bfloat16", 16, "random", "N"),
                   ("fp8", 16, "random", "M")]


def case_hybrid_fused(ctx):
  """hybrid_ep_dispatch/combine (fused kernels on native) over edge cases, bits vs the oracle."""
  ep, T, K, L = ctx.ep, 29, 3, 4
  E, impl, r, c = ep * L, ctx.impl, ctx.rank, Checks()
  for dtype, pad, kind, bound in HYBRID_VARIANTS:
    what = f"{dtype}/pad{pad}/{kind}/{bound}"
    hidden = {"bfloat16": 48, "float32": 32, "fp8": 256}[dtype]
    rng = rng_for("hybrid_fused", ep, what)
    idx = oracle.random_topk(rng, ep, T, K, E, kind="random" if kind == "masked" else kind,
                             masked_rows=tuple(range(T)) if kind == "masked" else (1,))
    probs = np.where(idx >= 0, rng.random(idx.shape) + 0.1, 0).astype(np.float32)
    rmap, dprobs = oracle.topk_to_map(idx, probs, E)
    x = rand(rng, (ep, T, hidden), np.float32)
    scales = np.ones((ep, T, 1), np.float32)
    if dtype == "fp8":
      q, s = jax.vmap(jmd.quantize_fp8)(jnp.asarray(x))
      x, scales = np.asarray(q), np.asarray(s)
    else:
      x = x.astype(BF16 if dtype == "bfloat16" else np.float32)
    g_y = rand(rng, (ep, T, hidden), np.float32)
    max_recv = ep * T // 2 if bound == "M" else None
    num_rows = ep * T // 2 if bound == "N" else None

    def fn(x, scales, rmap, dprobs, g_y):
      def loss(x, dprobs):
        px, pprobs, pscales, tpe, handle = jmd.hybrid_ep_dispatch(
            x, rmap, dprobs, L, "ep", scaling_factor=scales if dtype == "fp8" else None, topk=K,
            pad_multiple=pad, num_permuted_tokens=num_rows, max_recv_tokens=max_recv,
            implementation=impl)
        rows = px.astype(jnp.bfloat16) if dtype == "fp8" else px
        y = jmd.hybrid_ep_combine(rows * pprobs[:, None].astype(rows.dtype), handle, "ep",
                                  implementation=impl)
        return (y.astype(jnp.float32) * g_y).sum(), (px, pprobs, pscales, tpe, y)

      if dtype == "fp8":  # No gradient through FP8 rows: probabilities only.
        (_, aux), gp = jax.value_and_grad(lambda p: loss(x, p), has_aux=True)(dprobs)
        return aux, (jnp.zeros(()), gp)
      (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, dprobs)
      return aux, grads

    run = ctx.program(fn, x, scales, rmap, dprobs, g_y)
    ctx.meet(f"ready {what}")
    (px, pprobs, pscales, tpe, y), (gx, gp) = run()
    want = oracle.hybrid_dispatch(x, rmap, dprobs, L, max_recv=max_recv, num_rows=num_rows,
                                  pad_multiple=pad or 1, topk=K,
                                  scales=scales if dtype == "fp8" else None)
    c.bitwise(f"{what} permuted_x", px, want["permuted_x"][r])
    c.bitwise(f"{what} permuted_probs", pprobs, want["permuted_probs"][r])
    c.equal(f"{what} tokens_per_expert", tpe, want["tokens_per_expert"][r])
    if dtype == "fp8":
      c.bitwise(f"{what} permuted_scales", pscales, want["permuted_scales"][r])
    rows = want["permuted_x"].astype(BF16 if dtype == "fp8" else want["permuted_x"].dtype)
    weighted = rows * want["permuted_probs"][..., None].astype(rows.dtype)
    c.bitwise(f"{what} combine", y, exact_hybrid_combine(want, weighted, rows.dtype)[r])
    # The cotangent reaches the rows in their dtype; the probabilities' gradient is a
    # dot over H in that dtype: checked against 2% of the sum of its terms' magnitudes.
    g_perm = oracle.hybrid_combine_vjp(want, g_y.astype(rows.dtype)).astype(np.float64)
    px64 = want["permuted_x"].astype(np.float64)
    want_gx, want_gp = oracle.hybrid_dispatch_vjp(
        want, g_perm * want["permuted_probs"][..., None], (g_perm * px64).sum(-1))
    _, bound = oracle.hybrid_dispatch_vjp(want, np.zeros_like(g_perm), np.abs(g_perm * px64).sum(-1))
    if dtype != "fp8":
      c.close(f"{what} grad x", gx, want_gx[r], rtol=2e-2, atol=2e-2)
    err = np.abs(np.asarray(gp, np.float64) - want_gp[r])
    c.true(f"{what} grad probs within 2% of its terms (max excess "
           f"{(err - 2e-2 * bound[r] - 1e-6).max():.3g})", bool((err <= 2e-2 * bound[r] + 1e-6).all()))
  return c.done()


def case_many_calls(ctx):
  """Many dispatch+combine pairs with fresh routing each, checked in the program.

  Every rank draws every rank's routing and rows for each call (from the seed,
  the call index and the rank), so it knows what it must receive: the rows
  routed to it, rank-major. Its combine of the received rows must give each
  token times the number of ranks it went to (exact in float32). Runs in
  chunks until ``--calls`` pairs or ``--calls-budget`` seconds (rank 0
  decides, so all ranks run the same chunks).
  """
  ep, T, K, H = ctx.ep, 64, 4, 128
  E, L = 4 * ep, 4
  impl, chunk = ctx.impl, ctx.args.chunk

  def fn(start):
    me = jax.lax.axis_index("ep")

    def draw(call, s):
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), call), s)
      k1, k2, k3 = jax.random.split(key, 3)
      idx = jax.lax.top_k(jax.random.uniform(k1, (T, E)), K)[1].astype(jnp.int32)
      idx = jnp.where(jax.random.uniform(k2, (T, K)) < 0.1, -1, idx)
      return idx, jax.random.normal(k3, (T, H), jnp.float32).astype(jnp.bfloat16)

    def body(i, bad):
      call = start[0] + i
      idx_all, x_all = jax.vmap(lambda s: draw(call, s))(jnp.arange(ep))
      idx, x = idx_all[me], x_all[me]
      probs = jnp.where(idx >= 0, 0.5, 0.0)
      recv_x, _, _, _, handle = jmd.fused_dispatch(x, idx, probs, E, "ep", implementation=impl)
      y = jmd.fused_combine(recv_x, handle, "ep", implementation=impl)
      owner = jnp.where(idx_all >= 0, idx_all // L, -1)  # [R, T, K]
      to_me = (owner == me).any(-1).reshape(-1)  # [R * T], rank-major.
      row = jnp.where(to_me, jnp.cumsum(to_me) - 1, ep * T)
      want = jnp.zeros((ep * T, H), jnp.bfloat16).at[row].set(x_all.reshape(-1, H), mode="drop")
      reach = (owner[me][:, :, None] == jnp.arange(ep)).any(1).sum(-1)  # [T]
      want_y = (x.astype(jnp.float32) * reach[:, None]).astype(jnp.bfloat16)
      wrong = ((recv_x != want).sum() + (y != want_y).sum()
               + (handle.recv_count.sum() != to_me.sum()))
      return bad + wrong.astype(jnp.int32)

    zero = (me * 0).astype(jnp.int32)  # Varying over "ep", like the loop's result.
    return jax.lax.fori_loop(0, chunk, body, zero)

  starts = np.zeros((ep, 1), np.int32)
  run = ctx.program(fn, starts)
  ctx.meet("ready")
  began, calls, bad = time.monotonic(), 0, 0
  while calls < ctx.args.calls:
    bad += int(run(starts + calls))
    calls += chunk
    go = "go" if time.monotonic() - began < ctx.args.calls_budget else "stop"
    if ctx.meet("chunk", go if ctx.rank == 0 else "")[0] != "go":
      break
  seconds = time.monotonic() - began
  c = Checks()
  c.true(f"{bad} wrong elements over {calls} dispatch+combine pairs", bad == 0)
  return {**c.done(), "calls": calls, "us_per_pair": round(1e6 * seconds / calls, 1)}


def case_exchange_timeout(ctx):
  """A rank never reaches a key-value exchange (as in get_buffer): the others fail in bounded time.

  Their error names it.
  """
  victim, wait = ctx.ep - 1, 2.0
  c = Checks()
  if ctx.rank != victim:
    began = time.monotonic()
    try:
      distributed.barrier(f"multirank/{ctx.meetings}/never", ctx.rank, ctx.names, timeout_s=wait,
                          what="the test's barrier")
      raised = ""
    except TimeoutError as e:
      raised = str(e)
    waited = time.monotonic() - began
    c.true(f"the error names the missing rank: {raised!r}",
           f"{ctx.names[victim]} did not reach the test's barrier within {wait:g} s" in raised)
    c.true(f"it took {waited:.1f} s", waited < wait + 30)
  return c.done()


def _small_tokens(ctx, T: int, *salt):
  """Small bf16 tokens for the failure cases: ``(E, idx, probs, x, rng)`` with E = 2 ep, top-2,
  hidden 64, ``T`` tokens per rank, drawn from ``rng_for(*salt, ep)``."""
  ep, K, H = ctx.ep, 2, 64
  E = 2 * ep
  rng = rng_for(*salt, ep)
  idx, probs = routing(rng, ep, T, K, E)
  return E, idx, probs, rand(rng, (ep, T, H), np.float32).astype(BF16), rng


def _timeout_program(ctx):
  """A fresh dispatch + combine (bf16), compiled; returns (runner, check of its outputs)."""
  E, idx, probs, x, _ = _small_tokens(ctx, 16, "timeout")

  def fn(x, idx, probs):
    recv_x, _, _, _, handle = jmd.fused_dispatch(x, idx, probs, E, "ep", implementation="native")
    return recv_x, jmd.fused_combine(recv_x, handle, "ep", implementation="native")

  def check(c: Checks, out):
    want = oracle.fused_dispatch(x, idx, probs, E)
    c.bitwise("recv_x", out[0], want["recv_x"][ctx.rank])
    c.bitwise("combine", out[1], exact_combine(want["layout"], want["recv_x"], BF16)[ctx.rank])

  return ctx.program(fn, x, idx, probs), check


def _fail_twice(run) -> tuple[float, str, str]:
  """Run a call that gives up (its results are invalid), then the next one, which must fail.

  Returns ``(seconds the first call took, last_error() after it, the second call's
  error message or "")``.
  """
  began = time.monotonic()
  run()
  took = time.monotonic() - began
  recorded = buffer.last_error()
  try:
    run()
    raised = ""
  except Exception as e:  # noqa: BLE001 - XLA reports the handler's error as a runtime error.
    raised = str(e)
  return took, recorded, raised


def _survive(ctx, victim: int, c: Checks, run) -> dict:
  """As a rank whose peer ``victim`` never arrives: a bounded failure that names it."""
  short = ctx.args.short_timeout
  gave_up, recorded, raised = _fail_twice(run)
  process = ctx.mesh.devices.flat[victim].process_index
  who = f"waiting for process {process} (group position {victim})"
  c.true(f"the call gave up after {gave_up:.1f} s, not within {short:g} s + 60 s",
         gave_up < short + 60)
  c.true(f"last_error() names the missing rank: {recorded!r}",
         "timed out" in recorded and who in recorded)
  c.true(f"the next call fails naming it: {raised[:800]!r}", "gave up" in raised and who in raised)
  return {"gave_up_s": round(gave_up, 2)}


def case_straggler(ctx):
  """The last rank skips one call: the others fail in bounded time, naming it.

  After a reset, every rank runs the call again, correctly.
  """
  victim = ctx.ep - 1
  run, check = _timeout_program(ctx)
  ctx.get_buffer(ctx.args.short_timeout)  # Same group: only the timeout changes.
  ctx.meet("ready")
  c, info = Checks(), {}
  if ctx.rank != victim:
    info = _survive(ctx, victim, c, run)
  ctx.meet("survived")
  buffer.reset_hybrid_ep_buffer()
  ctx.get_buffer(ctx.args.timeout)
  ctx.meet("reset")
  check(c, run())
  return {**c.done(), **info}


def _mismatched(ctx, run, words) -> dict:
  """Run a call that does not match the peers' (another op or shape); then reset and recover.

  The call must end on every rank within the (short) timeout with a signature
  mismatch that names both calls (``words``: substrings of the message); the next
  call must fail with it; after a reset of every process, a correct call runs.
  """
  short = ctx.args.short_timeout
  right, check = _timeout_program(ctx)
  ctx.get_buffer(short)  # Same group: only the timeout changes.
  ctx.meet("ready")
  c = Checks()
  ended, recorded, raised = _fail_twice(run)
  c.true(f"the call ended after {ended:.1f} s, not within the timeout {short:g} s + 30 s",
         ended < short + 30)
  c.true(f"last_error() names both calls {words}: {recorded!r}",
         all(w in recorded for w in words))
  c.true(f"the next call fails naming them: {raised[:800]!r}",
         "gave up" in raised and all(w in raised for w in words))
  ctx.meet("mismatched")
  buffer.reset_hybrid_ep_buffer()
  ctx.get_buffer(ctx.args.timeout)
  ctx.meet("reset")
  check(c, right())
  return {**c.done(), "ended_s": round(ended, 2)}


def _by_rank(first, others):
  """``first()`` on rank 0 and ``others()`` elsewhere, chosen at run time inside ONE program.

  Every process compiles the same program (as in SPMD training, where ranks can only
  diverge at run time, e.g. through a rank-dependent ``lax.cond``); both branches
  return a float32 scalar.
  """
  return jax.lax.cond(jax.lax.axis_index("ep") == 0, first, others)


def case_mismatch_ops(ctx):
  """One program in which rank 0 runs a dispatch while the others run a combine."""
  E, idx, probs, x, rng = _small_tokens(ctx, 16, "mismatch_ops")
  lay = oracle.fused_dispatch(x, idx, probs, E)["layout"]
  rows = rand(rng, (ctx.ep, lay.max_recv, x.shape[-1]), np.float32).astype(BF16)
  backend = native.NativeBackend(default_num_sms("deepep"))

  def fn(x, idx, probs, rows, send_pos, dest_offset, recv_count, recv_token):
    def dispatch():
      recv = jmd.fused_dispatch(x, idx, probs, E, "ep", implementation="native")[0]
      return jnp.sum(recv.astype(jnp.float32))

    def combine():
      handle = DispatchHandle(send_pos, dest_offset, recv_count, recv_token)
      return jnp.sum(backend.combine(rows, handle, axis_name="ep").astype(jnp.float32))

    return _by_rank(dispatch, combine)

  run = ctx.program(fn, x, idx, probs, rows, lay.send_pos.astype(np.int32),
                    lay.dest_offset.astype(np.int32), lay.recv_count.astype(np.int32),
                    lay.recv_token.astype(np.int32))
  return _mismatched(ctx, run, ["ran dispatch(", "ran combine("])


def case_mismatch_shape(ctx):
  """One program in which every rank runs dispatch + combine, rank 0 on 16 tokens, the others 24."""
  E, idx, probs, x, _ = _small_tokens(ctx, 24, "mismatch_shape")

  def fn(x, idx, probs):
    def both(n):
      def run():
        recv_x, _, _, _, handle = jmd.fused_dispatch(x[:n], idx[:n], probs[:n], E, "ep",
                                                     implementation="native")
        out = jmd.fused_combine(recv_x, handle, "ep", implementation="native")
        return jnp.sum(out.astype(jnp.float32))
      return run

    return _by_rank(both(16), both(24))

  run = ctx.program(fn, x, idx, probs)
  return _mismatched(ctx, run, ["dispatch(T=16", "dispatch(T=24"])


def case_leak_cycles(ctx):
  """get_buffer -> dispatch+combine -> free_buffer, many times: device memory stays put.

  Every other cycle sets up through init_hybrid_ep_buffer and resets before
  freeing. Each rank's staging buffer is several MiB here, so one left behind
  per cycle would show in cudaMemGetInfo (the whole GPU's, measured when every
  rank has freed) and in XLA's bytes in use.
  """
  run, check = _timeout_program(ctx)
  ext = native.extension()
  ordinal = int(ctx.device.local_hardware_id)
  hidden_bytes = 64 * 1024

  def cycle(i):
    if i % 2:  # Two local experts: more staging than the get_buffer below asks for.
      buffer.init_hybrid_ep_buffer(ctx.mesh, hidden_bytes // 2, ctx.max_tokens, 2)
      buffer.get_buffer(ctx.mesh, hidden_bytes, max_num_tokens=ctx.max_tokens,
                        timeout_s=ctx.args.timeout)  # Same buffer: only the timeout changes.
    else:
      buffer.get_buffer(ctx.mesh, hidden_bytes, max_num_tokens=ctx.max_tokens,
                        timeout_s=ctx.args.timeout)
    out = run()
    if i % 2:
      buffer.reset_hybrid_ep_buffer()
    buffer.free_buffer()
    return out

  def measure(tag):
    ctx.meet(f"{tag}/freed")  # Every rank freed: the GPU-wide numbers are comparable.
    stats = ctx.device.memory_stats() or {}
    free = ext.mem_info(ordinal)[0]
    ctx.meet(f"{tag}/measured")
    return free, stats.get("bytes_in_use")

  buffer.free_buffer()
  ctx.meet("ready")
  cycle(0)  # Warm-up: compiled, first allocations made.
  free0, used0 = measure("before")
  began = time.monotonic()
  for i in range(ctx.args.leak_cycles):
    out = cycle(i)
  seconds = time.monotonic() - began
  free1, used1 = measure("after")
  c = Checks()
  check(c, out)
  slack = 8 << 20
  c.true(f"cudaMemGetInfo free bytes went from {free0} to {free1} over {ctx.args.leak_cycles} "
         f"cycles (more than {slack} lost)", free1 >= free0 - slack)
  if used0 is not None:
    c.true(f"XLA bytes_in_use went from {used0} to {used1}", used1 <= used0 + (1 << 20))
  ctx.get_buffer(ctx.args.timeout)
  return {**c.done(), "cycles": ctx.args.leak_cycles, "free_delta": int(free1) - int(free0),
          "s_per_cycle": round(seconds / max(1, ctx.args.leak_cycles), 3)}


class _Warnings(logging.Handler):
  """The library's warnings while in a ``with`` block (messages in :attr:`messages`)."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages: list[str] = []

  def emit(self, record):
    self.messages.append(record.getMessage())

  def __enter__(self):
    logging.getLogger("jax_moe_dispatch").addHandler(self)
    return self

  def __exit__(self, *exc):
    logging.getLogger("jax_moe_dispatch").removeHandler(self)


def case_hybrid_grow(ctx):
  """init_hybrid_ep_buffer for T/2 tokens, then a hybrid round trip of T: the staging grows once.

  The growth happens while the program is traced (one warning, naming the old
  and new sizes); the outputs equal the oracle's (the reference backend's
  bits), the gradients its float64 values; a second program of the same sizes
  grows nothing and gives the same bits. Then growth is repeated through
  ``reserve_staging`` itself: cudaMemGetInfo (the GPU's, every rank at the same
  point) drops by the growth alone, so each growth freed the staging it
  replaced.
  """
  ep, T, K, L, H, pad = ctx.ep, 48, 3, 4, 256, 16
  E, impl, r, c = ep * L, ctx.impl, ctx.rank, Checks()
  rng = rng_for("hybrid_grow", ep)
  idx, probs = routing(rng, ep, T, K, E)
  rmap, dprobs = oracle.topk_to_map(idx, probs, E)
  x = rand(rng, (ep, T, H), np.float32).astype(BF16)
  g_y = rand(rng, (ep, T, H), np.float32)
  buffer.free_buffer()
  small = buffer.init_hybrid_ep_buffer(ctx.mesh, H, T // 2, L, topk=K, pad_multiple=pad,
                                       timeout_s=ctx.args.timeout).staging_bytes

  def fn(x, rmap, dprobs, g_y):
    def loss(x, dprobs):
      px, pprobs, _, tpe, handle = jmd.hybrid_ep_dispatch(
          x, rmap, dprobs, L, "ep", topk=K, pad_multiple=pad, implementation=impl)
      y = jmd.hybrid_ep_combine(px * pprobs[:, None].astype(px.dtype), handle, "ep",
                                implementation=impl)
      return (y.astype(jnp.float32) * g_y).sum(), (px, pprobs, tpe, y)

    (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, dprobs)
    return aux, grads

  with _Warnings() as grew:
    run = ctx.program(fn, x, rmap, dprobs, g_y)
  grown = buffer._buffer.staging_bytes
  with _Warnings() as again:
    run_again = ctx.program(fn, x, rmap, dprobs, g_y)
  c.true(f"one warning while tracing, naming {small} -> {grown} bytes: {grew.messages}",
         len(grew.messages) == 1 and f"from {small} to {grown} bytes" in grew.messages[0]
         and grown > small)
  c.true(f"no warning tracing the same sizes again: {again.messages}", not again.messages)
  ctx.meet("ready")
  (px, pprobs, tpe, y), (gx, gp) = run()
  second = run_again()

  want = oracle.hybrid_dispatch(x, rmap, dprobs, L, pad_multiple=pad, topk=K)
  c.bitwise("permuted_x", px, want["permuted_x"][r])
  c.bitwise("permuted_probs", pprobs, want["permuted_probs"][r])
  c.equal("tokens_per_expert", tpe, want["tokens_per_expert"][r])
  weighted = want["permuted_x"] * want["permuted_probs"][..., None].astype(BF16)
  c.bitwise("combine", y, exact_hybrid_combine(want, weighted, BF16)[r])
  g_perm = oracle.hybrid_combine_vjp(want, g_y.astype(BF16)).astype(np.float64)
  px64 = want["permuted_x"].astype(np.float64)
  want_gx, want_gp = oracle.hybrid_dispatch_vjp(
      want, g_perm * want["permuted_probs"][..., None], (g_perm * px64).sum(-1))
  c.close("grad x", gx, want_gx[r], rtol=2e-2, atol=2e-2)
  # A dot over H in bf16: within 2% of the sum of its terms' magnitudes (as in hybrid_fused).
  _, bound = oracle.hybrid_dispatch_vjp(want, np.zeros_like(g_perm),
                                        np.abs(g_perm * px64).sum(-1))
  err = np.abs(np.asarray(gp, np.float64) - want_gp[r])
  excess = err - 2e-2 * bound[r] - 1e-6
  c.true(f"grad probs within 2% of its terms (max excess {excess.max():.3g})",
         bool((excess <= 0).all()))
  for name, a, b in zip(("permuted_x", "permuted_probs", "tokens_per_expert", "combine",
                         "grad x", "grad probs"),
                        (px, pprobs, tpe, y, gx, gp), jax.tree.leaves(second)):
    c.bitwise(f"second program: {name}", b, a)

  # Growth frees what it replaces: four more growths of 16 MiB each.
  ext, ordinal = native.extension(), int(ctx.device.local_hardware_id)
  where = ctx.meet("gpu", f"{distributed.node_id()}/{ordinal}")
  sharing = where.count(where[r])  # Ranks on this GPU, all measured at the same points.

  def free_bytes(tag):
    ctx.meet(f"{tag}/before")
    free = ext.mem_info(ordinal)[0]
    ctx.meet(f"{tag}/measured")
    return free

  step, steps = 16 << 20, 4
  free0 = free_bytes("grown")
  for i in range(1, steps + 1):
    buffer.reserve_staging(grown + i * step, "test growth")
  free1 = free_bytes("regrown")
  added, slack = sharing * steps * step, sharing * (4 << 20) + (8 << 20)
  c.true(f"cudaMemGetInfo free bytes went from {free0} to {free1}: {free0 - free1} used by "
         f"{steps} growths of {step} bytes on {sharing} ranks, not {added} +- {slack}",
         abs((free0 - free1) - added) <= slack)
  buffer.free_buffer()
  ctx.get_buffer(ctx.args.timeout)
  return {**c.done(), "staging": [small, grown], "used_by_growths": int(free0) - int(free1)}


def case_permute_fusion(ctx):
  """The deepep dispatcher with moe_permute_fusion (on native: jmd_permute / jmd_unpermute) and
  without: every output (rows, group sizes, probabilities, combined tokens) and the gradients
  of the rows and probabilities, bit for bit."""
  ep, T, K, H = ctx.ep, 37, 4, 72
  E = 4 * ep
  rng = rng_for("permute_fusion", ep)
  idx, probs = routing(rng, ep, T, K, E)
  x = rand(rng, (ep, T, H), BF16)
  w = rand(rng, (ep, T, H), np.float32)
  outs = {}
  for fusion in (False, True):
    cfg = jmd.TokenDispatcherConfig(num_moe_experts=E, moe_router_topk=K, implementation=ctx.impl,
                                    moe_permute_fusion=fusion, moe_router_expert_pad_multiple=16)

    def fn(x, idx, probs, w, cfg=cfg):
      def loss(x, probs):
        d = jmd.MoEFlexTokenDispatcher(cfg)
        px, tpe, pp, state = d.token_permutation2(x, token_probs=probs, token_indices=idx)
        y = d.token_unpermutation(jnp.tanh(px) * pp[:, None].astype(px.dtype), state)
        return jnp.sum(y.astype(jnp.float32) * w), (px, tpe, pp, y)

      (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, probs)
      return aux, grads

    run = ctx.program(fn, x, idx, probs, w)
    ctx.meet(f"ready/{fusion}")
    outs[fusion] = run()
  c = Checks()
  names = ("permuted rows", "tokens_per_expert", "permuted probs", "combined", "grad rows",
           "grad probs")
  for name, on, off in zip(names, jax.tree.leaves(outs[True]), jax.tree.leaves(outs[False])):
    c.bitwise(f"{name}: fusion on vs off", on, off)
  c.true("combined tokens are not all zero", bool(np.any(jax.tree.leaves(outs[True])[3] != 0)))
  return c.done()


def case_dead_peer(ctx):
  """The last rank's process exits: the others fail in bounded time naming it (last case)."""
  victim = ctx.ep - 1
  run, _ = _timeout_program(ctx)
  ctx.get_buffer(ctx.args.short_timeout)
  ctx.meet("ready")
  if ctx.rank == victim:
    return {"exits": True}
  c = Checks()
  info = _survive(ctx, victim, c, run)
  return {**c.done(), **info}


def example_argv(implementation: str) -> list[str]:
  """The example's flags: small, SGD (parameter differences are gradient differences).

  The test runs the same steps in one process to compare.
  """
  return ["--optimizer", "sgd", "--lr", "0.1", "--implementation", implementation, "--layers",
          "1", "--hidden", "32", "--ffn", "64", "--tokens", "32", "--quiet"]


def case_example(ctx):
  """examples/train_moe.py's training step over the processes (its gradient all-reduce included)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("train_moe", ROOT / "examples" / "train_moe.py")
  example = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(example)
  args = example.parse_args(example_argv(ctx.impl))
  _, _, params, opt_state, step = example.build(args, list(ctx.mesh.devices.flat))
  ctx.meet("ready")
  losses = []
  for i in range(ctx.args.example_steps):
    params, opt_state, loss = step(params, opt_state, jnp.int32(i))
    losses.append(float(loss).hex())
  return {"losses": losses, "params_sha256": shard_digest(params, ctx.device)}


def shard_digest(params, device) -> str:
  """sha256 over ``device``'s shard of every leaf (so processes can compare with one process)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    (shard,) = [s for s in leaf.addressable_shards if s.device == device]
    h.update(np.ascontiguousarray(np.asarray(shard.data)).tobytes())
  return h.hexdigest()


# ----------------------------------------------------------------------------


def main(args) -> int:
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.impl == "reference":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  distributed.initialize_from_launcher(initialization_timeout=120)
  jax.config.update("jax_default_matmul_precision", "highest")
  ctx = Rank(args)
  results = out / f"rank{ctx.rank}.jsonl"
  print(f"rank {ctx.rank} of {ctx.ep} on {ctx.device} (process {jax.process_index()}); "
        f"cases {args.cases}", flush=True)
  ctx.get_buffer(args.timeout)
  all_ok, alive = True, list(range(ctx.ep))
  for name in args.cases:
    print(f"=== {name}", flush=True)
    began = time.monotonic()
    try:
      info, error = globals()[f"case_{name}"](ctx), ""
    except Exception as e:  # noqa: BLE001 - reported per case.
      info, error = {}, f"{type(e).__name__}: {e}"
      traceback.print_exc()
    record = {"case": name, "rank": ctx.rank, "ok": not error, "error": error[:4000],
              "seconds": round(time.monotonic() - began, 2), **info}
    with open(results, "a") as f:
      f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    all_ok &= not error
    if name == "dead_peer":
      alive.remove(ctx.ep - 1)
      if ctx.rank not in alive:
        os._exit(0)  # The dead peer: no clean shutdown, as in a crash.
      continue
    statuses = ctx.meet(f"{name}/done", "ok" if not error else "failed")
    if args.impl == "native" and "failed" in statuses:
      buffer.reset_hybrid_ep_buffer()  # The next case starts in step.
      ctx.get_buffer(args.timeout)
  ctx.meet("finished", ranks=alive)
  leave(ctx, alive)
  return 0 if all_ok else 1


def leave(ctx: Rank, alive) -> None:
  """Process 0 hosts the key-value store: it returns last, once every other rank has said so."""
  client = distributed._client()
  key = f"multirank/{ctx.meetings}/leaving"
  if jax.process_index() != 0:
    client.key_value_set_bytes(f"{key}/{jax.process_index()}", b"")
    return
  for r in alive:
    process = ctx.mesh.devices.flat[r].process_index
    if process != 0:
      client.blocking_key_value_get_bytes(f"{key}/{process}", 60_000)


if __name__ == "__main__":
  try:
    code = main(ARGS)
  except BaseException:  # noqa: BLE001 - the launcher reads the log.
    traceback.print_exc()
    code = 2
  sys.stdout.flush()
  sys.stderr.flush()
  # No jax.distributed shutdown: it waits for every process, and a failed or
  # exited peer would hold the others there; the launcher collects the codes.
  os._exit(code)
