"""Grouped GEMM kernels for Hopper, written in Pallas Mosaic-GPU.

Two persistent kernels (one thread block per SM, a ``plgpu.nd_loop`` over the
output tiles), each tile a TMA-fed ``wgmma`` pipeline over the reduction axis:

* :func:`gmm`: ``out[r] = x[r] @ w[group(r)]`` (or ``@ w[group(r)].T``), the
  forward pass and dgrad, in two variants (``TileConfig.consumers``):

  - 2 (the fast one, where the output width allows): warp-specialised. A
    producer warpgroup streams the operands through shared memory for two
    consumer warpgroups that share a ``block_m x 2 block_n`` tile and store
    their halves while the producer loads the next tile. Work items are
    blocks of one group's rows, from about the group's first row on (a
    multiple of 8), so a group boundary costs no extra item; each computes
    its whole block and stores only its group's rows (power-of-two TMA
    pieces), so garbage in other rows cannot leak in. Rows
    past ``sum(group_sizes)`` get zero stores that the items issue during
    their products' pipeline steps, so they overlap the multiplications.
  - 1: one warpgroup per tile. A block that lies inside one group is one
    pipeline; a block that straddles groups runs one pipeline per group it
    touches and keeps, for each, only that group's rows (a select). Blocks
    past ``sum(group_sizes)`` only store zeros.

  Either way the cost follows the real rows, not the static row count.
* :func:`tgmm`: ``out[g] = x_g.T @ y_g`` for every group, the wgrad, one
  warpgroup per tile and two such thread blocks per SM
  (``TileConfig.blocks_per_sm``), or two consumers and a producer. Each tile
  pipelines over the row blocks of its group only; in a block that holds other
  rows, those rows of ``y`` are zeroed (a select), and of ``x`` the rows past
  ``sum(group_sizes)`` (:func:`_foreign_rows`). Empty groups give zeros.

A small plan from ``group_sizes`` says which rows each tile covers: for the
two-consumer forward/dgrad and both wgrads the :class:`~jax_moe_dispatch.gemm.plan.WorkPlan`
(one small Pallas-Triton kernel, which the caller may compute once for all
three products), for the one-consumer forward/dgrad per row block the first
and last group it touches (XLA). Nothing synchronises with the host.

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

from jax_moe_dispatch.gemm.plan import ROW_ALIGN, WorkPlan, work_plan

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
    consumers: :func:`gmm` only: 1 = one warpgroup loads and multiplies a
      ``block_m x block_n`` tile; 2 = warp-specialised, one producer
      warpgroup feeds two consumers that each own ``block_n`` of a
      ``block_m x 2 block_n`` tile and store it while the producer already
      loads the next one.
    blocks_per_sm: :func:`tgmm` with one consumer only: persistent thread
      blocks per SM. 2 runs two tiles' pipelines side by side on every SM,
      each with its own loads, ``wgmma`` and epilogue, so that one's
      pipeline fill and store overlap the other's products; both blocks'
      ``steps`` stages must fit in shared memory together.
  """

  block_m: int = 128
  block_n: int = 128
  block_k: int = 64
  steps: int = 4
  grid_block_n: int = 1
  consumers: int = 1
  blocks_per_sm: int = 1


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
  if cfg.consumers not in (1, 2):
    return f"consumers={cfg.consumers} (1 or 2)"
  if n % cfg.block_n:
    return f"output columns {n} are not a multiple of block_n={cfg.block_n}"
  if cfg.blocks_per_sm != 1:
    return f"blocks_per_sm={cfg.blocks_per_sm} (the wgrad's option; gmm takes 1)"
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
  if cfg.consumers not in (1, 2):
    return f"consumers={cfg.consumers} (1 or 2)"
  if cfg.consumers == 2 and cfg.block_k % 64:
    return f"block_k={cfg.block_k} (the two-consumer wgrad masks rows in tiles of 64)"
  if cfg.blocks_per_sm not in (1, 2) or (cfg.consumers == 2 and cfg.blocks_per_sm != 1):
    return f"blocks_per_sm={cfg.blocks_per_sm} (1, or 2 with one consumer)"
  return None


def _bounds(group_sizes: jax.Array) -> tuple[jax.Array, jax.Array]:
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  return ends - sizes, ends


def _wgrad_steps(num_tiles: int, num_sms: int) -> int:
  """Loop steps of a wgrad's ``nd_loop``: whole waves of ``num_sms`` (:func:`_wgrad_tile`)."""
  return pl.cdiv(num_tiles, num_sms) * num_sms


def _wgrad_tile(t, num_sms: int, grid_m: int, grid_n: int, num_groups: int, order_ref,
                starts_ref, ends_ref, first_ref, steps_ref):
  """Loop step ``t``'s wgrad tile (``nd_loop`` gives step ``t`` to SM ``t % num_sms``).

  A tile costs its group's row blocks, and groups differ. With ``order_ref``
  ``None`` the tiles are dealt in group order, so an SM gets the tiles of
  every ``num_sms / (grid_m * grid_n)``-th group only: fine where a group has
  about as many tiles as there are SMs (the one-consumer wgrad at K=2048,
  M=1024: 128 tiles), 1.3-1.4x the mean work where it has half as many (the
  two-consumer one there, Zipf groups). With ``order_ref`` (the groups by
  descending row blocks, ``WorkPlan.order``) the tiles are ranked longest
  first and dealt in a snake: wave ``w`` gives rank ``w * num_sms + p`` to SM
  ``p``, or to SM ``num_sms - 1 - p`` in odd waves (within 1.1x of the mean
  there). On an H200 the snake took the two-consumer wgrad from 156 to 149 us
  at that shape and from 1118 to 1103 us at (49152, 4096, 1408, 64), and the
  one-consumer wgrad with one block per SM from 145 to 150 us; with two
  blocks per SM (``num_sms`` counts blocks, 264: a group's 128 tiles are
  half a wave) from 136.6 to 133.6 us. So the wgrads deal one but for the
  one-consumer wgrad with one block per SM.

  Returns ``(valid, g, mi, ni, start, end, first, steps)``: whether the step
  has a tile (the last wave may be short), the group, the ``K`` block and ``M``
  band, and the group's rows ``[start, end)``, first row block and row blocks
  (0 where not valid).
  """
  per_group = grid_m * grid_n
  rank = t
  if order_ref is not None:
    wave, p = t // num_sms, t % num_sms
    rank = wave * num_sms + jnp.where(wave % 2 == 0, p, num_sms - 1 - p)
  valid = rank < num_groups * per_group
  rank = jnp.minimum(rank, num_groups * per_group - 1)
  g = rank // per_group if order_ref is None else order_ref[rank // per_group]
  j = rank % per_group
  return (valid, g, j // grid_n, j % grid_n, starts_ref[g], ends_ref[g], first_ref[g],
          jnp.where(valid, steps_ref[g], 0))


def _foreign_rows(row0, rows: int, start, end):
  """Whether rows ``[row0, row0 + rows)`` hold rows outside a group's ``[start, end)``.

  The wgrad zeroes those rows of ``y`` in such a step, so that they add
  nothing to the group's ``x.T @ y``; of ``x`` it zeroes only the rows past
  ``sum(group_sizes)``, which may hold anything (NaN too). Rows of other
  groups are the caller's data: ``0 * x`` is zero for any finite ``x``.
  """
  return (row0 < start) | (row0 + rows > end)


def _keep_rows(dst, src, row0, lo, hi, interpret) -> None:
  """``dst = src`` on the rows ``[lo, hi)`` of the block starting at row ``row0``, zeros
  elsewhere (shared-memory tiles of one shape; ``src`` may be ``dst``)."""
  rows = _rows_iota(dst.shape, row0, interpret)
  dst[...] = jnp.where((rows >= lo) & (rows < hi), src[...], jnp.zeros((), dst.dtype))


def _swizzled(minor: int, dtype) -> tuple:
  """Shared-memory transforms of a tile with ``minor`` columns of ``dtype``: tiled and
  swizzled, as TMA writes them and ``wgmma`` reads them (transposed too)."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(minor * itemsize * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _staging_cols(block_n: int, out_dtype) -> int:
  """Columns of a consumer's staging tile: 128 bytes wide (64 columns of a 16-bit output,
  32 of a float32 one), so that the pipeline's stages still fit in shared memory."""
  return min(block_n, 128 // jnp.dtype(out_dtype).itemsize)


def _ws_pipeline(step, context, *, grid, in_specs, cfg: TileConfig):
  """The warp-specialised pipeline of both two-consumer kernels: warpgroup 2 (axis
  ``"wg"``) streams ``in_specs`` through ``cfg.steps`` stages for consumers 0 and 1."""
  return plgpu.emit_pipeline_warp_specialized(
      step,
      grid=grid,
      memory_registers=40,
      in_specs=in_specs,
      wg_axis="wg",
      num_compute_wgs=2,
      max_concurrent_steps=cfg.steps,
      compute_context=context,
  )


def _accumulate_then_store(shape, out_dtype, store):
  """The ``compute_context`` of both two-consumer kernels' pipelines: a float32 accumulator
  of ``shape`` for the pipeline's run, then ``store`` of its values as ``out_dtype``."""
  def context(run):
    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(shape))
    def _(acc_ref):
      run(acc_ref)
      store(acc_ref[...].astype(out_dtype))

  return context


def _group_of(ends: jax.Array, rows: jax.Array) -> jax.Array:
  """How many of the sorted ``ends`` are <= each of ``rows`` (int32).

  One fused compare-and-count: ``jnp.searchsorted``'s default binary search
  is a while loop, which on a GPU costs a kernel launch and a device-to-host
  copy of the loop predicate per step, more than these tiny kernels' work.
  """
  return jnp.searchsorted(ends, rows, side="right", method="compare_all").astype(jnp.int32)


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
  g_lo = _group_of(ends, lo)
  g_hi = _group_of(ends, last_row)
  g_safe = jnp.clip(g_lo, 0, group_sizes.shape[0] - 1)
  whole = real & (g_lo == g_hi) & (starts[g_safe] <= lo) & (ends[g_safe] >= lo + block_m)
  g_lo = jnp.where(real, g_lo, 1)
  g_hi = jnp.where(real, g_hi, 0)
  return g_lo, g_hi, whole.astype(jnp.int32), starts, ends


def _plan_for(plan: Optional[WorkPlan], group_sizes: jax.Array, num_rows: int, *,
              block_m: Optional[int] = None, block_k: Optional[int] = None,
              interpret: Any = None) -> WorkPlan:
  """``plan``, checked against the kernel's rows, groups and blocks; a new one if ``None``."""
  if plan is None:
    return work_plan(group_sizes, num_rows, block_m=block_m or TileConfig.block_m,
                     block_k=block_k or TileConfig.block_k, interpret=interpret is not None)
  want = (num_rows, group_sizes.shape[0], block_m or plan.block_m, block_k or plan.block_k)
  have = (plan.num_rows, plan.num_groups, plan.block_m, plan.block_k)
  if have != want:
    raise ValueError(
        f"The work plan was made for (rows, groups, block_m, block_k) = {have}, the kernel runs "
        f"{want}. Fix: make it with work_plan(group_sizes, {num_rows}, block_m=..., block_k=...) "
        "from the kernel's TileConfig, or pass none.")
  return plan


def _num_sms() -> int:
  dev = jax.devices()[0]
  return int(getattr(dev, "core_count", 0) or 132)


def _persistent_kernel(body, name: str, out_shape, out_dtype, num_sms: Optional[int],
                       interpret: Any, **threads):
  """``body`` as a persistent kernel: one thread block per SM (axis ``"sm"``), warpgroup
  semantics; ``threads`` (``num_threads``, ``thread_name``) for warp-specialised bodies.
  ``name`` names the kernel in profiles (``{name}_mosaic_gpu_kernel``)."""
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct(out_shape, out_dtype),
      grid=(num_sms or _num_sms(),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret,
      kernel_name=name,
      **threads,
  )


def _gmm_name(transpose_rhs: bool) -> str:
  """Profile name of a :func:`gmm` kernel: the forward's, or the dgrad's (``w`` transposed)."""
  return "jmd_gmm_rhs_t" if transpose_rhs else "jmd_gmm"


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
    a = a_ref.transpose((1, 0)) if transpose_a else a_ref
    b = b_ref.transpose((1, 0)) if transpose_b else b_ref
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
        interpret: Any = None, plan: Optional[WorkPlan] = None,
        fill_padding: bool = True) -> jax.Array:
  """``out[r] = x[r] @ w[g]`` (``w[g].T`` if ``transpose_rhs``) for the rows ``r`` of group ``g``.

  Args:
    x: ``[N, K]``, ``N`` a multiple of ``cfg.block_m``.
    w: ``[G, K, M]`` (``[G, M, K]`` with ``transpose_rhs``).
    group_sizes: ``[G]`` int; groups are consecutive runs of rows from row 0.
    out_dtype: result dtype (default ``x.dtype``); accumulation is float32.
    cfg: tile sizes (:func:`gmm_unsupported` says whether they fit).
    num_sms: persistent thread blocks (default: the device's SM count).
    interpret: a Pallas Mosaic-GPU interpret-mode parameter object (tests).
    plan: the :func:`~jax_moe_dispatch.gemm.plan.work_plan` of ``N`` rows
      with ``cfg.block_m``, if the caller has it (else computed here); the
      two-consumer kernel's items. The one-consumer kernel plans by row block.
    fill_padding: store zeros in the rows past ``sum(group_sizes)``; if
      ``False``, no block of only such rows is written (nor, with two
      consumers, any such row at all).

  Returns:
    ``[N, M]``; rows past ``sum(group_sizes)`` are zero (with
    ``fill_padding``) or unspecified.
  """
  if cfg.consumers == 2:
    return _gmm_ws(x, w, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype, cfg=cfg,
                   num_sms=num_sms, interpret=interpret, plan=plan, fill_padding=fill_padding)
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

      def tile_store():
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

      if fill_padding:
        tile_store()
      else:  # A block past every group's rows (an empty group range) stores nothing.
        pl.when(g_lo_ref[b] <= g_hi_ref[b])(tile_store)

  kernel = _persistent_kernel(body, _gmm_name(transpose_rhs), (num_rows, m), out_dtype, num_sms,
                              interpret)
  return kernel(g_lo, g_hi, whole, starts, ends, x, w)


def tgmm(x: jax.Array, y: jax.Array, group_sizes: jax.Array, *, out_dtype=None,
         cfg: TileConfig = TileConfig(), num_sms: Optional[int] = None,
         interpret: Any = None, plan: Optional[WorkPlan] = None) -> jax.Array:
  """``out[g] = x[rows of g].T @ y[rows of g]`` for every group (the weight gradient).

  Args:
    x: ``[N, K]``, ``N`` a multiple of ``cfg.block_k``.
    y: ``[N, M]``.
    group_sizes: ``[G]`` int; rows past their sum are never read.
    out_dtype: result dtype (default ``x.dtype``); accumulation is float32.
    cfg: ``block_m`` tiles ``K``, ``block_n`` tiles ``M``, ``block_k`` is the
      rows per pipeline step.
    plan: the :func:`~jax_moe_dispatch.gemm.plan.work_plan` of ``N`` rows
      with ``cfg.block_k``, if the caller has it (else computed here): the
      groups' row blocks and their order.

  Returns:
    ``[G, K, M]``; zero for empty groups.
  """
  if cfg.consumers == 2:
    return _tgmm_ws(x, y, group_sizes, out_dtype=out_dtype, cfg=cfg, num_sms=num_sms,
                    interpret=interpret, plan=plan)
  num_rows, k = x.shape
  _, m = y.shape
  num_groups = group_sizes.shape[0]
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  grid_m, grid_n = k // bm, m // bn
  plan = _plan_for(plan, group_sizes, num_rows, block_k=bk, interpret=interpret)
  blocks = (num_sms or _num_sms()) * cfg.blocks_per_sm
  transforms = functools.partial(_swizzled, dtype=x.dtype)

  def body(order_ref, starts_ref, ends_ref, first_ref, steps_ref, x_ref, y_ref, o_ref):
    if cfg.blocks_per_sm == 1:
      order_ref = None  # Dealt in group order (_wgrad_tile).

    @plgpu.nd_loop((_wgrad_steps(num_groups * grid_m * grid_n, blocks),), collective_axes="sm")
    def _tile(info):
      valid, g, mi, ni, start, end, first, steps = _wgrad_tile(
          info.index[0], blocks, grid_m, grid_n, num_groups, order_ref, starts_ref, ends_ref,
          first_ref, steps_ref)
      total = ends_ref[num_groups - 1]

      def scope(acc_ref):
        def step(idx_k, x_smem, y_smem):
          row0 = (first + idx_k[0]) * bk

          @pl.when(_foreign_rows(row0, bk, start, end))
          def _mask_other_rows():
            pl.when(row0 + bk > total)(
                lambda: _keep_rows(x_smem, x_smem, row0, 0, total, interpret))
            _keep_rows(y_smem, y_smem, row0, start, end, interpret)
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

      @pl.when(valid)
      def _valid():
        acc = pl.run_scoped(scope, plgpu.ACC((bm, bn)))

        @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, bn), out_dtype))
        def _store(o_smem):
          o_smem[...] = acc.astype(out_dtype)
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(o_smem, o_ref.at[g, pl.ds(mi * bm, bm), pl.ds(ni * bn, bn)])
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = _persistent_kernel(body, "jmd_tgmm", (num_groups, k, m), out_dtype, blocks, interpret)
  return kernel(plan.order, *plan.group_blocks, x, y)


# Zero-chunk shares of an iteration of the last wave that has no product (a product's
# iteration has one): it has nothing else to do. H200, small shape with 4x padding rows:
# dgrad 186.3 -> 183.4 us from 1 to 4 shares, the forward unchanged; 12 slowed the forward.
_IDLE_SHARES = 4


def _zero_shares(busy, zero_from, *, num_blocks: int, row_chunks: int, num_sms: int,
                 num_iterations: int, block_m: int):
  """The zero chunks each loop iteration of :func:`_gmm_ws` stores: a function of the
  iteration ``t`` giving ``(first, count)``.

  The blocks from ``zero_from`` to ``num_blocks`` hold no row of any group;
  each is ``row_chunks`` chunks (the block's rows times one staging width of
  columns, numbered row-major from block 0), and the items' iterations store
  them while their products run, so that the zero stores overlap the
  multiplications instead of following them. The chunks go out in row-major
  runs over the iterations of the waves that hold the ``busy`` products (at
  least one wave, so that every SM takes a share when there are few
  products): one share for a product's iteration (a whole tile or half of
  one, :func:`_iteration_tile`) and ``_IDLE_SHARES`` for one of the last wave
  without a product, the shares as near-equal as that allows (share ``u``
  takes ``per + (u < extra)`` chunks). None past the last wave.
  BENCHMARKS.md has the measured cost of 4x padding rows.

  Scalar arithmetic on ``busy`` and ``zero_from``, computed in the kernel
  (as tables, the runs had cost two more small kernels per product pair): the
  kernel calls this once, before its loop, and the returned function in each
  iteration; the function takes arrays of ``t`` too (the tests).
  """
  products = _product_iterations(busy, num_sms, block_m)
  slots = _loop_slots(busy, num_sms, num_iterations)
  # Shares before iteration t: one per product iteration, _IDLE_SHARES per idle one.
  cap = lambda t: jnp.where(t <= products, t,
                            products + _IDLE_SHARES * (jnp.minimum(t, slots) - products))
  shares = cap(slots)  # >= 1: slots >= 1 and every iteration has a share.
  chunks = (num_blocks - zero_from) * row_chunks
  per, extra = chunks // shares, chunks % shares
  edge = lambda t: zero_from * row_chunks + cap(t) * per + jnp.minimum(cap(t), extra)

  def share(t):
    first = edge(t)
    return first, edge(t + 1) - first

  return share


def _iteration_tile(t, busy, num_sms: int, block_m: int):
  """Loop iteration ``t``'s product tile of :func:`_gmm_ws` and which rows of it: ``(tile,
  half)``, ``half`` -1 for the whole tile, 0 / 1 for its top / bottom ``block_m / 2`` rows.

  ``busy`` tiles fill whole waves of ``num_sms`` iterations and a last, partial
  one. Where that last wave is at most half full, its tiles run as halves on
  twice the SMs: they end in about 0.6 of a tile's time instead of a whole
  one (a half tile still streams all of ``w``'s band).
  """
  tail = busy // num_sms * num_sms
  in_tail = _tail_halves(busy, num_sms, block_m) & (t >= tail)
  return (jnp.where(in_tail, tail + (t - tail) // 2, t),
          jnp.where(in_tail, (t - tail) % 2, -1))


def _tail_halves(busy, num_sms: int, block_m: int):
  """Whether the last wave of ``busy`` tiles runs as halves (:func:`_iteration_tile`): where
  it is at most half full and a half tile is whole ``wgmma`` rows (a multiple of 64)."""
  left = busy % num_sms
  return (left > 0) & (2 * left <= num_sms) & (block_m % 128 == 0)


def _product_iterations(busy, num_sms: int, block_m: int):
  """Loop iterations that hold a product: ``busy``, plus one per tile run as two halves."""
  return busy + jnp.where(_tail_halves(busy, num_sms, block_m), busy % num_sms, 0)


def _max_iterations(num_items: int, num_bands: int, num_sms: int) -> int:
  """Static bound of :func:`_gmm_ws`'s loop: every item's tiles and one more wave."""
  return num_items * num_bands + num_sms


def _loop_slots(busy, num_sms: int, num_iterations: int):
  """Iterations of :func:`_gmm_ws`'s loop: the whole waves that hold its ``busy`` product
  iterations (at least one wave), at most ``num_iterations``.

  Not one per item of the static row count: at 4x padding rows most items are
  unused, and their empty iterations had cost the padded forward 2 us and the
  dgrad 7 us at the small benchmark shape (H200).
  """
  return jnp.minimum(jnp.maximum(pl.cdiv(busy, num_sms), 1) * num_sms, num_iterations)


def _store_rows(src, dst, lo, hi, block_m: int) -> None:
  """TMA-store rows ``[lo, hi)`` of the shared-memory tile ``src`` to the same rows of ``dst``.

  TMA boxes have static sizes, so a dynamic row range goes out as at most
  ``log2(block_m) + 1`` power-of-two pieces (largest first).
  """
  size = hi - lo
  start = lo
  piece = block_m
  while piece >= 1:
    @pl.when((size & piece) != 0)
    def _(start=start, piece=piece):
      plgpu.copy_smem_to_gmem(src.at[pl.ds(start, piece)], dst.at[pl.ds(start, piece)])
    start = start + (size & piece)
    piece //= 2


def _stage(staging, value) -> None:
  """Writes ``value`` to a consumer's staging tile once the TMA engine has read what its
  earlier stores staged there, and makes it visible to the engine."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  staging[...] = value
  plgpu.commit_smem()


def _store_consumer_tile(tile, staging, copy, *, block_n: int, has_columns=None) -> None:
  """Stores a consumer warpgroup's ``[rows, block_n]`` tile through its staging tile.

  ``tile`` is the registers' values (``None``: zeros, staged once for every
  slice); ``staging`` (``[rows, 128 bytes]``) takes 128 bytes of columns at a
  time and ``copy(src, j)`` issues the TMA store of slice ``j`` from it.
  ``has_columns``: whether this consumer has columns to store at all
  (``None``: always), false for the second consumer of a last, half-width
  band.
  """
  epi_n = staging.shape[-1]

  def slices():
    for j in range(block_n // epi_n):
      if tile is not None or not j:
        _stage(staging, jnp.zeros(staging.shape, staging.dtype) if tile is None
               else tile[:, j * epi_n:(j + 1) * epi_n])
      copy(staging, j)

  if has_columns is None:
    slices()
  else:
    pl.when(has_columns)(slices)


def _gmm_ws(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
           out_dtype=None, cfg: TileConfig = TileConfig(), num_sms: Optional[int] = None,
           interpret: Any = None, plan: Optional[WorkPlan] = None,
           fill_padding: bool = True, _interpretable: bool = False) -> jax.Array:
  """:func:`gmm` with ``cfg.consumers == 2``: one producer warpgroup feeds two consumers.

  Each work item is up to ``block_m`` rows of one group, in blocks from
  about the group's first row on (:class:`~jax_moe_dispatch.gemm.plan.WorkPlan`), times ``2 * block_n``
  output columns: the producer streams ``x`` rows and ``w[g]`` columns
  through shared memory while consumer warpgroup ``i`` accumulates columns
  ``[i * block_n, (i + 1) * block_n)`` and then stores only the item's rows
  (the producer already loads the next item during that epilogue); the last
  wave's tiles may run as row halves (:func:`_iteration_tile`). The rows past
  ``sum(group_sizes)`` get zeros without a product: those up to the next
  multiple of ``block_m`` as one more item, and the blocks after them as zero
  stores that the items issue during their pipeline steps (the TMA engine
  writes them while the tensor cores multiply; :func:`_zero_shares`), unless
  ``fill_padding`` is false: then neither runs.
  """
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  cta_n = 2 * bn
  hb = bm // 2  # Rows of a half tile (:func:`_iteration_tile`).
  if interpret is not None and not _interpretable:
    # The interpreter has no transposed wgmma, and it clamps a slice that runs past an
    # array's end where the TMA engine reads zeros (past w's last column in a half band;
    # past x's last row in a group's last item, whose output slice runs as far): give it
    # operands that need neither.
    if transpose_rhs:
      w = jnp.swapaxes(w, 1, 2)
    m = w.shape[2]
    w = jnp.pad(w, ((0, 0), (0, 0), (0, -m % cta_n)))
    x = jnp.pad(x, ((0, bm), (0, 0)))
    # The padded x has other rows than any caller's plan: plan anew.
    return _gmm_ws(x, w, group_sizes, out_dtype=out_dtype, cfg=cfg, num_sms=num_sms,
                   interpret=interpret, fill_padding=fill_padding, _interpretable=True)[:-bm, :m]
  num_rows, k = x.shape
  m = w.shape[1] if transpose_rhs else w.shape[2]
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  epi_n = _staging_cols(bn, out_dtype)
  num_groups = group_sizes.shape[0]
  # An output width that is an odd multiple of block_n ends in a half band: its w tile
  # runs past the last column (the TMA engine reads zeros there) and consumer 1 stores
  # nothing.
  grid_n = pl.cdiv(m, cta_n)
  row_chunks = m // epi_n
  sms = num_sms or _num_sms()
  plan = _plan_for(plan, group_sizes, num_rows, block_m=bm, interpret=interpret)
  transforms = _swizzled(bk, x.dtype)

  def pipeline(step, context):
    return _ws_pipeline(step, context, grid=(k // bk,), cfg=cfg, in_specs=[
        plgpu.BlockSpec((bm, bk), lambda kk: (0, kk), transforms=transforms, delay_release=1),
        plgpu.BlockSpec((cta_n, bk) if transpose_rhs else (bk, cta_n),
                        (lambda kk: (0, kk)) if transpose_rhs else (lambda kk: (kk, 0)),
                        transforms=transforms, delay_release=1),
    ])

  def body(group_ref, row0_ref, lo_ref, hi_ref, item_end_ref, zero_from_ref, x_ref, w_ref, o_ref):
    wg = jax.lax.axis_index("wg")
    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(x_ref.at[pl.ds(0, bm)],
                                                        w_ref.at[0].at[pl.ds(0, cta_n)]
                                                        if transpose_rhs else
                                                        w_ref.at[0].at[:, pl.ds(0, cta_n)]),
        o_smem=plgpu.SMEM((2, bm, epi_n), out_dtype),
        collective_axes="wg",
    )
    def _scope(allocs, o_smem):
      used_items = item_end_ref[num_groups]
      busy = used_items * grid_n  # Iterations with a product.
      num_iterations = _max_iterations(plan.num_items, grid_n, sms)
      # Without fill_padding no block is past the zero blocks: no zero chunk.
      zero_from = zero_from_ref[0] if fill_padding else num_rows // bm
      zero_share = _zero_shares(busy, zero_from, num_blocks=num_rows // bm,
                                row_chunks=row_chunks, num_sms=sms,
                                num_iterations=num_iterations, block_m=bm)

      @plgpu.nd_loop((_loop_slots(busy, sms, num_iterations),), collective_axes="sm")
      def _item(info):
        t = info.index[0]
        # Tile < used items x bands: a product, in bands of grid_block_n columns (the last
        # wave's maybe as row halves); after them the idle iterations of the last wave
        # (unused items: zero stores only).
        tile, half = _iteration_tile(t, busy, sms, bm)
        item, ni = tile // grid_n, tile % grid_n
        if cfg.grid_block_n < grid_n:
          s_item, s_ni = plgpu.planar_snake(tile, (jnp.maximum(used_items, 1), grid_n), 1,
                                            cfg.grid_block_n)
          item, ni = jnp.where(tile < busy, s_item, item), jnp.where(tile < busy, s_ni, ni)
        # An idle iteration has no item (its index can pass the last): group G + 1, neither
        # a product nor the zero item.
        idle = tile >= busy
        item = jnp.where(idle, 0, item)
        g = jnp.where(idle, num_groups + 1, group_ref[item])
        # A half tile's rows: [row0 + half * hb, + hb), of which it stores [lo, hi).
        in_half = half >= 0
        shift = jnp.maximum(half, 0) * hb
        span = jnp.where(in_half, hb, bm)
        lo = jnp.clip(lo_ref[item] - shift, 0, span)
        hi = jnp.clip(hi_ref[item] - shift, 0, span)
        row0 = pl.multiple_of(row0_ref[item] + shift, ROW_ALIGN)
        zfirst, zcount = zero_share(t)
        has_columns = ni * cta_n + wg * bn < m if m % cta_n else None

        def store(values, rows: int) -> None:
          """This consumer's ``[rows, bn]`` tile (``None``: zeros), the item's rows only."""
          def copy(src, j):
            col = ni * cta_n + wg * bn + j * epi_n
            _store_rows(src, o_ref.at[pl.ds(row0, rows), pl.ds(col, epi_n)], lo, hi, rows)

          staging = o_smem.at[wg] if rows == bm else o_smem.at[wg].at[pl.ds(0, rows)]
          _store_consumer_tile(values, staging, copy, block_n=bn, has_columns=has_columns)

        # Zero chunks [zfirst, zfirst + zcount), the even ones consumer 0's, the odd ones
        # consumer 1's: TMA stores of its staging tile, zeroed first (nothing rewrites it
        # before the epilogue, whose first write waits for their reads). With a product, a
        # few per pipeline step, so that they trickle out behind the operand loads.
        num_zero = (zcount - wg + 1) // 2
        has_zeros = (wg < 2) & (num_zero > 0)
        with_product = (g < num_groups) & (hi > lo)

        def zero_stores(first, last):
          @pl.loop(first, last)
          def _store(i):
            c = zfirst + 2 * i + wg
            chunk = o_ref.at[pl.ds(c // row_chunks * bm, bm), pl.ds(c % row_chunks * epi_n, epi_n)]
            plgpu.copy_smem_to_gmem(o_smem.at[wg], chunk)

        pl.when(has_zeros)(lambda: _stage(o_smem.at[wg], jnp.zeros(o_smem.shape[1:], o_smem.dtype)))

        pl.when(has_zeros & ~with_product)(lambda: zero_stores(0, num_zero))
        num_steps = k // bk

        def product(rows: int) -> None:
          """The item's product on its first ``rows`` rows from ``row0`` (all ``bm`` loaded)."""
          def step(idx, x_smem, w_smem, acc_ref):
            cols = pl.ds(wg * bn, bn)
            w_cols = w_smem.at[cols] if transpose_rhs else w_smem.at[:, cols]
            plgpu.wgmma(acc_ref, x_smem if rows == bm else x_smem.at[pl.ds(0, rows)],
                        w_cols.transpose((1, 0)) if transpose_rhs else w_cols)
            # Step s issues stores [ceil(s n / S), ceil((s + 1) n / S)): evenly over the S steps.
            first = (idx[0] * num_zero + num_steps - 1) // num_steps
            last = ((idx[0] + 1) * num_zero + num_steps - 1) // num_steps
            pl.when(has_zeros & (last > first))(lambda: zero_stores(first, last))
            plgpu.wgmma_wait(1)
            return acc_ref

          context = _accumulate_then_store((rows, bn), out_dtype,
                                           lambda values: store(values, rows))
          w_g = w_ref.at[g]
          cols = pl.ds(ni * cta_n, cta_n)
          pipeline(step, context)(x_ref.at[pl.ds(row0, bm)],
                                  w_g.at[cols] if transpose_rhs else w_g.at[:, cols],
                                  allocations=allocs)

        zero_item = (g == num_groups) & (hi > lo) & (wg < 2) & fill_padding
        pl.when(with_product & ~in_half)(lambda: product(bm))
        pl.when(zero_item & ~in_half)(lambda: store(None, bm))
        if bm % 128 == 0:  # Else no tile runs as halves (_tail_halves).
          pl.when(with_product & in_half)(lambda: product(hb))
          pl.when(zero_item & in_half)(lambda: store(None, hb))

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = _persistent_kernel(body, _gmm_name(transpose_rhs), (num_rows, m), out_dtype, sms,
                              interpret,
                              num_threads=3, thread_name="wg")
  return kernel(*plan.items, plan.item_end, plan.zero_from, x, w)


def _tgmm_ws(x: jax.Array, y: jax.Array, group_sizes: jax.Array, *, out_dtype=None,
             cfg: TileConfig = TileConfig(), num_sms: Optional[int] = None,
             interpret: Any = None, plan: Optional[WorkPlan] = None) -> jax.Array:
  """:func:`tgmm` with ``cfg.consumers == 2``: one producer warpgroup feeds two consumers.

  A work item is one group's ``block_m x 2 block_n`` output tile: the
  producer streams the group's row blocks of ``x`` (``block_m`` columns) and
  ``y`` (``2 block_n`` columns) through shared memory; consumer ``i``
  accumulates columns ``[i * block_n, (i + 1) * block_n)`` and stores them
  while the producer already loads the next item. In a row block that holds
  other rows, each consumer zeroes those rows in its own half of the ``y``
  tile; where the block runs past ``sum(group_sizes)`` also in its own copy of
  the ``x`` tile (the shared ``x`` tile is left as loaded, so the consumers
  never write the same memory; :func:`_foreign_rows`). The tiles are dealt to
  the SMs longest first, in a snake (:func:`_wgrad_tile`). An output width
  that is an odd multiple of ``block_n`` ends in a half band (the TMA engine
  reads zeros past the last column; consumer 1 stores nothing there). Empty
  groups store zeros.
  """
  if interpret is not None:
    raise NotImplementedError(
        "The two-consumer wgrad does not run under Pallas's GPU interpreter (it did not finish "
        "there). Fix: interpret a TileConfig with consumers=1.")
  bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
  cta_n = 2 * bn
  num_rows, k = x.shape
  m = y.shape[1]
  num_groups = group_sizes.shape[0]
  out_dtype = jnp.dtype(out_dtype or x.dtype)
  epi_n = _staging_cols(bn, out_dtype)
  grid_m, grid_n = k // bm, pl.cdiv(m, cta_n)
  plan = _plan_for(plan, group_sizes, num_rows, block_k=bk, interpret=interpret)
  sms = num_sms or _num_sms()
  transforms = functools.partial(_swizzled, dtype=x.dtype)

  def pipeline(step, context, first, steps):
    """The item's pipeline over its group's ``steps`` row blocks from block ``first``."""
    rows = lambda kk: (first + kk, 0)
    return _ws_pipeline(step, context, grid=(steps,), cfg=cfg, in_specs=[
        plgpu.BlockSpec((bk, bm), rows, transforms=transforms(bm), delay_release=1),
        plgpu.BlockSpec((bk, cta_n), rows, transforms=transforms(cta_n), delay_release=1),
    ])

  def body(order_ref, starts_ref, ends_ref, first_ref, steps_ref, x_ref, y_ref, o_ref):
    wg = jax.lax.axis_index("wg")
    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore, 0, cfg.steps).get_allocations(
            x_ref.at[:, pl.ds(0, bm)], y_ref.at[:, pl.ds(0, cta_n)]),
        x_own=plgpu.SMEM((2, bk, bm), x.dtype, transforms=transforms(bm)),
        o_smem=plgpu.SMEM((2, bm, epi_n), out_dtype),
        collective_axes="wg",
    )
    def _scope(allocs, x_own, o_smem):
      @plgpu.nd_loop((_wgrad_steps(num_groups * grid_m * grid_n, sms),), collective_axes="sm")
      def _item(info):
        valid, g, mi, ni, start, end, first, steps = _wgrad_tile(
            info.index[0], sms, grid_m, grid_n, num_groups, order_ref, starts_ref, ends_ref,
            first_ref, steps_ref)
        total = ends_ref[num_groups - 1]

        def store(tile) -> None:
          """This consumer's ``[bm, bn]`` tile (``None``: zeros)."""
          def copy(src, j):
            col = ni * cta_n + wg * bn + j * epi_n
            plgpu.copy_smem_to_gmem(src, o_ref.at[g, pl.ds(mi * bm, bm), pl.ds(col, epi_n)])

          _store_consumer_tile(tile, o_smem.at[wg], copy, block_n=bn,
                               has_columns=ni * cta_n + wg * bn < m if m % cta_n else None)

        def step(idx_k, x_smem, y_smem, acc_ref):
          cols = pl.ds(wg * bn, bn)
          y_cols = y_smem.at[:, cols]
          row0 = (first + idx_k[0]) * bk
          past = row0 + bk > total

          @pl.when(_foreign_rows(row0, bk, start, end))
          def _mask_other_rows():
            @pl.when(past)
            def _zero_x_past_the_groups():
              plgpu.wgmma_wait(0)  # The previous step's product may still read x_own[wg].
              _keep_rows(x_own.at[wg], x_smem, row0, 0, total, None)

            _keep_rows(y_cols, y_cols, row0, start, end, None)
            plgpu.commit_smem()

          def product(a_ref):
            plgpu.wgmma(acc_ref, a_ref.transpose((1, 0)), y_cols)

          pl.when(past)(lambda: product(x_own.at[wg]))
          pl.when(~past)(lambda: product(x_smem))
          plgpu.wgmma_wait(1)
          return acc_ref

        @pl.when(steps > 0)
        def _product():
          context = _accumulate_then_store((bm, bn), out_dtype, store)
          pipeline(step, context, first, steps)(x_ref.at[:, pl.ds(mi * bm, bm)],
                                                y_ref.at[:, pl.ds(ni * cta_n, cta_n)],
                                                allocations=allocs)

        @pl.when(valid & (steps == 0) & (wg < 2))
        def _empty_group():
          store(None)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  kernel = _persistent_kernel(body, "jmd_tgmm", (num_groups, k, m), out_dtype, sms, None,
                              num_threads=3, thread_name="wg")
  return kernel(plan.order, *plan.group_blocks, x, y)
