"""``moe_permute_fusion``: the native permutation (core/native_permute.py) vs core/permute.py.

CPU tests check the dispatcher's plumbing: which permutation runs (logged once)
and the error without the extension. The ``gpu`` tests check ``jmd_permute`` /
``jmd_unpermute`` bit for bit against core/permute.py (the specification) and
the numpy oracle on fresh random data, their gradients (bitwise against
core/permute.py, and numerically), and the dispatcher at ep=1 with the flag on
against off: every output and gradient bit for bit. The kernel tests need no
``get_buffer``.
"""

from __future__ import annotations

import logging

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gpu_count
from jax.test_util import check_grads

import jax_moe_dispatch as jmd
from jax_moe_dispatch.core import native_permute as NP
from jax_moe_dispatch.core import permute as P
from jax_moe_dispatch.testing import oracle
from jax_moe_dispatch.token_dispatcher import MoEFlexTokenDispatcher

# ---------------------------------------------------------------------------- plumbing (CPU)


def _dispatch_fn(cfg):
  """Per rank: token_permutation2, a row-wise expert stand-in, token_unpermutation; and the
  gradients of a weighted sum of the output with respect to the rows and probabilities."""
  def run(x, idx, probs):
    d = MoEFlexTokenDispatcher(cfg)
    px, tpe, pp, state = d.token_permutation2(x, token_probs=probs, token_indices=idx)
    y_e = jnp.tanh(px.astype(jnp.float32)).astype(px.dtype) * pp[:, None].astype(px.dtype)
    y = d.token_unpermutation(y_e, state)
    perm = state.permutation
    return y, (px, tpe, pp, perm.perm_row, perm.src_row, perm.expert_rows)

  def fn(x, idx, probs, w):
    def loss(x, probs):
      y, aux = run(x, idx, probs)
      return jnp.sum(y.astype(jnp.float32) * w), (y, aux)

    (_, (y, aux)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, probs)
    return y, aux, grads

  return fn


def _dispatch_data(rng, num_tokens, hidden, num_experts, topk, dtype):
  idx = np.stack([rng.permutation(num_experts)[:topk] for _ in range(num_tokens)]).astype(np.int32)
  idx[1] = -1  # A token routed nowhere.
  probs = (rng.random((num_tokens, topk)) + 0.1).astype(np.float32)
  x = H.rand(rng, (num_tokens, hidden), dtype)
  w = H.rand(rng, (num_tokens, hidden), np.float32)
  return [a[None] for a in (x, idx, probs, w)]


def _run_dispatcher(fusion, implementation, dtype="float32", pad=None):
  cfg = jmd.TokenDispatcherConfig(num_moe_experts=8, moe_router_topk=3, implementation=implementation,
                                  moe_permute_fusion=fusion, moe_router_expert_pad_multiple=pad)
  args = _dispatch_data(H.rng_for("dispatcher", dtype, pad), 29, 136, 8, 3, jnp.dtype(dtype))
  return H.to_np(H.ep_map(_dispatch_fn(cfg), 1)(*args))


@pytest.mark.parametrize("implementation", ["reference", "auto"])
def test_flag_runs_the_xla_permutation_without_the_native_backend(implementation, caplog):
  """On CPU the flag changes nothing (same bits) and the XLA permutation is logged."""
  if jax.default_backend() == "gpu":
    pytest.skip("CPU plumbing test (on GPUs 'auto' runs the native backend)")
  NP._log_once.cache_clear()
  with caplog.at_level(logging.INFO, logger="jax_moe_dispatch"):
    on = _run_dispatcher(True, implementation)
    assert "moe_permute_fusion=True, but the reference backend runs" in caplog.text
    off = _run_dispatcher(False, implementation)
  assert "moe_permute_fusion=False" in caplog.text
  assert "native kernels" not in caplog.text
  H.assert_same(on, off, "flag on vs off")


def test_native_implementation_without_the_extension_names_the_fix():
  if jax.default_backend() == "gpu":
    pytest.skip("needs a machine where the native backend is unavailable")
  with pytest.raises(RuntimeError, match="Fix"):
    NP.runs_native(True, "native", 20)
  assert not NP.runs_native(False, "native", 20)  # Flag off: never asks for the kernels.
  local_map = jnp.ones((3, 2), jnp.bool_)
  with pytest.raises(RuntimeError, match="moe_permute_fusion=False"):
    jax.jit(lambda r, m, p: NP.group_by_expert(r, m, p, 8))(jnp.ones((3, 4)), local_map,
                                                            jnp.ones((3, 2)))


def test_argument_checks():
  with pytest.raises(ValueError, match=r"\[M, L\]"):
    NP.group_by_expert(jnp.ones((3, 4)), jnp.ones((3, 2), bool), jnp.ones((3, 3)), 8)
  with pytest.raises(ValueError, match="1 to 4 arrays"):
    NP.group_by_expert(jnp.ones((2, 4)), jnp.ones((3, 2), bool), jnp.ones((3, 2)), 8)
  with pytest.raises(ValueError, match="pad_multiple"):
    NP.group_by_expert(jnp.ones((3, 4)), jnp.ones((3, 2), bool), jnp.ones((3, 2)), 8, 0)


def _emulated_call(target, out_types, *args, **attrs):
  """The FFI targets' contract in XLA (core/permute.py), for the Python side on CPU."""
  if target == "jmd_permute":
    local_map, probs, *leaves = args
    num_rows, k = out_types[1].shape[0], out_types[3].shape[1]
    perm = P.make_permutation(local_map, num_rows, int(attrs["pad_multiple"]), k)
    scratch = jnp.zeros(out_types[4].shape, jnp.int32)
    return ([perm.perm_row, perm.src_row, perm.tokens_per_expert, perm.expert_rows, scratch,
             P.permute_values(probs, perm)] + [P.permute(a, perm) for a in leaves])
  assert target == "jmd_unpermute", target
  expert_rows, rows = args
  none = jnp.zeros((0,), jnp.int32)
  return P.unpermute(rows, P.Permutation(none, none, none, expert_rows), expert_rows.shape[0],
                     out_types.dtype)


@pytest.fixture
def emulated(monkeypatch):
  """The native path with its FFI calls emulated (no kernels: checks the Python plumbing)."""
  calls = []

  def call(target, out_types, *args, **attrs):
    calls.append(target)
    return _emulated_call(target, out_types, *args, **attrs)

  monkeypatch.setattr(NP, "_call", call)
  monkeypatch.setattr(NP, "runs_native", lambda fusion, implementation, num_sms: fusion)
  return calls


def test_dispatcher_plumbing_emulated(emulated):
  """With the flag, the dispatcher calls jmd_permute / jmd_unpermute (and unpermute in the
  backward pass of permute); outputs and gradients equal the XLA path's."""
  on = _run_dispatcher(True, "reference", "bfloat16", 16)
  assert emulated.count("jmd_permute") == 1 and emulated.count("jmd_unpermute") == 2
  off = _run_dispatcher(False, "reference", "bfloat16", 16)
  assert len(emulated) == 3
  H.assert_same(on, off, "flag on vs off (emulated)")


def test_permute_plumbing_emulated(emulated):
  """FP8 rows and scales (a pytree), unpermute to another dtype, gradients of every input."""
  local_map, probs, rows, y, num_rows, pad, k = _case_data(CASES[2], "fp8", 16)
  got = H.to_np(_permute_fn(NP, num_rows, pad, k)(local_map, probs, rows, y))
  want = H.to_np(_permute_fn(P, num_rows, pad, k)(local_map, probs, rows, y))
  H.assert_same(got, want, "emulated fp8")
  local_map, probs, rows, y, num_rows, pad, k = _case_data(CASES[3], "float32", None)
  rng = H.rng_for("emulated grads")
  args = (local_map, probs, rows, H.rand(rng, (num_rows, rows.shape[1]), np.float32),
          H.rand(rng, (num_rows,), np.float32), y, H.rand(rng, (local_map.shape[0],) + y.shape[1:],
                                                          np.float32))
  H.assert_same(H.to_np(_grads_fn(NP, num_rows, pad, k)(*args)),
                H.to_np(_grads_fn(P, num_rows, pad, k)(*args)), "emulated gradients")
  assert {"jmd_permute", "jmd_unpermute"} <= set(emulated)


# ---------------------------------------------------------------------------- kernels (GPU)

# (M, L, density, N, K, hidden): N None = the worst case; K None = L.
CASES = [
    (37, 6, 0.4, None, None, 136),
    (37, 6, 0.9, 25, None, 136),    # Drops past N (later groups start past it).
    (64, 8, 0.7, None, 2, 136),     # Rows over K experts keep their K smallest.
    (50, 40, 0.3, 70, 3, 136),      # L > 32 (two ballot words), K clamp and drops.
    (45, 5, 0.6, None, 9, 7),       # H = 7: no 16-byte vectors; K > L clamps to L.
    (37, 6, 0.0, None, 2, 136),     # Every row masked.
    (0, 4, 0.5, None, 2, 136),      # M = 0.
    (1, 4, 1.0, None, 2, 136),      # M = 1.
    (700, 12, 0.5, 1500, 12, 264),  # K = L = 12 (> 8: batches of loads), drops.
]
DTYPES = ["bfloat16", "float32", "float16", "fp8"]


def _rows(rng, m, hidden, dtype):
  if dtype == "fp8":  # Rows and their float32 scales: two arrays permuted alike.
    x = H.rand(rng, (m, 256), np.float32) * 10.0
    q, s = jmd.quantize_fp8(jnp.asarray(x))
    return (np.asarray(q), np.asarray(s))
  return H.rand(rng, (m, hidden), jnp.dtype(dtype))


def _case_data(case, dtype, pad):
  m, num_local, density, num_rows, k, hidden = case
  rng = H.rng_for("native_permute", case, dtype, pad)
  local_map = rng.random((m, num_local)) < density
  probs = H.rand(rng, (m, num_local), np.float32)
  rows = _rows(rng, m, hidden, dtype)
  pad = pad or 1
  if num_rows is None:
    num_rows = P.max_permuted_rows(m, num_local, k or num_local, pad)
  sum_dtype = jnp.bfloat16 if dtype == "fp8" else jnp.dtype(dtype)
  y = H.rand(rng, (num_rows, hidden), sum_dtype)
  return local_map, probs, rows, y, num_rows, pad, k


def _permute_fn(mod, num_rows, pad, k):
  def f(local_map, probs, rows, y):
    permuted, pprobs, perm = mod.group_by_expert(rows, local_map, probs, num_rows, pad, k)
    m = local_map.shape[0]
    return (permuted, pprobs, perm, mod.unpermute(y, perm, m),
            mod.unpermute(y, perm, m, jnp.float32), mod.unpermute(y.astype(jnp.float16), perm, m))
  return jax.jit(f)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", [None, 16, 128])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_permute_bitwise(case, pad, dtype):
  """Every output of group_by_expert and unpermute: native == core/permute == oracle."""
  local_map, probs, rows, y, num_rows, pad, k = _case_data(case, dtype, pad)
  got = H.to_np(_permute_fn(NP, num_rows, pad, k)(local_map, probs, rows, y))
  want = H.to_np(_permute_fn(P, num_rows, pad, k)(local_map, probs, rows, y))
  H.assert_same(got, want, f"{case} {dtype} pad={pad}")
  # The independent oracle of the layout (rows routed past K dropped first).
  num_local = local_map.shape[1]
  kept = local_map & (np.cumsum(local_map, axis=1) <= (k or num_local))
  ref = oracle.permutation(kept, num_rows, pad)
  perm = got[2]
  H.assert_equal_int(perm.perm_row, ref["perm_row"], "perm_row")
  H.assert_equal_int(perm.src_row, ref["src_row"], "src_row")
  H.assert_equal_int(perm.tokens_per_expert, ref["tokens_per_expert"], "tokens_per_expert")
  for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(rows)):
    H.assert_bitwise(a, oracle.permute_rows(b, ref), "permuted rows vs oracle")
  H.assert_bitwise(got[1], oracle.permute_values(probs, ref), "permuted probs vs oracle")
  H.assert_close(got[4], oracle.unpermute_rows(np.asarray(y, np.float64), ref, local_map.shape[0]),
                 np.float32, "unpermute (float32 out) vs oracle")


def _grads_fn(mod, num_rows, pad, k):
  def f(local_map, probs, rows, g_rows, g_probs, y, g_y):
    def fwd(rows, probs):
      permuted, pprobs, _ = mod.group_by_expert(rows, local_map, probs, num_rows, pad, k)
      return permuted, pprobs

    _, vjp = jax.vjp(fwd, rows, probs)
    perm = mod.group_by_expert(rows, local_map, probs, num_rows, pad, k)[2]
    _, u_vjp = jax.vjp(lambda y: mod.unpermute(y, perm, local_map.shape[0]), y)
    return vjp((g_rows, g_probs)), u_vjp(g_y)
  return jax.jit(f)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("pad", [None, 16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_bitwise(case, pad, dtype):
  """Cotangents of rows and probabilities (permute) and of unpermute: native == core bitwise."""
  local_map, probs, rows, y, num_rows, pad, k = _case_data(case, dtype, pad)
  rng = H.rng_for("native_permute_grads", case, dtype, pad)
  g_rows = H.rand(rng, (num_rows,) + rows.shape[1:], rows.dtype)
  g_probs = H.rand(rng, (num_rows,), np.float32)
  g_y = H.rand(rng, (local_map.shape[0],) + y.shape[1:], y.dtype)
  args = (local_map, probs, rows, g_rows, g_probs, y, g_y)
  got = H.to_np(_grads_fn(NP, num_rows, pad, k)(*args))
  want = H.to_np(_grads_fn(P, num_rows, pad, k)(*args))
  H.assert_same(got, want, f"gradients {case} {dtype} pad={pad}")


@pytest.mark.gpu
def test_gradients_numeric():
  rng = H.rng_for("native_permute_numeric")
  m, num_local, k, pad = 9, 4, 2, 4
  local_map = rng.random((m, num_local)) < 0.6
  rows = H.rand(rng, (m, 5), np.float32)
  probs = H.rand(rng, (m, num_local), np.float32)
  num_rows = P.max_permuted_rows(m, num_local, k, pad)
  fwd = lambda r, p: NP.group_by_expert(r, local_map, p, num_rows, pad, k)[:2]  # noqa: E731
  check_grads(fwd, (rows, probs), order=1, modes=("rev",), atol=1e-2, rtol=1e-2)
  perm = NP.group_by_expert(rows, local_map, probs, num_rows, pad, k)[2]
  y = H.rand(rng, (num_rows, 5), np.float32)
  check_grads(lambda y: NP.unpermute(y, perm, m), (y,), order=1, modes=("rev",), atol=1e-2,
              rtol=1e-2)


# ---------------------------------------------------------------------------- dispatcher (GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("pad", [None, 16])
def test_dispatcher_fusion_bitwise(dtype, pad, caplog):
  """ep=1, native backend: moe_permute_fusion=True runs jmd_permute / jmd_unpermute and gives
  the same outputs, permutation and gradients as False, bit for bit."""
  H.native_group(1, gpu_count())
  NP._log_once.cache_clear()
  with caplog.at_level(logging.INFO, logger="jax_moe_dispatch"):
    on = _run_dispatcher(True, "native", dtype, pad)
  assert "native kernels" in caplog.text
  off = _run_dispatcher(False, "native", dtype, pad)
  H.assert_same(on, off, f"flag on vs off ({dtype}, pad={pad})")
  cfg = jmd.TokenDispatcherConfig(num_moe_experts=8, moe_router_topk=3, implementation="native",
                                  moe_permute_fusion=True)
  args = _dispatch_data(H.rng_for("lower"), 29, 136, 8, 3, jnp.dtype(dtype))
  text = H.ep_map(_dispatch_fn(cfg), 1).lower(*args).as_text()
  assert "jmd_permute" in text and "jmd_unpermute" in text
