"""The gemm suite: ``grouped_matmul`` against ``jax.lax.ragged_dot`` and a balanced einsum.

For each shape ``(N, K, M, G)`` (``x [N, K] @ w [G, K, M]``, bf16, float32
accumulation) and each group layout:

* ``balanced``: ``N / G`` rows per group;
* ``skewed``: group sizes from a Zipf draw (``--gemm-zipf``, 0.8), shuffled;
* ``skewed_pad``: the skewed groups in a static buffer ``--gemm-pad`` times as
  tall (the rest padding rows, as the dispatcher's worst-case buffers are),

this times, forward and forward+backward (fwd + dgrad + wgrad):

* ``ours``: :func:`jax_moe_dispatch.grouped_matmul` (``implementation`` from
  ``--gemm-impl``, default ``auto``);
* ``ours_nofill`` (``skewed_pad`` only): the same with ``fill_padding=False``,
  as the MoE layer runs it: the padding rows are left unwritten;
* ``ragged_dot``: :func:`jax.lax.ragged_dot` and its autodiff, skipped (with
  a note) where its compiled scratch memory would not fit on the device;
* ``einsum``: a balanced batched ``einsum`` ``[G, N/G, K] x [G, K, M]`` of the
  same FLOPs, the ceiling of a grouped GEMM.

TFLOP/s count the real rows only: ``2 * rows * K * M`` per product (three
products for forward+backward). ``scratch GiB`` is XLA's temporary memory of
the compiled (unlooped) function. Before timing, ours is checked against a
float64 NumPy product on sampled rows and columns (every output kind, padding
rows zero but for ``ours_nofill``); a mismatch is a FAIL.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import traceback
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_moe_dispatch import grouped_matmul
from jax_moe_dispatch.bench import report, timing
from jax_moe_dispatch.bench.session import Session, Suite

SHAPES = "16384,2048,1024,16;49152,4096,1408,64;65536,7168,2048,32"
LAYOUTS = ("balanced", "skewed", "skewed_pad")


@dataclasses.dataclass
class Row:
  """One timed product of one shape and layout (a CSV row)."""

  impl: str
  passes: str
  layout: str
  rows: int
  k: int
  m: int
  groups: int
  real_rows: int
  check: str = ""
  time_ms: float = math.nan
  tflops: float = math.nan
  vs_ragged: float = math.nan
  vs_einsum: float = math.nan
  scratch_gib: float = math.nan
  iters: int = 0
  reps: int = 0
  loop_copy_bytes: int = 0
  clock: str = ""
  note: str = ""


COLUMNS = (
    report.Column("impl", "impl", 11), report.Column("passes", "pass", 7),
    report.Column("layout", "groups", 10), report.Column("rows", "N", 6, "d"),
    report.Column("k", "K", 5, "d"), report.Column("m", "M", 5, "d"), report.Column("groups", "G", 3, "d"),
    report.Column("check", "check", 5), report.Column("time_ms", "time ms", 8, ".3f"),
    report.Column("tflops", "TFLOP/s", 7, ".0f"), report.Column("vs_ragged", "vs ragged x", 11, ".1f"),
    report.Column("vs_einsum", "of einsum", 9, ".2f"), report.Column("scratch_gib", "scratch GiB", 11, ".2f"),
)


def _shapes(text: str) -> list[tuple[int, int, int, int]]:
  try:
    shapes = [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]
  except ValueError:
    shapes = []
  if not shapes or any(len(s) != 4 for s in shapes):
    raise argparse.ArgumentTypeError(f"expected 'N,K,M,G;N,K,M,G;...', got {text!r}")
  return shapes


def add_arguments(group) -> None:
  group.add_argument("--gemm-shapes", type=_shapes, default=_shapes(SHAPES), metavar="N,K,M,G;...",
                     help="grouped GEMM shapes: rows N, K, M and groups G")
  group.add_argument("--gemm-zipf", type=float, default=0.8, help="Zipf exponent of the skewed group sizes")
  group.add_argument("--gemm-pad", type=int, default=4,
                     help="the skewed_pad layout's static rows, as a multiple of N")
  group.add_argument("--gemm-layouts", default=",".join(LAYOUTS),
                     type=lambda t: [v for v in t.split(",") if v in LAYOUTS] or list(LAYOUTS),
                     help=f"group layouts to run, from {','.join(LAYOUTS)}")
  group.add_argument("--gemm-impl", default="auto", choices=("auto", "mosaic", "xla"),
                     help="grouped_matmul's implementation for the 'ours' rows")
  group.add_argument("--gemm-iters", type=int, default=10, help="calls per timed loop (gemm suite)")


def setting(args: argparse.Namespace) -> str:
  shapes = " ".join("x".join(map(str, s)) for s in args.gemm_shapes)
  return (f"setting: grouped GEMM x[N,K] @ w[G,K,M], bf16, f32 accumulate; shapes {shapes}; "
          f"layouts {','.join(args.gemm_layouts)} (Zipf {args.gemm_zipf}, pad x{args.gemm_pad}); "
          f"ours = grouped_matmul(implementation={args.gemm_impl!r})")


def group_sizes(real_rows: int, groups: int, zipf: float, rng: np.random.Generator) -> np.ndarray:
  """``groups`` sizes summing to ``real_rows``: equal (``zipf=0``) or Zipf-distributed, shuffled."""
  if zipf == 0:
    sizes = np.full(groups, real_rows // groups)
  else:
    p = 1.0 / np.arange(1, groups + 1) ** zipf
    rng.shuffle(p)
    sizes = np.floor(p / p.sum() * real_rows).astype(np.int64)
  sizes[np.argmax(sizes)] += real_rows - sizes.sum()
  return sizes.astype(np.int32)


def _fwd(impl: str, fill_padding: bool = True) -> Callable:
  if impl == "ragged_dot":
    return lambda x, w, gs: jax.lax.ragged_dot(x, w, gs)
  return lambda x, w, gs: grouped_matmul(x, w, gs, implementation=impl, fill_padding=fill_padding)


def _fwd_bwd(fwd: Callable) -> Callable:
  def f(x, w, gs, dy):
    y, pullback = jax.vjp(lambda x, w: fwd(x, w, gs), x, w)
    return (y, *pullback(dy))
  return f


def _einsum_fwd(x, w):
  return jnp.einsum("gnk,gkm->gnm", x, w)


def _einsum_fwd_bwd(x, w, dy):
  y, pullback = jax.vjp(_einsum_fwd, x, w)
  return (y, *pullback(dy))


def _check(outs, x, w, dy, sizes, rng, padding_zero: bool = True) -> str:
  """Ours against float64 on sampled rows (y, dx) and columns (dw), and the padding rows
  zero (``padding_zero``); '' when right."""
  y, dx, dw = outs
  ends = np.cumsum(sizes)
  total = int(ends[-1])
  x64 = lambda a, idx: np.asarray(a[idx].astype(jnp.float32), np.float64)  # noqa: E731
  rows = rng.choice(total, size=min(48, total), replace=False) if total else np.zeros(0, int)
  problems = []
  for r in rows:
    g = int(np.searchsorted(ends, r, side="right"))
    want_y = x64(x, r) @ np.asarray(w[g].astype(jnp.float32), np.float64)
    want_dx = x64(dy, r) @ np.asarray(w[g].astype(jnp.float32), np.float64).T
    for got, want, what in ((y[r], want_y, "y"), (dx[r], want_dx, "dx")):
      got = np.asarray(got.astype(jnp.float32), np.float64)
      err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
      if not err < 2e-2:
        problems.append(f"{what}[{r}] rel err {err:.2e}")
  for g in rng.choice(len(sizes), size=min(4, len(sizes)), replace=False):
    if sizes[g] == 0:
      if np.asarray(dw[g]).any():
        problems.append(f"dw[{g}] of an empty group is not zero")
      continue
    lo, hi = int(ends[g] - sizes[g]), int(ends[g])
    c = int(rng.integers(w.shape[2]))
    want = np.asarray(x[lo:hi].astype(jnp.float32), np.float64).T @ np.asarray(
        dy[lo:hi, c].astype(jnp.float32), np.float64)
    got = np.asarray(dw[g, :, c].astype(jnp.float32), np.float64)
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    if not err < 2e-2:
      problems.append(f"dw[{g}][:, {c}] rel err {err:.2e}")
  if padding_zero and total < y.shape[0] and (np.asarray(y[total:]).any()
                                              or np.asarray(dx[total:]).any()):
    problems.append("rows past the groups are not zero")
  return "; ".join(problems[:4])


def run(session: Session) -> None:
  args = session.args
  rng = np.random.default_rng(args.seed)
  if session.on_cpu:
    session.note("on CPU grouped_matmul runs jax.lax.ragged_dot (the Hopper kernels need a GPU)")
  for n, k, m, g in args.gemm_shapes:
    if session.over_budget():
      session.note(f"time budget spent: shape {n}x{k}x{m}x{g} and later skipped")
      break
    w = jnp.asarray(rng.normal(size=(g, k, m)) / math.sqrt(k), jnp.bfloat16)
    flops = 2.0 * n * k * m
    einsum_ms = {}
    x_e = jnp.asarray(rng.normal(size=(g, n // g, k)), jnp.bfloat16)
    dy_e = jnp.asarray(rng.normal(size=(g, n // g, m)), jnp.bfloat16)
    for passes, fn, eargs, mult in (("fwd", _einsum_fwd, (x_e, w), 1),
                                    ("fwd+bwd", _einsum_fwd_bwd, (x_e, w, dy_e), 3)):
      row = Row("einsum", passes, "balanced", n, k, m, g, n)
      _time(session, row, fn, eargs, mult * flops, args)
      einsum_ms[passes] = row.time_ms
      session.add(row, f"gemm {n}x{k}x{m}x{g}")
    del x_e, dy_e
    for layout in args.gemm_layouts:
      if session.over_budget():
        break
      rows = n * (args.gemm_pad if layout == "skewed_pad" else 1)
      sizes = group_sizes(n, g, 0 if layout == "balanced" else args.gemm_zipf, rng)
      x = jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16)
      dy = jnp.asarray(rng.normal(size=(rows, m)), jnp.bfloat16)
      gs = jnp.asarray(sizes)
      ragged_ms = {}
      impls = ("ragged_dot", "ours") if layout != "skewed_pad" else ("ours", "ours_nofill")
      for impl in impls:
        fwd = (_fwd(impl) if impl == "ragged_dot" else
               _fwd(args.gemm_impl, fill_padding=impl != "ours_nofill"))
        for passes, fn, fargs, mult in (("fwd", fwd, (x, w, gs), 1),
                                        ("fwd+bwd", _fwd_bwd(fwd), (x, w, gs, dy), 3)):
          row = Row(impl, passes, layout, rows, k, m, g, n)
          try:
            scratch = timing.scratch_bytes(fn, fargs)
            row.scratch_gib = scratch / 2**30
            if not session.fits(scratch, f"{impl} {passes} {n}x{k}x{m}x{g}"):
              row.note = f"not run: needs {row.scratch_gib:.0f} GiB scratch"
              session.add(row, f"gemm {n}x{k}x{m}x{g}")
              continue
            if impl != "ragged_dot" and passes == "fwd+bwd" and args.check:
              problems = _check(jax.jit(fn)(*fargs), x, w, dy, sizes, rng,
                                padding_zero=impl == "ours")
              row.check = "FAIL" if problems else "PASS"
              if problems:
                session.fail(f"gemm {layout} {n}x{k}x{m}x{g}: {problems}", correctness=True)
            _time(session, row, fn, fargs, mult * flops, args,
                  iters=max(1, args.gemm_iters // 5) if impl == "ragged_dot" else None)
          except Exception as e:
            if impl == "ragged_dot" and "RESOURCE_EXHAUSTED" in str(e):
              # The baseline's dense scratch passed the 60% check but not the allocator.
              row.note = f"out of memory (needs {row.scratch_gib:.0f} GiB scratch)"
              session.note(f"ragged_dot {passes} {n}x{k}x{m}x{g}: {row.note}")
            else:
              traceback.print_exc()
              row.check = "ERROR"
              row.note = f"{type(e).__name__}: {str(e)[:160]}"
              session.fail(f"gemm {impl} {passes} {layout} {n}x{k}x{m}x{g}: {row.note}")
          if impl == "ragged_dot":
            ragged_ms[passes] = row.time_ms
          row.vs_ragged = ragged_ms.get(passes, math.nan) / row.time_ms
          row.vs_einsum = einsum_ms[passes] / row.time_ms
          session.add(row, f"gemm {n}x{k}x{m}x{g}")
      del x, dy


def _time(session: Session, row: Row, fn, fargs, flops: float, args, iters=None) -> None:
  iters = iters or args.gemm_iters
  t = timing.device_time(fn, fargs, iters=iters, reps=args.reps, clock=args.clock)
  row.time_ms = t.median_s * 1e3
  row.tflops = flops / t.median_s / 1e12
  row.iters, row.reps, row.loop_copy_bytes, row.clock = iters, args.reps, t.copy_bytes, t.clock


def plot(path: str, rows: Sequence[Row], title: str) -> None:
  report.bar_chart(path, rows, value="tflops", label=lambda r: f"{r.rows}x{r.k}x{r.m}x{r.groups} {r.layout}",
                   panel="passes", series="impl", ylabel="TFLOP/s (real rows)", title=title)


SUITE = Suite(name="gemm", description="grouped_matmul vs jax.lax.ragged_dot vs a balanced einsum",
              row=Row, columns=COLUMNS, add_arguments=add_arguments, setting=setting, run=run, plot=plot)
