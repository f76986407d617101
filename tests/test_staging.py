"""Staging sizes of groups spanning processes, and their growth at trace time (CPU).

The sizes are checked against the handlers' rule written out here independently
(each staged array rounded up to 256 bytes; which arrays each handler stages).
Growth is checked with the native backend traced on CPU (tracing needs no GPU)
over a stand-in for the extension's buffer calls, as a group spanning two
processes: an op traced larger than the buffer grows it once, before anything
runs, with one warning; the extension's ``staged_bytes`` is the real one.
"""

from __future__ import annotations

import logging
import math

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe_dispatch as jmd
from jax_moe_dispatch import backends
from jax_moe_dispatch.backends import buffer, native, staging
from jax_moe_dispatch.core import permute
from jax_moe_dispatch.token_dispatcher import MoEFlexTokenDispatcher

EP = 2


def aligned(n: int) -> int:
  return -(-n // 256) * 256


def staged(sizes) -> int:
  """The handlers' rule: every staged array starts at a 256-byte aligned offset."""
  return sum(aligned(n) for n in sizes)


@pytest.fixture
def ext():
  if not native.extension_built():
    pytest.skip(native.native_unavailable_reason())
  return native.extension()


def test_extension_staged_bytes_is_the_handlers_rule(ext):
  for sizes in ([], [0], [1], [256], [257, 3, 0, 4096], [10**9 + 7, 255]):
    assert ext.staged_bytes(sizes) == staged(sizes), sizes


@pytest.mark.parametrize("max_recv,num_local,topk,pad", [(1, 1, 1, 1), (64, 4, 8, 16),
                                                         (37, 8, 3, 1), (100, 3, 3, 128)])
def test_worst_case_rows_are_the_permutation_s(max_recv, num_local, topk, pad):
  assert (staging.max_permuted_rows(max_recv, num_local, topk, pad)
          == permute.max_permuted_rows(max_recv, num_local, topk, pad))


def test_each_op_stages_what_its_handler_copies():
  T, R, L, M, N, H_ = 5, 3, 4, 15, 70, 96
  assert staging.dispatch(T, R, [T * H_ * 2, T * 8]) == [T * R * 4, T * H_ * 2, T * 8]
  assert staging.combine(M * H_ * 4) == [M * H_ * 4]
  assert staging.hybrid_dispatch(T, R, L, [T * H_], 2) == [T * R * 4, T * H_, T * R * L,
                                                           T * R * L * 2]
  assert staging.hybrid_combine(N * H_ * 2, M, L) == [N * H_ * 2, M * L * 4]
  assert staging.summed_row_bytes(H_, 1) == 2 * H_  # FP8 rows come back at least bf16.
  assert staging.summed_row_bytes(H_, 4) == 4 * H_


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("T,H_,L,R,topk,pad", [(64, 256, 4, 2, None, 1), (37, 7168, 8, 8, 8, 16),
                                              (1, 100, 1, 4, 1, 1), (4096, 2048, 32, 8, 8, 128)])
def test_init_hybrid_ep_buffer_formula(ext, fp8, T, H_, L, R, topk, pad):
  k = L if topk is None else topk
  M = R * T
  N = M * min(k, L) + L * (pad - 1)
  rows = [T * H_, T * math.ceil(H_ / 128) * 4] if fp8 else [T * H_ * 2]
  want = max(
      staged([R * T * 4, *rows, T * R * L, T * R * L * 4]),  # dispatch
      staged([N * H_ * 2, M * L * 4]),                       # combine, dispatch's backward
      staged([M * L * 4]),                                   # probabilities' gradient
      staged([R * T * 4, T * H_ * 2]))                       # combine's backward
  got = staging.hybrid_ep_buffer(ext.staged_bytes, hidden_dim=H_, max_num_tokens=T, num_local=L,
                                 num_ranks=R, fp8_dispatch=fp8, topk=k, pad_multiple=pad)
  assert got == want


def test_init_hybrid_ep_buffer_sizes_its_staging_and_sets_the_sms(ext, monkeypatch):
  calls = []
  monkeypatch.setattr(buffer, "_get_buffer", lambda *a: calls.append(a))
  monkeypatch.setitem(backends._NUM_SMS, "hybridep", backends._NUM_SMS["hybridep"])
  buffer.init_hybrid_ep_buffer(jax.devices()[:EP], 512, 48, 4, 30, 40, False, topk=2,
                               pad_multiple=8)
  (mesh, axis, hidden_bytes, tokens, timeout, fix, staging_for), = calls
  assert (axis, hidden_bytes, tokens, timeout) == ("ep", 1024, 48, None)
  assert "init_hybrid_ep_buffer" in fix
  assert staging_for(EP) == staging.hybrid_ep_buffer(
      ext.staged_bytes, hidden_dim=512, max_num_tokens=48, num_local=4, num_ranks=EP,
      fp8_dispatch=False, topk=2, pad_multiple=8)
  # The SM budget (the larger of the two) reaches configs built afterwards and their ops.
  assert backends.default_num_sms("hybridep") == 40
  config = jmd.TokenDispatcherConfig(num_moe_experts=8, moe_router_topk=2,
                                     moe_flex_dispatcher_backend="hybridep")
  assert config.moe_hybridep_num_sms == 40
  assert MoEFlexTokenDispatcher(config)._op_args()["num_sms"] == 40
  # Spanning processes without num_local_experts: the error names the fix.
  calls.clear()
  buffer.init_hybrid_ep_buffer(jax.devices()[:EP], 512, 48)
  with pytest.raises(ValueError, match=r"needs num_local_experts.*Fix: init_hybrid_ep_buffer"):
    calls[0][-1](EP)


# ----------------------------------------------------------------------------
# Growth while tracing, over a stand-in for the extension's buffer calls.


class FakeExtension:
  """The buffer calls of the extension, recorded; ``staged_bytes`` is the real one."""

  MAX_RANKS = 8

  def __init__(self, real):
    self.staged_bytes = real.staged_bytes
    self.calls = []

  def __getattr__(self, name):
    if name in ("region_bytes",):
      return lambda: 2048
    return lambda *a: self.calls.append((name, *a))


@pytest.fixture
def spanning(ext, monkeypatch):
  """This process as rank 0 of a group of EP processes with ``staging_bytes`` of staging.

  Returns ``(fake extension, joins)``: each set-up's ``_join`` as
  ``(group device ids, staging bytes)``.
  """
  fake = FakeExtension(ext)
  joins = []
  monkeypatch.setattr(buffer, "_ext", lambda: fake)
  monkeypatch.setattr(buffer, "_join", lambda ext, key, group, axis, timeout, nbytes: joins.append(
      (tuple(d.id for d in group), nbytes)))
  monkeypatch.setattr(buffer, "_buffer", buffer.Buffer(
      tuple([tuple(d.id for d in jax.devices()[:EP])]), (True,), (0,), "ep", 256, 8, 2048, 4096,
      120.0))
  monkeypatch.setattr(native, "native_available", lambda: True)
  return fake, joins


def test_reserve_grows_only_when_needed_and_warns_once(spanning, caplog):
  fake, joins = spanning
  with caplog.at_level(logging.WARNING, logger="jax_moe_dispatch"):
    buffer.reserve_staging(4096, "dispatch")  # Fits.
    buffer.reserve_staging(100, "dispatch")
    assert not caplog.records and not joins and not fake.calls
    buffer.reserve_staging(10_000, "HybridEP dispatch")
    buffer.reserve_staging(10_000, "HybridEP combine")  # Already that large.
    buffer.reserve_staging(9_000, "HybridEP combine")
  (record,) = caplog.records
  assert all(s in record.getMessage() for s in ("HybridEP dispatch", "from 4096 to 10000 bytes",
                                                 "init_hybrid_ep_buffer"))
  assert joins == [(tuple(d.id for d in jax.devices()[:EP]), 10_000)]
  assert ("free_all", True) in fake.calls  # The old staging was released first.
  assert buffer._buffer.staging_bytes == 10_000 and buffer._buffer.spans_processes == (True,)
  # get_buffer of a smaller size keeps it; nothing shrinks while set up.
  kept = buffer._set_up([jax.devices()[:EP]], (True,), "ep", 256, 8, 60.0, 500)
  assert kept.staging_bytes == 10_000
  assert len(joins) == 1 and fake.calls[-1][0] == "set_timeout" and fake.calls[-1][-1] == 60.0


def test_reserve_does_nothing_without_staging(ext, monkeypatch, caplog):
  monkeypatch.setattr(buffer, "_buffer", buffer.Buffer(((0, 1),), (False,), (0, 1), "ep", 256,
                                                       None, 2048, 0, 10.0))
  monkeypatch.setattr(buffer, "_ext", lambda: pytest.fail("no extension call expected"))
  with caplog.at_level(logging.WARNING, logger="jax_moe_dispatch"):
    buffer.reserve_staging(1 << 30, "HybridEP combine")
  assert not caplog.records and buffer._buffer.staging_bytes == 0


def hybrid_program(T, H_, L, K, pad, dtype=jnp.bfloat16):
  """A hybrid dispatch + combine and its gradients, per rank, on the native backend."""

  def loss(x, routing_map, probs):
    px, pp, _, _, handle = jmd.hybrid_ep_dispatch(x, routing_map, probs, L, "ep", topk=K,
                                                  pad_multiple=pad, implementation="native")
    return jmd.hybrid_ep_combine(px * pp[:, None].astype(px.dtype), handle, "ep",
                                 implementation="native").astype(jnp.float32).sum()

  fn = H.ep_map(lambda x, m, p: jax.grad(loss, argnums=(0, 2))(x, m, p), EP)
  rng = np.random.default_rng(0)
  routing_map = rng.random((EP, T, EP * L)) < 0.4
  probs = rng.uniform(0.1, 1, size=routing_map.shape).astype(np.float32)
  x = jnp.asarray(H.rand(rng, (EP, T, H_), np.float32), dtype)
  return lambda: jax.make_jaxpr(fn)(x, routing_map, probs)


def test_tracing_a_larger_hybrid_round_trip_grows_once(spanning, monkeypatch, caplog):
  """Dispatch, combine and both backward passes at T tokens: one growth, to the largest need."""
  fake, joins = spanning
  T, H_, L, K, pad = 24, 128, 3, 2, 4
  requests = []
  reserve = buffer.reserve_staging
  monkeypatch.setattr(buffer, "reserve_staging",
                      lambda n, what: (requests.append((what, n)), reserve(n, what)))
  trace = hybrid_program(T, H_, L, K, pad)
  with caplog.at_level(logging.WARNING, logger="jax_moe_dispatch"):
    trace()
  M = EP * T
  N = M * min(K, L) + L * (pad - 1)
  needs = {  # What each handler reserves (its own arrays), for this trace.
      "HybridEP dispatch": staged([T * EP * 4, T * H_ * 2, T * EP * L, T * EP * L * 4]),
      "HybridEP combine": staged([N * H_ * 2, M * L * 4]),
      "combine": staged([M * L * 4]),
      "HybridEP cached dispatch": staged([T * EP * 4, T * H_ * 2]),
  }
  assert {what for what, _ in requests} == set(needs)  # Every op of the program asked...
  assert all(n >= needs[what] for what, n in requests)  # ...for at least its own need.
  assert len(caplog.records) == 1 and len(joins) == 1  # The first (the dispatch) grew it once,
  assert joins[0][1] == max(needs.values()) == buffer._buffer.staging_bytes  # to the largest.
  joins.clear()
  with caplog.at_level(logging.WARNING, logger="jax_moe_dispatch"):
    trace()  # Again (a fresh trace): nothing grows.
    hybrid_program(T // 2, H_, L, K, pad)()
  assert len(caplog.records) == 1 and not joins


def test_tracing_a_larger_plain_round_trip_grows_once(spanning, caplog):
  fake, joins = spanning
  T, H_, K, E = 40, 64, 2, 8

  def loss(x, idx, probs):
    recv_x, _, _, _, handle = jmd.fused_dispatch(x, idx, probs, E, "ep", implementation="native")
    return jmd.fused_combine(recv_x, handle, "ep", implementation="native").sum()

  rng = np.random.default_rng(1)
  idx = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(T)]) for _ in range(EP)])
  probs = rng.uniform(0.1, 1, size=idx.shape).astype(np.float32)
  x = H.rand(rng, (EP, T, H_), np.float32)
  fn = H.ep_map(lambda x, i, p: jax.grad(loss, argnums=(0, 2))(x, i, p), EP)
  with caplog.at_level(logging.WARNING, logger="jax_moe_dispatch"):
    jax.make_jaxpr(fn)(x, idx.astype(np.int32), probs)
  M = EP * T
  payloads = [T * H_ * 4, T * K * 4, T * K * 4]  # rows, ids, probabilities
  want = max(staged([T * EP * 4, *payloads]),   # dispatch
             staged([M * H_ * 4]),             # combine, and the rows' gradient
             staged([T * EP * 4, T * H_ * 4]))  # combine's backward
  assert len(caplog.records) == 1 and [n for _, n in joins] == [want]
  assert buffer._buffer.staging_bytes == want
