"""How the native row kernels copy rows: Hopper bulk copies or vectors, the same bits.

The native permute and the fused hybrid dispatch (fresh, and cached: hybrid
combine's backward) copy each row into its permuted rows either with bulk copies
through a per-warp shared-memory ring (``JMD_ROW_COPY=bulk``, the default, where
row bytes and addresses are multiples of 16 bytes) or in vectors
(``JMD_ROW_COPY=vector``). The handlers read the variable when they run; each
mode compiles its own function here (XLA may record the permute handler into a
CUDA graph and replay it without running the handler again). On GPUs these tests check, on fresh random data,
that both settings give the same bits, and that those are the specification's
(core/permute.py, the reference backend) and the numpy oracle's; the shapes cover
rows of several ring chunks with a partial last one, many rows per warp (the ring
wraps from row to row), more destinations per row than a warp's lanes and than
its destination list (64), FP8 rows with their scale rows, and rows that are not
a multiple of 16 bytes (vectors either way).
"""

from __future__ import annotations

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gpu_count

import jax_moe_dispatch as jmd
from jax_moe_dispatch.core import native_permute as NP
from jax_moe_dispatch.core import permute as P
from jax_moe_dispatch.testing import oracle

pytestmark = pytest.mark.gpu

MODES = ("bulk", "vector")


def _each_mode(monkeypatch, run):
  """``{mode: numpy outputs of run()}`` with JMD_ROW_COPY set to each mode (``run`` compiles
  a fresh function each time)."""
  out = {}
  for mode in MODES:
    monkeypatch.setenv("JMD_ROW_COPY", mode)
    out[mode] = H.to_np(run())
  return out


# ---------------------------------------------------------------------------- permute

# (M, L, density, K, hidden, dtype): K None = L.
PERMUTE_CASES = [
    (120, 70, 0.5, None, 4104, "bfloat16"),   # 8208-byte rows: 2 chunks + 16 bytes; > 32 destinations.
    (40, 80, 0.95, None, 2056, "bfloat16"),   # > 64 destinations (several rounds per row).
    (9000, 4, 0.5, None, 1032, "bfloat16"),   # One chunk a row, many rows per warp.
    (3000, 6, 0.4, 3, 4104, "bfloat16"),      # Several chunks a row and rows per warp; K clamp.
    (200, 8, 0.6, None, 7168, "float32"),     # 7 chunks a row.
    (200, 8, 0.6, None, 7168, "fp8"),         # FP8 rows (7168 bytes) and float32 scale rows (224 bytes).
    (300, 8, 0.6, None, 2051, "bfloat16"),    # 4102-byte rows: vectors in both modes.
]


def _permute_rows(rng, m, hidden, dtype):
  if dtype == "fp8":
    q, s = jmd.quantize_fp8(jnp.asarray(H.rand(rng, (m, hidden), np.float32) * 10.0))
    return (np.asarray(q), np.asarray(s))
  return H.rand(rng, (m, hidden), jnp.dtype(dtype))


@pytest.mark.parametrize("pad", [None, 16])
@pytest.mark.parametrize("case", PERMUTE_CASES, ids=str)
def test_permute_bulk_and_vector_copies_agree(case, pad, monkeypatch):
  """group_by_expert: bulk == vector == core/permute.py == oracle, every output bit."""
  m, num_local, density, k, hidden, dtype = case
  rng = H.rng_for("row_copy_permute", case, pad)
  local_map = rng.random((m, num_local)) < density
  probs = H.rand(rng, (m, num_local), np.float32)
  rows = _permute_rows(rng, m, hidden, dtype)
  pad = pad or 1
  num_rows = P.max_permuted_rows(m, num_local, k or num_local, pad)

  def fn(mod):
    return jax.jit(lambda r, lm, p: mod.group_by_expert(r, lm, p, num_rows, pad, k))

  out = _each_mode(monkeypatch, lambda: fn(NP)(rows, local_map, probs))
  H.assert_same(out["bulk"], out["vector"], f"bulk vs vector {case}")
  H.assert_same(out["bulk"], H.to_np(fn(P)(rows, local_map, probs)), f"bulk vs core/permute {case}")
  kept = local_map & (np.cumsum(local_map, axis=1) <= (k or num_local))
  ref = oracle.permutation(kept, num_rows, pad)
  for got, want in zip(jax.tree.leaves(out["bulk"][0]), jax.tree.leaves(rows)):
    H.assert_bitwise(got, oracle.permute_rows(want, ref), "permuted rows vs oracle")


# ---------------------------------------------------------------------------- hybrid dispatch


@pytest.fixture(params=[1, 2], ids=lambda n: f"ep{n}")
def ep(request):
  return H.native_group(request.param, gpu_count())


# (T, L, K, hidden, dtype, num_sms)
HYBRID_CASES = [
    (600, 40, 8, 7168, "bfloat16", 24),   # The bench's rows (14336 bytes: 3 chunks + 2048 bytes).
    (600, 40, 8, 7168, "bfloat16", 2),    # Many rows per warp.
    (64, 80, 70, 1032, "bfloat16", 4),    # > 64 destinations per row.
    (300, 16, 6, 7168, "fp8", 8),         # FP8 rows and scale rows, two row streams.
    (300, 16, 6, 1001, "bfloat16", 8),    # 2002-byte rows: vectors in both modes.
]


def _hybrid_inputs(rng, ep, T, K, E, hidden, dtype):
  idx = oracle.random_topk(rng, ep, T, K, E, masked_rows=(1,))
  probs = np.where(idx >= 0, rng.random(idx.shape) + 0.1, 0).astype(np.float32)
  rmap, dprobs = oracle.topk_to_map(idx, probs, E)
  x = H.rand(rng, (ep, T, hidden), np.float32) * rng.uniform(0.01, 100.0, (ep, T, 1))
  if dtype == "fp8":
    q, s = jax.vmap(jmd.quantize_fp8)(jnp.asarray(x))
    return np.asarray(q), np.asarray(s), rmap, dprobs
  return x.astype(jnp.dtype(dtype)), None, rmap, dprobs


@pytest.mark.parametrize("case", HYBRID_CASES, ids=str)
def test_hybrid_dispatch_bulk_and_vector_copies_agree(ep, case, monkeypatch):
  """Fresh hybrid dispatch and the cached one (combine's backward): bulk == vector ==
  reference, every output bit, and the permuted rows == oracle."""
  T, L, K, hidden, dtype, num_sms = case
  E = ep * L
  rng = H.rng_for("row_copy_hybrid", ep, case)
  x, scales, rmap, dprobs = _hybrid_inputs(rng, ep, T, K, E, hidden, dtype)
  fp8 = scales is not None
  g = H.rand(rng, (ep, T, hidden), np.float32 if fp8 else x.dtype)

  def fn(impl, x, scales, rmap, dprobs, g):
    px, pprobs, pscales, tpe, handle = jmd.hybrid_ep_dispatch(
        x, rmap, dprobs, L, "ep", scaling_factor=scales if fp8 else None, topk=K, pad_multiple=16,
        implementation=impl, num_sms=num_sms)
    rows = px.astype(jnp.float32) if fp8 else px
    _, vjp = jax.vjp(lambda r: jmd.hybrid_ep_combine(r, handle, "ep", implementation=impl,
                                                     num_sms=num_sms), rows)
    return px, pprobs, pscales, tpe, handle, vjp(g)[0]

  args = (x, scales if fp8 else np.zeros((ep, T, 1), np.float32), rmap, dprobs, g)
  out = _each_mode(monkeypatch, lambda: H.ep_map(lambda *a: fn("native", *a), ep)(*args))
  H.assert_same(out["bulk"], out["vector"], f"bulk vs vector {case}")
  reference = H.to_np(H.ep_map(lambda *a: fn("reference", *a), ep)(*args))
  H.assert_same(out["bulk"], reference, f"bulk vs reference {case}")
  want = oracle.hybrid_dispatch(x, rmap, dprobs, L, pad_multiple=16, topk=K, scales=scales)
  H.assert_bitwise(out["bulk"][0], want["permuted_x"], "permuted_x vs oracle")
  if fp8:
    H.assert_bitwise(out["bulk"][2], want["permuted_scales"], "permuted_scales vs oracle")


def test_unknown_row_copy_mode_names_the_choices(monkeypatch):
  """A JMD_ROW_COPY other than bulk / vector fails the call, naming the variable and its values."""
  H.native_group(1, gpu_count())
  rng = H.rng_for("row_copy_bad")
  local_map = rng.random((9, 4)) < 0.5
  probs = H.rand(rng, (9, 4), np.float32)
  rows = H.rand(rng, (9, 64), np.float32)
  run = jax.jit(lambda r, lm, p: NP.group_by_expert(r, lm, p, 36, 1, None))
  monkeypatch.setenv("JMD_ROW_COPY", "tma")
  with pytest.raises(Exception, match="JMD_ROW_COPY must be 'bulk'"):
    jax.block_until_ready(run(rows, local_map, probs))
