"""grouped_matmul: forward, dgrad and wgrad against a float64 numpy oracle.

On CPU the Hopper kernels run under Pallas's GPU interpreter
(``implementation="interpret"``): the same tiling, group plan, masks and
stores as on the GPU, with each ``wgmma`` simulated. The ``gpu`` tests run the
compiled kernels on a Hopper GPU.
"""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gpu_count
from jax.test_util import check_grads

from jax_moe_dispatch import grouped_matmul
from jax_moe_dispatch.gemm import api as gemm_api
from jax_moe_dispatch.gemm import mosaic
from jax_moe_dispatch.gemm import plan as gemm_plan

# name -> (rows N, group sizes); rows past the sum are padding (filled with NaN/Inf garbage).
LAYOUTS = {
    "balanced": (256, [64, 64, 64, 64]),
    "zeros_and_skew": (256, [0, 150, 0, 57]),
    "one_group_holds_most": (256, [1, 0, 240, 3]),
    "padding_rows": (512, [40, 0, 70, 17]),
    "rows_not_multiple_of_128": (200, [33, 100, 0, 50]),
    "empty": (128, [0, 0, 0, 0]),
}


def _oracle(x, w, dy, sizes):
  """float64 ``y = x_g @ w_g``, ``dx = dy_g @ w_g.T``, ``dw_g = x_g.T @ dy_g``; zero past the groups."""
  x, w, dy = (np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64) for a in (x, w, dy))
  y = np.zeros((x.shape[0], w.shape[2]))
  dx = np.zeros_like(x)
  dw = np.zeros_like(w)
  row = 0
  for g, size in enumerate(sizes):
    rows = slice(row, row + size)
    y[rows] = x[rows] @ w[g]
    dx[rows] = dy[rows] @ w[g].T
    dw[g] = x[rows].T @ dy[rows]
    row += size
  return y, dx, dw


def _data(num_rows, sizes, k, m, dtype, seed, garbage=np.nan):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_rows, k)).astype(np.float32)
  x[sum(sizes):] = garbage  # Never read: must not leak into any output.
  w = (rng.normal(size=(len(sizes), k, m)) / math.sqrt(k)).astype(np.float32)
  dy = rng.normal(size=(num_rows, m)).astype(np.float32)
  dy[sum(sizes):] = garbage
  return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.asarray(dy, dtype)


def _run(x, w, dy, sizes, implementation, out_dtype=jnp.float32, fill_padding=True):
  gs = jnp.asarray(sizes, jnp.int32)

  def f(x, w, dy):
    y, pullback = jax.vjp(
        lambda x, w: grouped_matmul(x, w, gs, preferred_element_type=out_dtype,
                                    implementation=implementation, fill_padding=fill_padding),
        x, w)
    return (y, *pullback(dy.astype(out_dtype)))

  return jax.jit(f)(x, w, dy)


def _assert_matches(got, want, what, rtol):
  got = np.asarray(jnp.asarray(got).astype(jnp.float32), np.float64)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  assert np.isfinite(got).all(), f"{what}: non-finite values (garbage rows leaked?)"
  scale = max(np.abs(want).max(), 1e-30)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def _check_interpreted(layout, x, w, dy, sizes):
  """grouped_matmul's y, dx, dw under the interpreter against the oracle; zeros past the groups."""
  y, dx, dw = _run(x, w, dy, sizes, "interpret")
  # y is float32; dx and dw come back in the operands' dtype (bf16 rounding).
  for got, want, what, rtol in zip((y, dx, dw), _oracle(x, w, jnp.nan_to_num(dy), sizes),
                                   "y dx dw".split(), (1e-5, 8e-3, 8e-3)):
    _assert_matches(got, want, f"{layout}: {what}", rtol=rtol)
  total = sum(sizes)
  assert not np.asarray(y)[total:].any() and not np.asarray(dx)[total:].any()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_interpreted_kernels_match_oracle(layout):
  num_rows, sizes = LAYOUTS[layout]
  x, w, dy = _data(num_rows, sizes, 128, 128, jnp.bfloat16, seed=hash(layout) % 1000)
  _check_interpreted(layout, x, w, dy, sizes)


@pytest.mark.parametrize("width", [128, 256])  # One consumer; two (warp-specialised).
def test_interpreted_kernels_skip_padding_rows_without_fill_padding(width):
  """fill_padding=False: the real rows as with it, no block past them written (the
  interpreter fills unwritten memory with NaN), and the weight gradient unchanged."""
  num_rows, sizes = LAYOUTS["padding_rows"]
  x, w, dy = _data(num_rows, sizes, width, width, jnp.bfloat16, seed=width)
  y, dx, dw = _run(x, w, dy, sizes, "interpret", fill_padding=False)
  total = sum(sizes)
  first_free_block = -(-total // 128) * 128
  for got, want, what, rtol in zip((y, dx, dw), _oracle(x, w, jnp.nan_to_num(dy), sizes),
                                   "y dx dw".split(), (1e-5, 8e-3, 8e-3)):
    got = np.asarray(jnp.asarray(got).astype(jnp.float32))
    if what != "dw":
      assert np.isnan(got[first_free_block:]).all(), f"{what}: padding blocks were written"
      got, want = got[:total], want[:total]
    _assert_matches(got, want, f"fill_padding=False: {what}", rtol=rtol)


@pytest.mark.parametrize("layout", ["zeros_and_skew", "padding_rows", "rows_not_multiple_of_128"])
def test_interpreted_warp_specialised_kernels_match_oracle(layout):
  """Output widths of 256 take the two-consumer gmm (fwd and dgrad): its work items, row-range
  stores and past-the-end zero items, under the interpreter."""
  num_rows, sizes = LAYOUTS[layout]
  k = m = 256
  assert gemm_api.tile_config("fwd", k, m, jnp.bfloat16).consumers == 2
  assert gemm_api.tile_config("dgrad", k, m, jnp.bfloat16).consumers == 2
  x, w, dy = _data(num_rows, sizes, k, m, jnp.bfloat16, seed=hash(layout) % 997)
  _check_interpreted(layout, x, w, dy, sizes)


def _ws_products(x, w, dy, sizes, implementation_kwargs):
  """The two-consumer kernels' forward, dgrad and wgrad, called directly (any output width)."""
  cfg = mosaic.TileConfig(consumers=2, steps=3)
  gs = jnp.asarray(sizes, jnp.int32)
  y = jax.jit(lambda x, w: mosaic.gmm(x, w, gs, out_dtype=jnp.float32, cfg=cfg,
                                      **implementation_kwargs))(x, w)
  dx = jax.jit(lambda dy, w: mosaic.gmm(dy, w, gs, transpose_rhs=True, out_dtype=jnp.float32,
                                        cfg=cfg, **implementation_kwargs))(dy, w)
  # The two-consumer wgrad does not run under the interpreter: there, the one-consumer one.
  wgrad_cfg = cfg if "interpret" not in implementation_kwargs else mosaic.TileConfig()
  dw = jax.jit(lambda x, dy: mosaic.tgmm(x, dy, gs, out_dtype=jnp.float32, cfg=wgrad_cfg,
                                         **implementation_kwargs))(x, dy)
  return y, dx, dw


def _check_ws_products(num_rows, sizes, k, m, dtype, implementation_kwargs, rtol):
  x, w, dy = _data(num_rows, sizes, k, m, dtype, seed=k + m)
  # x and dy keep their NaN rows past the groups: they must never reach an output.
  y, dx, dw = _ws_products(x, w, dy, sizes, implementation_kwargs)
  want_y, want_dx, want_dw = _oracle(x, w, jnp.nan_to_num(dy), sizes)
  _assert_matches(y, want_y, f"y (output width {m})", rtol=rtol)
  _assert_matches(dx, want_dx, f"dx (output width {k})", rtol=rtol)
  _assert_matches(dw, want_dw, f"dw (output width {m})", rtol=rtol)
  total = sum(sizes)
  assert not np.asarray(y)[total:].any() and not np.asarray(dx)[total:].any()


@pytest.mark.parametrize("num_sms", [3, 4, 7])
def test_interpreted_warp_specialised_half_band_matches_oracle(num_sms):
  """Output widths that are an odd multiple of 128 end in a half column band (fwd, dgrad and
  wgrad, the two-consumer kernels). On 4 SMs every gmm tile runs whole; on 3 the forward's
  last wave and on 7 the dgrad's run as row halves (at most half full)."""
  num_rows, sizes = LAYOUTS["zeros_and_skew"]
  _check_ws_products(num_rows, sizes, 384, 128, jnp.bfloat16,
                     dict(num_sms=num_sms, interpret=gemm_api._interpret_params()), rtol=1e-5)


@pytest.mark.parametrize("layout", ["zeros_and_skew", "padding_rows"])
def test_xla_fallback_matches_oracle_and_check_grads(layout):
  num_rows, sizes = LAYOUTS[layout]
  # ragged_dot multiplies padding rows by zero: finite garbage only.
  x, w, dy = _data(num_rows, sizes, 16, 24, jnp.float32, seed=7, garbage=3.0)
  y, dx, dw = _run(x, w, dy, sizes, "xla")
  for got, want, what in zip((y, dx, dw), _oracle(x, w, dy, sizes), "y dx dw".split()):
    _assert_matches(got, want, f"{layout}: {what}", rtol=1e-5)
  gs = jnp.asarray(sizes, jnp.int32)
  check_grads(lambda x, w: grouped_matmul(x, w, gs, implementation="xla"), (x[:64], w), order=1,
              modes=("rev",), atol=1e-2, rtol=1e-2)


def test_auto_falls_back_with_a_logged_reason(caplog):
  if gpu_count():
    pytest.skip("checks the CPU fallback")
  gemm_api._log_once.cache_clear()
  x, w, _ = _data(64, [30, 34], 16, 8, jnp.float32, seed=1)
  gs = jnp.array([30, 34], jnp.int32)
  with caplog.at_level(logging.INFO, logger="jax_moe_dispatch"):
    got = grouped_matmul(x, w, gs)
  assert any("ragged_dot" in r.getMessage() and "not a GPU" in r.getMessage() for r in caplog.records)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.lax.ragged_dot(x, w, gs)))


def test_mosaic_refuses_with_the_fix():
  x, w, _ = _data(64, [30, 34], 16, 8, jnp.float32, seed=1)
  with pytest.raises(ValueError, match="implementation='auto'"):
    grouped_matmul(x, w, jnp.array([30, 34], jnp.int32), implementation="mosaic")


def test_blocks_per_sm_only_for_the_one_consumer_wgrad():
  bf16 = jnp.bfloat16
  two = mosaic.TileConfig(blocks_per_sm=2)
  assert mosaic.tgmm_unsupported((256, 128), (256, 128), bf16, bf16, two) is None
  assert "blocks_per_sm" in mosaic.tgmm_unsupported((256, 128), (256, 128), bf16, bf16,
                                                    mosaic.TileConfig(blocks_per_sm=3))
  assert "blocks_per_sm" in mosaic.tgmm_unsupported(
      (256, 128), (256, 128), bf16, bf16, mosaic.TileConfig(consumers=2, blocks_per_sm=2))
  assert "blocks_per_sm" in mosaic.gmm_unsupported((256, 128), (2, 128, 128), bf16, bf16,
                                                   False, two)


@pytest.mark.parametrize("seed", range(8))
def test_work_items_cover_every_row_once(seed):
  """The two-consumer gmm's plan: each row up to the first all-zero block is in exactly one
  item, of its own group (or of the past-the-end group G), items starting near their
  group's first row; the all-zero blocks are zero chunks, each in exactly one iteration's run."""
  rng = np.random.default_rng(seed)
  block_m, num_groups = 128, int(rng.integers(1, 9))
  num_blocks = int(rng.integers(1, 40))
  num_rows = block_m * num_blocks
  num_bands, num_sms = int(rng.integers(1, 9)), int(rng.integers(1, 140))
  row_chunks = int(rng.integers(1, 33))
  # Half the seeds leave most rows past the groups; seed 0 has no rows at all.
  total = int(rng.integers(0, num_rows // (4 if seed % 2 else 1) + 1)) if seed else 0
  sizes = rng.multinomial(total, np.ones(num_groups) / num_groups)
  plan = gemm_plan.work_plan(jnp.asarray(sizes, jnp.int32), num_rows, block_m=block_m,
                             block_k=64, interpret=True)
  groups, row0s, los, his = (np.asarray(a) for a in plan.items)
  item_end, zero_from_plan = np.asarray(plan.item_end), plan.zero_from
  zero_from = -(-total // block_m)
  assert zero_from_plan.shape == (1,) and int(zero_from_plan[0]) == zero_from
  starts = np.concatenate([[0], np.cumsum(sizes)])
  align = gemm_plan.ROW_ALIGN
  owner = np.full(num_rows, -1)
  for g, row0, lo, hi in zip(groups, row0s, los, his):
    assert 0 <= lo <= hi <= block_m and row0 % align == 0
    if hi > lo:  # Blocks from the group's first row (rounded down), block_m rows apart.
      assert (row0 - starts[g] // align * align) % block_m == 0
    rows = slice(row0 + lo, row0 + hi)
    assert (owner[rows] == -1).all(), "a row is in two items"
    owner[rows] = g
  want = np.repeat(np.arange(num_groups + 1), list(sizes) + [zero_from * block_m - total])
  np.testing.assert_array_equal(owner[:zero_from * block_m], want)
  assert (owner[zero_from * block_m:] == -1).all(), "all-zero blocks are no items"
  used = his > los
  assert not used[used.sum():].any(), "unused items must come last"
  # Cost follows the real rows: ceil(rows / block_m) items per group (its rows from the
  # aligned start), none per group boundary.
  spans = [e - b // align * align for b, e in zip(starts[:-1], starts[1:]) if e > b]
  spans += [zero_from * block_m - total + total % align] if zero_from * block_m > total else []
  assert used.sum() == sum(-(-s // block_m) for s in spans)
  assert used.sum() <= plan.num_items == gemm_plan.max_items(num_rows, block_m, num_groups)
  assert len(groups) >= plan.num_items and (groups[~used] == num_groups).all()
  assert (np.diff(row0s[used] + los[used]) > 0).all(), "items stay in row order"
  # Zero chunks: every chunk of every all-zero block exactly once, in near-equal runs over the
  # loop's iterations with a product (a tile or half of one) and larger ones over the idle
  # iterations of the last wave (at least one wave of iterations).
  num_iterations = mosaic._max_iterations(plan.num_items, num_bands, num_sms)
  zero_share = mosaic._zero_shares(item_end[num_groups] * num_bands, zero_from_plan[0],
                                   num_blocks=num_blocks, row_chunks=row_chunks, num_sms=num_sms,
                                   num_iterations=num_iterations, block_m=block_m)
  zfirst, zcount = (np.asarray(a) for a in zero_share(jnp.arange(num_iterations, dtype=jnp.int32)))
  chunk_owner = np.zeros(num_blocks * row_chunks, int)
  for first, count in zip(zfirst, zcount):
    chunk_owner[first:first + count] += 1
  np.testing.assert_array_equal(chunk_owner, np.arange(num_blocks * row_chunks) >= zero_from * row_chunks)
  busy = used.sum() * num_bands
  halves = busy % num_sms and 2 * (busy % num_sms) <= num_sms
  products = busy + (busy % num_sms if halves else 0)
  slots = min(max(-(-busy // num_sms), 1) * num_sms, num_iterations)
  assert (item_end[num_groups:] == used.sum()).all()
  np.testing.assert_array_equal(item_end[:num_groups + 1],
                                np.cumsum([(groups[used] == g).sum() for g in range(num_groups + 1)]))
  assert mosaic._loop_slots(item_end[num_groups] * num_bands, num_sms, num_iterations) == slots
  assert int(mosaic._product_iterations(busy, num_sms, block_m)) == products <= slots
  assert not zcount[slots:].any(), "no zeros past the last wave"
  # A product's iteration is one share, an idle one _IDLE_SHARES; a share is per or per + 1.
  shares = mosaic._IDLE_SHARES
  per = (num_blocks - zero_from) * row_chunks // (products + shares * (slots - products))
  assert ((zcount[:products] >= per) & (zcount[:products] <= per + 1)).all(), "even runs"
  assert ((zcount[products:slots] >= shares * per) &
          (zcount[products:slots] <= shares * (per + 1))).all()


@pytest.mark.parametrize("seed", range(6))
def test_plan_kernel_matches_its_xla_specification(seed):
  """The one-kernel work plan equals :func:`xla_work_plan` element for element, padding
  included; odd seeds have hundreds of groups (several programs rank them) and many rows
  (several programs write the items)."""
  rng = np.random.default_rng(seed)
  num_groups = int(rng.integers(100, 300) if seed % 2 else rng.integers(1, 20))
  num_rows = 128 * int(rng.integers(1, 100))
  sizes = rng.multinomial(int(rng.integers(0, num_rows + 1)),
                          rng.dirichlet(np.full(num_groups, 0.3)))
  group_sizes = jnp.asarray(sizes, jnp.int32)
  kernel = gemm_plan.work_plan(group_sizes, num_rows, block_m=128, block_k=64, interpret=True)
  spec = gemm_plan.xla_work_plan(group_sizes, num_rows, block_m=128, block_k=64)
  for got, want in zip(jax.tree.leaves(kernel), jax.tree.leaves(spec)):
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_plan_without_pallas_triton_runs_on_xla_and_says_so(monkeypatch, caplog):
  monkeypatch.setattr(gemm_plan, "plt", None)
  gemm_plan._log_xla_plan_once.cache_clear()
  group_sizes = jnp.asarray([5, 0, 300], jnp.int32)
  with caplog.at_level(logging.WARNING, logger="jax_moe_dispatch"):
    plan = gemm_plan.work_plan(group_sizes, 384, block_m=128, block_k=64)
  assert "no Pallas-Triton backend" in caplog.text
  want = gemm_plan.xla_work_plan(group_sizes, 384, block_m=128, block_k=64)
  for got, ref in zip(jax.tree.leaves(plan), jax.tree.leaves(want)):
    np.testing.assert_array_equal(got, ref)
  gemm_plan._log_xla_plan_once.cache_clear()


@pytest.mark.parametrize("seed", range(6))
def test_loop_runs_every_tile_once(seed):
  """The two-consumer gmm's loop: every tile in exactly one iteration, or, where the last
  wave is at most half full, each of that wave's tiles in two iterations as its two row
  halves; the product iterations come first."""
  rng = np.random.default_rng(seed)
  num_sms = int(rng.integers(1, 140))
  busy = int(rng.integers(0, 6 * num_sms))
  if seed == 0:  # A last wave of exactly half the SMs.
    busy = 3 * num_sms + num_sms // 2
  slots = int(mosaic._loop_slots(busy, num_sms, 10 ** 6))
  tile, half = (np.asarray(a) for a in mosaic._iteration_tile(
      jnp.arange(slots, dtype=jnp.int32), busy, num_sms, 128))
  products = int(mosaic._product_iterations(busy, num_sms, 128))
  assert (tile[:products] < busy).all() and (tile[products:] >= busy).all()
  left = busy % num_sms
  split = left > 0 and 2 * left <= num_sms
  runs = {}
  for t, h in zip(tile[:products], half[:products]):
    runs.setdefault(int(t), []).append(int(h))
  assert sorted(runs) == list(range(busy))
  for t, hs in runs.items():
    assert sorted(hs) == ([0, 1] if split and t >= busy - left else [-1]), (t, hs)
  # 64-row tiles have no halves (a wgmma takes 64 rows at least).
  assert int(mosaic._product_iterations(busy, num_sms, 64)) == busy


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("snake", [False, True])
def test_wgrad_tiles_dealt_once(seed, snake):
  """Both wgrads' schedules: every (group, K block, M band) tile in exactly one valid loop
  step, with its group's row range; the snake hands each wave's longest tiles out first."""
  rng = np.random.default_rng(seed)
  num_groups, grid_m, grid_n = int(rng.integers(1, 20)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
  num_sms, block = int(rng.integers(1, 140)), 64
  sizes = rng.multinomial(int(rng.integers(0, 5000)), rng.dirichlet(np.ones(num_groups)))
  plan = gemm_plan.work_plan(jnp.asarray(sizes, jnp.int32), 5120, block_m=128, block_k=block,
                             interpret=True)
  starts, ends, first, steps = plan.group_blocks
  order = plan.order if snake else None
  assert sorted(np.asarray(plan.order)) == list(range(len(plan.order))), "a permutation"
  np.testing.assert_array_equal(np.asarray(steps)[:num_groups],
                                [-(-e // block) - b // block if e > b else 0
                                 for b, e in zip(np.cumsum(sizes) - sizes, np.cumsum(sizes))])
  num_tiles = num_groups * grid_m * grid_n
  t = jnp.arange(mosaic._wgrad_steps(num_tiles, num_sms), dtype=jnp.int32)
  valid, g, mi, ni, start, end, _, nsteps = (np.asarray(a) for a in mosaic._wgrad_tile(
      t, num_sms, grid_m, grid_n, num_groups, order, starts, ends, first, steps))
  assert valid.sum() == num_tiles and not nsteps[~valid].any()
  tiles = sorted(zip(g[valid], mi[valid], ni[valid]))
  assert tiles == [(a, b, c) for a in range(num_groups) for b in range(grid_m) for c in range(grid_n)]
  want_ends = np.cumsum(sizes)
  np.testing.assert_array_equal(end[valid], want_ends[g[valid]])
  np.testing.assert_array_equal(start[valid], (want_ends - sizes)[g[valid]])
  if snake:  # Ranked by row blocks: no tile of a wave is longer than any of the wave before.
    waves = [nsteps[w:w + num_sms][valid[w:w + num_sms]] for w in range(0, len(t), num_sms)]
    for before, after in zip(waves, waves[1:]):
      assert after.max() <= before.min()


def test_argument_errors():
  x = jnp.ones((8, 4), jnp.bfloat16)
  w = jnp.ones((2, 4, 3), jnp.bfloat16)
  with pytest.raises(ValueError, match="group_sizes"):
    grouped_matmul(x, w, jnp.array([8], jnp.int32))
  with pytest.raises(ValueError, match=r"x \[N, K\]"):
    grouped_matmul(x, jnp.ones((2, 5, 3), jnp.bfloat16), jnp.array([4, 4], jnp.int32))
  with pytest.raises(TypeError, match="dtype"):
    grouped_matmul(x, w.astype(jnp.float32), jnp.array([4, 4], jnp.int32))
  with pytest.raises(ValueError, match="implementation"):
    grouped_matmul(x, w, jnp.array([4, 4], jnp.int32), implementation="cutlass")


# ---------------------------------------------------------------------------- GPU


def _hopper_or_skip():
  why = gemm_api._hopper()
  if why:
    pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("layout", ["balanced", "skewed", "zeros", "one_group", "padding_4x", "odd_rows"])
def test_gpu_kernels_match_oracle(layout, dtype):
  _hopper_or_skip()
  rng = np.random.default_rng(11)
  num_rows, groups = 4096, 8
  if layout == "balanced":
    sizes = [512] * groups
  elif layout == "skewed":
    p = 1.0 / np.arange(1, groups + 1) ** 0.8
    sizes = list(np.floor(p / p.sum() * num_rows).astype(int))
    sizes[0] += num_rows - sum(sizes)
  elif layout == "zeros":
    sizes = [0, 1000, 0, 1, 2047, 127, 0, 900]
  elif layout == "one_group":
    sizes = [0, 0, 0, 4000, 0, 0, 0, 1]
  elif layout == "padding_4x":
    sizes = list(rng.multinomial(num_rows // 4, [1 / groups] * groups))
  else:
    num_rows, sizes = 4000, list(rng.multinomial(3990, [1 / groups] * groups))
  x, w, dy = _data(num_rows, sizes, 512, 384, dtype, seed=3)
  y, dx, dw = _run(x, w, dy, sizes, "mosaic")
  tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3
  for got, want, what in zip((y, dx, dw), _oracle(x, w, jnp.nan_to_num(dy), sizes), "y dx dw".split()):
    _assert_matches(got, want, f"{layout}/{jnp.dtype(dtype).name}: {what}", rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("k,m", [(384, 384), (512, 1024)])  # One consumer; two.
def test_gpu_kernels_without_fill_padding_match_oracle_on_real_rows(k, m):
  _hopper_or_skip()
  sizes = [300, 0, 555, 169, 0, 1, 2]  # 1027 real rows in a buffer of 4096.
  x, w, dy = _data(4096, sizes, k, m, jnp.bfloat16, seed=k)
  y, dx, dw = _run(x, w, dy, sizes, "mosaic", fill_padding=False)
  total = sum(sizes)
  for got, want, what in zip((y, dx, dw), _oracle(x, w, jnp.nan_to_num(dy), sizes), "y dx dw".split()):
    if what != "dw":
      got, want = got[:total], want[:total]
    _assert_matches(got, want, f"fill_padding=False ({k}, {m}): {what}", rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["skewed", "zeros", "padding_4x"])
def test_gpu_warp_specialised_half_band_matches_oracle(layout):
  """The two-consumer kernel at output widths 384 and 640 (odd multiples of 128): the last
  column band's w tile runs past the end of w, its second consumer stores nothing."""
  _hopper_or_skip()
  num_rows = 2048
  sizes = {"skewed": [1200, 3, 500, 0, 345], "zeros": [0, 0, 2048, 0, 0],
           "padding_4x": [100, 0, 130, 270, 12]}[layout]
  _check_ws_products(num_rows, sizes, 640, 384, jnp.bfloat16, {}, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_backward_scratch_is_linear_in_rows():
  _hopper_or_skip()
  n, k, m, g = 16384, 2048, 1024, 16
  x = jax.ShapeDtypeStruct((n, k), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((g, k, m), jnp.bfloat16)
  dy = jax.ShapeDtypeStruct((n, m), jnp.bfloat16)
  gs = jax.ShapeDtypeStruct((g,), jnp.int32)

  def fwd_bwd(x, w, gs, dy):
    y, pullback = jax.vjp(lambda x, w: grouped_matmul(x, w, gs, implementation="mosaic"), x, w)
    return y, *pullback(dy)

  scratch = jax.jit(fwd_bwd).lower(x, w, gs, dy).compile().memory_analysis().temp_size_in_bytes
  assert scratch <= 2 * n * (k + m) * 2, f"scratch {scratch} bytes is not O(N (K + M))"


@pytest.mark.gpu
def test_gpu_grouped_experts_layer_matches_float64():
  _hopper_or_skip()
  from flax import nnx

  from jax_moe_dispatch.nn.layers import GroupedExperts

  experts = GroupedExperts(4, 256, 128, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                           gemm_implementation="mosaic")
  sizes = [300, 0, 555, 169]
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(1280, 256)), jnp.bfloat16)
  probs = jnp.asarray(rng.uniform(0.2, 1.0, size=(1280,)), jnp.float32)
  y = np.asarray(experts(x, jnp.asarray(sizes, jnp.int32), probs).astype(jnp.float32), np.float64)
  wgu = np.asarray(experts.w_gate_up.get_value(), np.float64)
  wd = np.asarray(experts.w_down.get_value(), np.float64)
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  want = np.zeros_like(y)
  row = 0
  for e, size in enumerate(sizes):
    r = slice(row, row + size)
    gate, up = np.split(x64[r] @ wgu[e], 2, axis=-1)
    want[r] = (gate / (1 + np.exp(-gate)) * up * np.asarray(probs)[r, None]) @ wd[e]
    row += size
  _assert_matches(y, want, "GroupedExperts (bf16, mosaic)", rtol=3e-2)
