"""Grouped GEMM kernels for Hopper, written in Pallas Mosaic-GPU.

Two persistent kernels (one thread block per SM, a ``plgpu.nd_loop`` over the
output tiles), each tile a TMA-fed ``wgmma`` pipeline over the reduction axis:

* :func:`gmm`: ``out[r] = x[r] @ w[group(r)]`` (or ``@ w[group(r)].T``), the
  forward pass and dgrad. The rows are cut into blocks of ``block_m``; a block
  that lies inside one group is one pipeline; a block that straddles groups runs
  one pipeline per group it touches and keeps, for each, only that group's rows
  (a select, so garbage in other rows cannot leak in). Blocks past
  ``sum(group_sizes)`` only store zeros: the cost follows the real rows, not
  the static row count.
* :func:`tgmm`: ``out[g] = x_g.T @ y_g`` for every group, the wgrad. Each tile
  pipelines over the row blocks of its group only; the first and last block of
  a group are masked (select) to the group's rows. Empty groups give zeros.

A small plan (per row block: the first and last group it touches, whether it
lies inside one group) is computed by XLA before the kernel from
``group_sizes``; nothing synchronises with the host.

Shapes a kernel cannot take are the caller's to route elsewhere
(:func:`gmm_unsupported` / :func:`tgmm_unsupported` say why).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["TileConfig", "gmm", "gmm_unsupported", "tgmm", "tgmm_unsupported"]

_DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class TileConfig:
  """Tile sizes of one kernel launch.

  Attributes:
    block_m: rows of an output tile (:func:`gmm`), or of ``K`` (:func:`tgmm`).
    block_n: columns of an output tile.
    block_k: depth of one pipeline step (the reduction axis; for
      :func:`tgmm`, rows of ``x``/``y`` per step).
    steps: pipeline stages in flight (TMA loads ahead of the ``wgmma``).
    grid_block_n: :func:`gmm` visits output tiles in bands of this many
      column tiles, every row block of a band before the next band
      (``plgpu.planar_snake``), so that a band of ``w`` stays in L2 while the
      rows stream past it.
  """

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  steps: int = 4
  grid_block_n: int = 1


def _check_dtypes(dtype_a, dtype_b) -> Optional[str]:
  if dtype_a != dtype_b:
    return f"operands differ in dtype ({dtype_a} vs {dtype_b})"
  if dtype_a not in _DTYPES:
    return f"dtype {dtype_a} (the kernel takes bfloat16 or float16)"
  return None


def gmm_unsupported(x_shape, w_shape, dtype_x, dtype_w, transpose_rhs: bool,
                    cfg: TileConfig) -> Optional[str]:
  """Why :func:`gmm` cannot take these operands, or ``None``."""
  why = _check_dtypes(dtype_x, dtype_w)
  if why:
    return why
  num_rows, k = x_shape
  _, wk, wn = w_shape
  n = wk if transpose_rhs else wn
  red = wn if transpose_rhs else wk
  if red != k:
    return f"contracting sizes differ ({k} vs {red})"
  if num_rows % cfg.block_m:
    return f"rows N={num_rows} are not a multiple of block_m={cfg.block_m}"
  if k % cfg.block_k:
    return f"K={k} is not a multiple of block_k={cfg.block_k}"
  if n % cfg.block_n:
    return f"output columns {n} are not a multiple of block_n={cfg.block_n}"
  return None


def tgmm_unsupported(x_shape, y_shape, dtype_x, dtype_y, cfg: TileConfig) -> Optional[str]:
  """Why :func:`tgmm` cannot take these operands, or ``None``."""
  why = _check_dtypes(dtype_x, dtype_y)
  if why:
    return why
  (rows, k), (rows_y, n) = x_shape, y_shape
  if rows != rows_y:
    return f"row counts differ ({rows} vs {rows_y})"
  if rows % cfg.block_k:
    return f"rows N={rows} are not a multiple of block_k={cfg.block_k}"
  if k % cfg.block_m:
    return f"K={k} is not a multiple of block_m={cfg.block_m}"
  if n % cfg.block_n:
    return f"N={n} is not a multiple of block_n={cfg.block_n}"
  return None


def _bounds(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  return ends - sizes, ends


def _row_plan(group_sizes: jax.Array, num_rows: int, block_m: int):
  """Per row block: ``(first group, last group, lies inside one group)`` as int32.

  Only groups with rows in the block count; a block past every group gets an
  empty range (first > last).
  """
  starts, ends = _bounds(group_sizes)
  total = ends[-1]
  num_blocks = num_rows // block_m
  lo = jnp.arange(num_blocks, dtype=jnp.int32) * block_m
  last_row = jnp.minimum(lo + block_m, total) - 1
  real = lo < total
  g_lo = jnp.searchsorted(ends, lo, side="right").astype(jnp.int32)
  g_hi = jnp.searchsorted(ends, last_row, side="right").astype(jnp.int32)
  g_safe = jnp.clip(g_lo, 0, group_sizes.shape[0] - 1)
  whole = real & (g_lo == g_hi) & (starts[g_safe] <= lo) & (ends[g_safe] >= lo + block_m)
  g_lo = jnp.where(real, g_lo, 1)
  g_hi = jnp.where(real, g_hi, 0)
  return g_lo, g_hi, whole.astype(jnp.int32), starts, ends


def _params() -> Any:
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _num_sms() -> int:
  dev = jax.devices()[0]
  return int(getattr(dev, "core_count", 0) or 132)


def _rows_iota(shape, row0, interpret):
  """Row index of every element of a ``shape`` register tile starting at ``row0``."""
  iota = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
  if interpret is None:  # The interpreter has no register layouts.
    iota = plgpu.layout_cast(iota, plgpu.Layout.WGMMA)
  return row0 + iota


def _mma(acc_ref, a_ref, b_ref, *, transpose_a: bool, transpose_b: bool, interpret) -> None:
  """``acc += op(a) @ op(b)`` on shared-memory tiles, one ``wgmma``.

  The interpreter has no transposed ``wgmma`` operands, so there a transposed
  operand is first copied, transposed, into a scratch tile (everything around
  the product is unchanged).
  """
  if interpret is None:
    a = plgpu.transpose_ref(a_ref, (1, 0)) if transpose_a else a_ref
    b = plgpu.transpose_ref(b_ref, (1, 0)) if transpose_b else b_ref
    plgpu.wgmma(acc_ref, a, b)
    return

  def transposed(ref, flag, then):
    if not flag:
      return then(ref)

    def scope(tmp):
      tmp[...] = ref[...].T
      return then(tmp)

    return pl.run_scoped(scope, plgpu.SMEM(ref.shape[::-1], ref.dtype))

  transposed(a_ref, transpose_a,
             lambda a: transposed(b_ref, transpose_b, lambda b: plgpu.wgmma(acc_ref, a, b)))


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
        out_dtype=None, cfg: TileConfig = TileConfig(), num_sms: Optional[int] = None,
        interpret: Any = None) -> jax.Array:
  """``out[r] = x[r] @ w[g]`` (``w[g].T`` if ``transpose_rhs``) for the rows ``r`` of group ``g``.

  Args:
    x: ``[N, K]``, ``N`` a multiple of ``cfg.block_m``.
    w: ``[G, K, M]`` (``[G, M, K]`` with ``transpose_rhs``).
    group_sizes: ``[G]`` int; groups are consecutive runs of rows from row 0.
    out_dtype: result dtype (default ``x.dtype``); accumulation is float32.
    cfg: tile sizes (:func:`gmm_unsupported` says whether they fit).
    num_sms: persistent thread blocks (default: the device's SM count).
    interpret: a Pallas Mosaic-GPU interpret-mode parameter object (tests).

  Returns:
    ``[N, M]``; rows past ``sum(group_sizes)`` are zero.
  """
  num_rows, k = x.shape
  m = w.shape[1] if transpose_rhs else w.shape[2]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  num_blocks = num_rows // bm
  grid_n = m // bn
  g_lo, g_hi, whole, starts, ends = _row_plan(group_sizes, num_rows, bm)

  def body(g_lo_ref, g_hi_ref, whole_ref, starts_ref, ends_ref, x_ref, w_ref, o_ref):
    @plgpu.nd_loop((num_blocks * grid_n,), collective_axes="sm")
    def _tile(info):
      if cfg.grid_block_n >= grid_n:  # One band: plain row-major order.
        b, ni = info.index[0] // grid_n, info.index[0] % grid_n
      else:
        b, ni = plgpu.planar_snake(info.index[0], (num_blocks, grid_n), 1, cfg.grid_block_n)
      row0 = b * bm

      def product(g):
        def scope(acc_ref):
          def step(_, x_smem, w_smem):
            _mma(acc_ref, x_smem, w_smem, transpose_a=False, transpose_b=transpose_rhs,
                 interpret=interpret)

          plgpu.emit_pipeline(
              step,
              grid=(k // bk,),
              in_specs=[
                  plgpu.BlockSpec((bm, bk), lambda kk: (b, kk), delay_release=1),
                  plgpu.BlockSpec((bn, bk) if transpose_rhs else (bk, bn),
                                  (lambda kk: (ni, kk)) if transpose_rhs else (lambda kk: (kk, ni)),
                                  delay_release=1),
              ],
              max_concurrent_steps=cfg.steps,
          )(x_ref, w_ref.at[g])
          return acc_ref[...]

        return pl.run_scoped(scope, plgpu.ACC((bm, bn)))

      @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), out_dtype))
      def _store(o_smem):
        @pl.when(whole_ref[b] != 0)
        def _inside_one_group():
          o_smem[...] = product(g_lo_ref[b]).astype(out_dtype)

        @pl.when(whole_ref[b] == 0)
        def _straddles_or_past_the_end():
          o_smem[...] = jnp.zeros((bm, bn), out_dtype)
          rows = _rows_iota((bm, bn), row0, interpret)

          @pl.loop(g_lo_ref[b], g_hi_ref[b] + 1)
          def _group(g):
            start, end = starts_ref[g], ends_ref[g]

            @pl.when(end > start)
            def _():
              part = product(g).astype(out_dtype)
              keep = (rows >= start) & (rows < end)
              o_smem[...] = jnp.where(keep, part, o_smem[...])

        plgpu.commit_smem()

        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[pl.ds(row0, bm), pl.ds(ni * bn, bn)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((num_rows, m), out_dtype),
      grid=(num_sms or _num_sms(),),
      grid_names=("sm",),
      compiler_params=_params(),
      interpret=interpret,
  )
  return kernel(g_lo, g_hi, whole, starts, ends, x, w)


def tgmm(x: jax.Array, y: jax.Array, group_sizes: jax.Array, *, out_dtype=None,
         cfg: TileConfig = TileConfig(), num_sms: Optional[int] = None,
         interpret: Any = None) -> jax.Array:
  """``out[g] = x[rows of g].T @ y[rows of g]`` for every group (the weight gradient).

  Args:
    x: ``[N, K]``, ``N`` a multiple of ``cfg.block_k``.
    y: ``[N, M]``.
    group_sizes: ``[G]`` int; rows past their sum are never read.
    out_dtype: result dtype (default ``x.dtype``); accumulation is float32.
    cfg: ``block_m`` tiles ``K``, ``block_n`` tiles ``M``, ``block_k`` is the
      rows per pipeline step.

  Returns:
    ``[G, K, M]``; zero for empty groups.
  """
  num_rows, k = x.shape
  _, m = y.shape
  num_groups = group_sizes.shape[0]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  grid_m, grid_n = k // bm, m // bn
  starts, ends = _bounds(group_sizes)
  first_block = starts // bk
  num_steps = jnp.where(ends > starts, pl.cdiv(ends, bk) - first_block, 0).astype(jnp.int32)
  itemsize = jnp.dtype(x.dtype).itemsize

  def transforms(minor: int):  # Swizzled tiles, so that wgmma can read them transposed.
    swizzle = plgpu.find_swizzle(minor * itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))

  def body(starts_ref, ends_ref, first_ref, steps_ref, x_ref, y_ref, o_ref):
    @plgpu.nd_loop((num_groups * grid_m * grid_n,), collective_axes="sm")
    def _tile(info):
      idx = info.index[0]
      g = idx // (grid_m * grid_n)
      mi = (idx // grid_n) % grid_m
      ni = idx % grid_n
      start, end = starts_ref[g], ends_ref[g]
      first, steps = first_ref[g], steps_ref[g]

      def scope(acc_ref):
        def step(idx_k, x_smem, y_smem):
          i = idx_k[0]
          row0 = (first + i) * bk

          @pl.when((i == 0) | (i == steps - 1))
          def _mask_group_edges():
            rows_x = _rows_iota((bk, bm), row0, interpret)
            keep_x = (rows_x >= start) & (rows_x < end)
            x_smem[...] = jnp.where(keep_x, x_smem[...], jnp.zeros((), x_smem.dtype))
            rows_y = _rows_iota((bk, bn), row0, interpret)
            keep_y = (rows_y >= start) & (rows_y < end)
            y_smem[...] = jnp.where(keep_y, y_smem[...], jnp.zeros((), y_smem.dtype))
            plgpu.commit_smem()

          _mma(acc_ref, x_smem, y_smem, transpose_a=True, transpose_b=False, interpret=interpret)

        @pl.when(steps > 0)
        def _():
          plgpu.emit_pipeline(
              step,
              grid=(steps,),
              in_specs=[
                  plgpu.BlockSpec((bk, bm), lambda kk: (first + kk, mi), delay_release=1,
                                  transforms=transforms(bm)),
                  plgpu.BlockSpec((bk, bn), lambda kk: (first + kk, ni), delay_release=1,
                                  transforms=transforms(bn)),
              ],
              max_concurrent_steps=cfg.steps,
          )(x_ref, y_ref)

        return acc_ref[...]

      acc = pl.run_scoped(scope, plgpu.ACC((bm, bn)))

      @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), out_dtype))
      def _store(o_smem):
        o_smem[...] = acc.astype(out_dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[g, pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((num_groups, k, m), out_dtype),
      grid=(num_sms or _num_sms(),),
      grid_names=("sm",),
      compiler_params=_params(),
      interpret=interpret,
  )
  return kernel(starts, ends, first_block.astype(jnp.int32), num_steps, x, y)
