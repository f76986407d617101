"""The work plan of the grouped-GEMM kernels: which rows each tile covers, from ``group_sizes``.

Both Hopper kernels of :mod:`jax_moe_dispatch.gemm.mosaic` read a small plan
that only ``group_sizes`` decides:

* the forward/dgrad kernel (two consumers) runs *items*: blocks of
  ``block_m`` rows of one group, from the group's first row rounded down to a
  multiple of ``ROW_ALIGN``. Item ``j`` of group ``g`` is rows
  ``[align(start_g) + j block_m, + block_m)``, of which it stores the group's,
  so each group wastes only its last item's unused rows and up to
  ``ROW_ALIGN - 1`` before its first (rows of the neighbours, or past the
  last row, where the TMA engine reads zeros). The rows past
  ``sum(group_sizes)`` up to the next multiple of ``block_m`` form one more
  group, numbered ``G``, whose one item only stores zeros; the blocks after
  that (from ``zero_from`` on) are no items but zero chunks
  (``mosaic._zero_shares``). Items come in row order, the unused ones last.
* the wgrad kernels run per group over the group's ``block_k``-row blocks
  (``first_block`` and ``row_blocks`` of them) and deal the groups' tiles
  longest first (``order``).

:func:`work_plan` computes all of it in one Pallas-Triton kernel launch. As
XLA operations (:func:`xla_work_plan`, the readable specification, the tests'
oracle, and the fallback where ``jax.experimental.pallas.triton`` is missing:
JAX 0.11 deprecates that backend) the same plan takes six small kernels (two
prefix sums, a sort and the element-wise work around them): 8.6 us of a 355 us
forward+backward at ``(N, K, M, G) = (16384, 2048, 1024, 16)`` on an H200,
against 1.8 us for the one kernel (BENCHMARKS.md). The forward computes the
plan once and its backward reuses it (:func:`jax_moe_dispatch.gemm.grouped_matmul`).

Every array has a power-of-two length (the Triton lowering takes no other):
the per-group ones ``groups_width >= G + 1``, the per-item ones
``items_width >= max_items(...)``; the kernels read them by index only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

try:
  from jax.experimental.pallas import triton as plt
except ImportError:  # Deprecated in JAX 0.11; xla_work_plan stands in.
  plt = None

__all__ = ["ROW_ALIGN", "WorkPlan", "max_items", "work_plan", "xla_work_plan"]

logger = logging.getLogger("jax_moe_dispatch")

# Items start at multiples of this many rows: the TMA engine loads x's tiles (8 rows of
# 128 bytes, swizzled) from a global row that Mosaic GPU must prove a multiple of 8.
ROW_ALIGN = 8

# Elements of the one-hot matrices (rows x groups) that one program of the plan kernel
# reduces at once: items or groups per program = this / groups_width (at least 16). Smaller
# is faster, the programs running side by side (H200, us for 1024 / 2048 / 8192, 4 warps):
# 1.8 / 2.2 / 4.1 at 16 groups over 16384 rows; 2.9 / 3.4 / 6.3 at 32 groups over 262144
# rows; 3.8 / 3.8 / 9.9 at 64 groups (16 items per program already); 5.0 at 256 groups.
_CHUNK_ELEMENTS = 1024
_NUM_WARPS = 4


def max_items(num_rows: int, block_m: int, num_groups: int) -> int:
  """The most items a plan can hold: ``sum(ceil((size + s) / block_m))`` over the ``G + 1``
  groups, ``s < ROW_ALIGN`` the rows before each group's first, sizes summing to at most
  ``num_rows``."""
  return num_rows // block_m + (num_groups + 1) * (block_m + ROW_ALIGN - 2) // block_m


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _widths(num_rows: int, block_m: int, num_groups: int) -> tuple[int, int]:
  """``(groups_width, items_width)``: the plan's array lengths."""
  return _pow2(num_groups + 1), _pow2(max_items(num_rows, block_m, num_groups))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["item_group", "item_row0", "item_lo", "item_hi", "item_end", "zero_from",
                 "starts", "ends", "first_block", "row_blocks", "order"],
    meta_fields=["num_rows", "num_groups", "block_m", "block_k"],
)
@dataclasses.dataclass(frozen=True)
class WorkPlan:
  """The plan of ``G`` groups over ``num_rows`` rows (int32 arrays; :func:`work_plan`).

  Items (forward and dgrad, ``block_m`` rows; ``[items_width]``):
    item_group: the item's group (``G``: the zero item past the groups).
    item_row0: its block's first row, a multiple of ``ROW_ALIGN``.
    item_lo, item_hi: the rows ``[lo, hi)`` of its block that it stores
      (block-relative; empty for an unused item).
  Per group (``[groups_width]``):
    item_end: items of the groups up to this one; entry ``G`` counts the used items.
    zero_from: ``[1]``, the first ``block_m`` block past every group's rows.
    starts, ends: the group's rows ``[start, end)`` (``cumsum(group_sizes)``, unclamped).
    first_block, row_blocks: its ``block_k``-row blocks (none for an empty group).
    order: the groups by descending ``row_blocks``, ties by index (first ``G`` entries).
  """

  item_group: jax.Array
  item_row0: jax.Array
  item_lo: jax.Array
  item_hi: jax.Array
  item_end: jax.Array
  zero_from: jax.Array
  starts: jax.Array
  ends: jax.Array
  first_block: jax.Array
  row_blocks: jax.Array
  order: jax.Array
  num_rows: int
  num_groups: int
  block_m: int
  block_k: int

  @property
  def num_items(self) -> int:
    """The static bound of used items (:func:`max_items`)."""
    return max_items(self.num_rows, self.block_m, self.num_groups)

  @property
  def items(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    return self.item_group, self.item_row0, self.item_lo, self.item_hi

  @property
  def group_blocks(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    return self.starts, self.ends, self.first_block, self.row_blocks


def _cdiv(a, b: int):
  return (a + b - 1) // b


def _pick(one_hot, values):
  """``values[g]`` for each row's group, ``one_hot`` ``[rows, groups]``: a masked row sum."""
  return jnp.sum(jnp.where(one_hot, values[None, :], 0), axis=1)


class _Groups(NamedTuple):
  """The plan's per-group vectors, ``groups_width`` long (both formulations share them)."""

  csum: jax.Array  # cumsum(group_sizes): the groups' ends, unclamped.
  first: jax.Array  # The wgrad's first block_k block and number of blocks.
  blocks: jax.Array
  starts: jax.Array  # The items' groups: 0..G-1 clamped to num_rows, G up to zero_from.
  ends: jax.Array
  aligned: jax.Array  # starts rounded down to ROW_ALIGN.
  count: jax.Array  # Items per group, and their running sum.
  item_end: jax.Array
  zero_from: jax.Array  # Scalar: the first block_m block past every group's rows.


def _per_group(sizes, *, num_groups: int, num_rows: int, block_m: int, block_k: int) -> _Groups:
  """:class:`_Groups` from ``sizes`` (zero past group ``G - 1``); jnp operations that lower
  both to XLA and inside the Triton kernel."""
  gi = jnp.arange(sizes.shape[0], dtype=jnp.int32)
  csum = jnp.cumsum(sizes)
  first = (csum - sizes) // block_k
  blocks = jnp.where(sizes > 0, _cdiv(csum, block_k) - first, 0)
  ends = jnp.minimum(csum, num_rows)
  zero_from = _cdiv(jnp.max(ends), block_m)
  ends = jnp.where(gi < num_groups, ends, zero_from * block_m)
  starts = jnp.where(gi <= num_groups, jnp.minimum(csum - sizes, num_rows), ends)
  aligned = starts // ROW_ALIGN * ROW_ALIGN
  count = jnp.where(ends > starts, _cdiv(ends - aligned, block_m), 0)
  return _Groups(csum, first, blocks, starts, ends, aligned, count, jnp.cumsum(count),
                 zero_from)


def _plan_kernel(sizes_ref, group_ref, row0_ref, lo_ref, hi_ref, item_end_ref, zero_from_ref,
                 starts_ref, ends_ref, first_ref, blocks_ref, order_ref, *, num_rows: int,
                 num_groups: int, block_m: int, block_k: int, chunk_items: int,
                 chunk_groups: int):
  """Every program recomputes the per-group vectors (``groups_width`` wide, cheap); program
  ``i`` then writes items ``[i chunk_items, +chunk_items)`` and ranks groups
  ``[i chunk_groups, +chunk_groups)``; program 0 writes the per-group arrays."""
  pid = pl.program_id(0)
  width = item_end_ref.shape[0]
  gi = jnp.arange(width, dtype=jnp.int32)
  real = gi < num_groups
  sizes = plt.load(sizes_ref.at[pl.ds(0, width)], mask=real, other=0)
  v = _per_group(sizes, num_groups=num_groups, num_rows=num_rows, block_m=block_m,
                 block_k=block_k)
  used = jnp.max(v.item_end)

  @pl.when(pid == 0)
  def _groups():
    item_end_ref[...] = v.item_end
    zero_from_ref[...] = jnp.full(zero_from_ref.shape, v.zero_from, jnp.int32)
    starts_ref[...] = v.csum - sizes
    ends_ref[...] = v.csum
    first_ref[...] = v.first
    blocks_ref[...] = v.blocks

  @pl.when(pid * chunk_items < group_ref.shape[0])
  def _items():
    p = pid * chunk_items + jnp.arange(chunk_items, dtype=jnp.int32)
    g = jnp.sum((v.item_end[None, :] <= p[:, None]).astype(jnp.int32), axis=1)
    g = jnp.minimum(g, num_groups)
    one_hot = gi[None, :] == g[:, None]
    in_use = p < used
    row0 = _pick(one_hot, v.aligned) + (p - _pick(one_hot, v.item_end - v.count)) * block_m
    lo = jnp.where(in_use, jnp.maximum(_pick(one_hot, v.starts) - row0, 0), 0)
    hi = jnp.where(in_use, jnp.minimum(_pick(one_hot, v.ends) - row0, block_m), 0)
    span = pl.ds(pid * chunk_items, chunk_items)
    group_ref[span] = g
    row0_ref[span] = jnp.where(in_use, row0, 0)
    lo_ref[span] = lo
    hi_ref[span] = hi

  @pl.when(pid * chunk_groups < width)
  def _order():
    h = pid * chunk_groups + jnp.arange(chunk_groups, dtype=jnp.int32)
    mine = _pick(gi[None, :] == h[:, None], v.blocks)
    before = (v.blocks[None, :] > mine[:, None]) | (
        (v.blocks[None, :] == mine[:, None]) & (gi[None, :] < h[:, None]))
    rank = jnp.sum((before & real[None, :]).astype(jnp.int32), axis=1)
    # The padding groups keep their places, so that order is a permutation of all of them.
    plt.store(order_ref.at[jnp.where(h < num_groups, rank, h)], h)


def work_plan(group_sizes: jax.Array, num_rows: int, *, block_m: int, block_k: int,
              interpret: bool = False) -> WorkPlan:
  """The :class:`WorkPlan` of ``group_sizes`` ``[G]`` over ``num_rows`` rows, in one kernel.

  Args:
    group_sizes: ``[G]`` integer rows per group (``sum <= num_rows``; groups past
      ``num_rows`` are clamped to it).
    num_rows: the static row count of the operands.
    block_m: rows per item (the forward/dgrad kernel's ``block_m``).
    block_k: rows per wgrad step (the wgrad kernel's ``block_k``).
    interpret: run the kernel under Pallas's interpreter (CPU; tests).
  """
  if plt is None:
    _log_xla_plan_once()
    return xla_work_plan(group_sizes, num_rows, block_m=block_m, block_k=block_k)
  num_groups = group_sizes.shape[0]
  width, items_width = _widths(num_rows, block_m, num_groups)
  per = max(_CHUNK_ELEMENTS // width, 16)
  chunk_items, chunk_groups = min(per, items_width), min(per, width)
  programs = max(items_width // chunk_items, width // chunk_groups)
  i32 = lambda n: jax.ShapeDtypeStruct((n,), jnp.int32)
  kernel = functools.partial(_plan_kernel, num_rows=num_rows, num_groups=num_groups,
                             block_m=block_m, block_k=block_k, chunk_items=chunk_items,
                             chunk_groups=chunk_groups)
  outs = pl.pallas_call(
      kernel,
      out_shape=[i32(items_width)] * 4 + [i32(width), i32(1)] + [i32(width)] * 5,
      grid=(programs,),
      compiler_params=plt.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
      interpret=interpret,
      name="jmd_gemm_plan",
  )(group_sizes.astype(jnp.int32))
  return WorkPlan(*outs, num_rows=num_rows, num_groups=num_groups, block_m=block_m,
                  block_k=block_k)


@functools.cache
def _log_xla_plan_once() -> None:
  logger.warning("jax_moe_dispatch.grouped_matmul: this JAX has no Pallas-Triton backend, so the "
                 "kernels' work plan runs as six small XLA kernels instead of one (a few us more "
                 "per grouped_matmul call).")


def xla_work_plan(group_sizes: jax.Array, num_rows: int, *, block_m: int,
                  block_k: int) -> WorkPlan:
  """:func:`work_plan` as XLA operations: the same arrays, element for element."""
  num_groups = group_sizes.shape[0]
  width, items_width = _widths(num_rows, block_m, num_groups)
  sizes = jnp.pad(group_sizes.astype(jnp.int32), (0, width - num_groups))
  v = _per_group(sizes, num_groups=num_groups, num_rows=num_rows, block_m=block_m,
                 block_k=block_k)
  # The wgrad's groups longest first (ties by index; the padding groups last).
  gi = jnp.arange(width, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(gi < num_groups, -v.blocks, 1), stable=True).astype(jnp.int32)
  p = jnp.arange(items_width, dtype=jnp.int32)
  g = jnp.searchsorted(v.item_end, p, side="right", method="compare_all")
  g = jnp.minimum(g, num_groups)
  in_use = p < v.item_end[-1]
  row0 = v.aligned[g] + (p - (v.item_end[g] - v.count[g])) * block_m
  lo = jnp.where(in_use, jnp.maximum(v.starts[g] - row0, 0), 0)
  hi = jnp.where(in_use, jnp.minimum(v.ends[g] - row0, block_m), 0)
  return WorkPlan(g.astype(jnp.int32), jnp.where(in_use, row0, 0), lo, hi, v.item_end,
                  v.zero_from[None], v.csum - sizes, v.csum, v.first, v.blocks, order,
                  num_rows=num_rows, num_groups=num_groups, block_m=block_m, block_k=block_k)
