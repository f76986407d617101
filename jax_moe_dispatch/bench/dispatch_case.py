"""One configuration of the dispatch suite: its data, its ops, their outputs and their checks.

A :class:`Case` draws fresh routing and tokens for one (ep size, hidden size),
builds each timed op as a per-rank function with its global arguments (what
an op needs first, e.g. combine's input rows, is computed untimed), keeps the
output of one untimed call of each op (the input of dependent ops and of the
checks), and checks outputs against :mod:`jax_moe_dispatch.testing.oracle` and the
reference backend.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_moe_dispatch.testing import oracle
from jax_moe_dispatch.bench import checks, ops

# Checked against the oracle only: the reference backend (what the native one is compared
# with) and the JAX baselines.
ORACLE_ONLY = ("reference", "jax")


class Case:
  """Routing, tokens and ops of one configuration.

  Attributes:
    ep, hidden, tokens, experts, topk, num_local: ``R, H, T, E, K, L``.
    max_recv, num_rows, pad: ``M`` (receive rows of ours), ``N`` (permuted rows
      of hybrid_ep_dispatch), ``pad_multiple``.
    permuted_rows: the deepep dispatcher's permuted rows (the worst case for ``M``).
    mesh, wrap: the ``("ep",)`` mesh of the first ``ep`` devices, and
      ``shard_map`` over it (every argument and output split on axis 0).
    layout: the oracle's receive layout of ``fused_dispatch`` (``M`` rows).
    recv_rows, cross_rows: ``[R]`` rows each rank keeps, and those from
      other ranks (the bytes of the bandwidth metrics).
  """

  def __init__(self, args: argparse.Namespace, devices, ep: int, hidden: int, index: int):
    self.args = args
    self.ep, self.hidden, self.tokens = ep, hidden, args.tokens
    self.experts, self.topk = args.experts, args.topk
    self.num_local = self.experts // ep
    self.max_recv = args.max_recv_tokens or ep * self.tokens
    self.pad = args.pad_multiple or 1
    self.mesh = Mesh(np.array(devices[:ep]), (ops.AXIS,))
    self.sharding = NamedSharding(self.mesh, P(ops.AXIS))
    self.wrap = functools.partial(jax.shard_map, mesh=self.mesh, in_specs=P(ops.AXIS),
                                  out_specs=P(ops.AXIS), check_vma=False)
    R, T, E, K = ep, self.tokens, self.experts, self.topk

    # Routing (DeepEP's test: scores |randn| + 1, top-K, probs normalised) and tokens, never zero.
    rng = np.random.default_rng([args.seed, index])
    scores = np.abs(rng.standard_normal((R * T, E), dtype=np.float32)) + 1.0
    idx = np.argpartition(-scores, K - 1, axis=1)[:, :K].astype(np.int32)
    top = np.take_along_axis(scores, idx, axis=1)
    probs = (top / top.sum(axis=1, keepdims=True)).astype(np.float32)
    self.idx, self.probs = idx.reshape(R, T, K), probs.reshape(R, T, K)
    self.rmap, self.dprobs = oracle.topk_to_map(self.idx, self.probs, E)
    key = jax.random.key(args.seed * 1000003 + index)
    self.x = jax.jit(lambda k: jax.random.normal(k, (R * T, hidden), jnp.float32).astype(jnp.bfloat16),
                     out_shardings=self.sharding)(key)
    self.device = {name: jax.device_put(a.reshape((R * T,) + a.shape[2:]), self.sharding)
                   for name, a in dict(idx=self.idx, probs=self.probs, rmap=self.rmap,
                                       dprobs=self.dprobs).items()}

    # Routing facts from the oracle (zero-width rows: the layout and counts only).
    facts = oracle.fused_dispatch(np.zeros((R, T, 0), np.int8), self.idx, self.probs, E, self.max_recv)
    self.layout = facts["layout"]
    self.recv_rows = self.layout.recv_count.sum(axis=1)
    self.cross_rows = self.recv_rows - np.diagonal(self.layout.recv_count)
    if args.hybrid_rows == "actual":
      groups = -(-facts["tokens_per_expert"] // self.pad) * self.pad
      self.num_rows = max(int(groups.sum(axis=1).max()), 1)
    else:
      self.num_rows = oracle.max_permuted_rows(self.max_recv, self.num_local, K, self.pad)
    self.permuted_rows = oracle.max_permuted_rows(self.max_recv, self.num_local, K, self.pad)
    self._cache: dict = {}

  # -- data ------------------------------------------------------------------
  def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
    if key not in self._cache:
      self._cache[key] = make()
    return self._cache[key]

  def host(self, a: Any) -> np.ndarray:
    """A global device array on the host, as ``[R, n, ...]`` per-rank blocks."""
    return checks.per_rank(a, self.ep)

  def ring_buffer(self) -> jax.Array:
    """``[R * rows, H]`` bf16, ``rows`` = the mean rows a rank receives in dispatch."""
    def make():
      rows = int(round(float(np.mean(self.recv_rows))))
      key = jax.random.key(self.args.seed + 7)
      return jax.jit(lambda k: jax.random.normal(k, (self.ep * rows, self.hidden), jnp.float32)
                     .astype(jnp.bfloat16), out_shardings=self.sharding)(key)
    return self._cached("ring_buffer", make)

  def _fp8_rows(self) -> tuple[jax.Array, jax.Array]:
    return self._cached("fp8_rows", lambda: jax.jit(self.wrap(ops.quantize))(self.x))

  # -- ops -------------------------------------------------------------------
  def op(self, op: str, impl: str, dtype: str) -> tuple[Callable, tuple]:
    """``(per-rank fn, global args)`` of one timed op."""
    E, M, sms, dev = self.experts, self.max_recv, self.args.num_sms, self.device
    if op == "dispatch" and dtype == "fp8":
      return ops.dispatch_fp8(impl, sms, E, M), (*self._fp8_rows(), dev["idx"], dev["probs"])
    if op == "dispatch":
      return ops.dispatch(impl, sms, E, M), (self.x, dev["idx"], dev["probs"])
    if op == "combine":
      recv = self.output("dispatch", impl, "bf16")
      return ops.combine(impl, sms), (self._scaled(recv[0]), recv[4])
    if op == "hybrid_dispatch":
      fn = ops.hybrid_dispatch(impl, sms, self.num_local, self.num_rows, self.pad, M)
      return fn, (self.x, dev["rmap"], dev["dprobs"])
    if op == "hybrid_combine":
      permuted = self.output("hybrid_dispatch", impl, "bf16")
      return ops.hybrid_combine(impl, sms), (self._scaled(permuted[0]), permuted[4])
    if op == "permute":
      recv = self.output("dispatch", impl, "bf16")
      fn = ops.permute(impl, self.num_local, self.permuted_rows, self.pad, self.topk)
      return fn, (recv[0], recv[1], recv[2])
    if op == "unpermute":
      permuted = self.output("permute", impl, "bf16")
      return ops.unpermute(impl, M), (permuted[0], permuted[2])
    if op == "ragged":
      return ops.ragged_dispatch(E), (self.x, dev["idx"], dev["probs"])
    if op == "dense":
      slots = self._cached("slots", lambda: jax.jit(self.wrap(ops.dense_slots(E)))(self.x, dev["idx"]))
      return ops.dense_all_to_all, (slots,)
    if op == "memcpy":
      return ops.ppermute_ring, (self.ring_buffer(),)
    raise ValueError(f"unknown op {op!r}")

  def _scaled(self, rows: jax.Array) -> jax.Array:
    return jax.jit(self.wrap(ops.scale_by_rank))(rows)

  def jitted(self, op: str, impl: str, dtype: str) -> tuple[Callable, Callable, tuple]:
    """``(jitted global fn, per-rank fn, args)``, built once."""
    def make():
      fn, args = self.op(op, impl, dtype)
      return jax.jit(self.wrap(fn)), fn, args
    return self._cached(("jitted", op, impl, dtype), make)

  def output(self, op: str, impl: str, dtype: str) -> Any:
    """The output of one untimed call, kept for dependent ops and the checks."""
    def make():
      jf, _, args = self.jitted(op, impl, dtype)
      return jax.block_until_ready(jf(*args))
    return self._cached(("output", op, impl, dtype), make)

  # -- checks ----------------------------------------------------------------
  def check(self, op: str, impl: str, dtype: str) -> str:
    """Check the op's output; raise :class:`checks.CheckFailed`, else return what was checked."""
    out = self.output(op, impl, dtype)
    if op == "memcpy":
      checks.ring(out, self.ring_buffer(), self.ep)
      return "bitwise equal to the previous rank's buffer"
    self._check_oracle(op, impl, dtype, out)
    if impl in ORACLE_ONLY:
      return "bitwise equal to the oracle"
    checks.same(out, self.output(op, "reference", dtype))
    return "bitwise equal to the oracle and to the reference backend"

  def _x_host(self) -> np.ndarray:
    return self._cached("x_host", lambda: self.host(self.x))

  def _oracle_dispatch(self, dtype: str, max_recv: int) -> dict:
    def make():
      if dtype == "fp8":
        xq, xs = self._fp8_rows()
        return oracle.fused_dispatch(self.host(xq), self.idx, self.probs, self.experts, max_recv,
                                     scales=self.host(xs))
      return oracle.fused_dispatch(self._x_host(), self.idx, self.probs, self.experts, max_recv)
    return self._cached(("oracle_dispatch", dtype, max_recv), make)

  def _oracle_hybrid(self) -> dict:
    return self._cached("oracle_hybrid", lambda: oracle.hybrid_dispatch(
        self._x_host(), self.rmap, self.dprobs, self.num_local, self.max_recv, self.num_rows, self.pad))

  def _check_oracle(self, op: str, impl: str, dtype: str, out: Any) -> None:
    if op == "dispatch":
      checks.dispatch(out, self._oracle_dispatch(dtype, self.max_recv))
    elif op == "combine":
      checks.combine(out, self.layout, self.jitted(op, impl, dtype)[2][0])
    elif op == "hybrid_dispatch":
      checks.hybrid_dispatch(out, self._oracle_hybrid())
    elif op == "hybrid_combine":
      checks.hybrid_combine(out, self._oracle_hybrid(), self.jitted(op, impl, dtype)[2][0])
    elif op == "permute":
      checks.permute(out, self._oracle_dispatch("bf16", self.max_recv), self.num_local,
                     self.permuted_rows, self.pad)
    elif op == "unpermute":
      checks.unpermute(out, self.output("permute", impl, dtype), self.ep)
    elif op == "ragged":
      checks.ragged(out, self._oracle_dispatch("bf16", self.ep * self.tokens))
    elif op == "dense":
      lay = oracle.layout(oracle.expert_dest_mask(self.idx, self.experts))  # Dense drops nothing.
      checks.dense(out, lay, self._x_host())
    else:
      raise ValueError(f"unknown op {op!r}")
