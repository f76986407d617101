"""The dispatch suite: our dispatch/combine against JAX baselines, by DeepEP's measure.

For each configuration (ep size x hidden size), in one process, on the same
tokens and routing (a fresh draw per configuration):

* ours: ``fused_dispatch`` (bf16, and FP8 rows from ``quantize_fp8``),
  ``fused_combine``, ``hybrid_ep_dispatch``, ``hybrid_ep_combine``, for each
  ``--impl`` (``native`` = the CUDA backend, ``reference`` = the pure-JAX one);
  ``permute`` / ``unpermute`` (with ``--ops``): the deepep dispatcher's local
  permutation of the received rows and its inverse (``native`` =
  ``moe_permute_fusion``'s kernels, ``reference`` = XLA), no communication;
* ``ragged``: ``jax.lax.ragged_all_to_all`` dispatch of the same tokens, all a
  user must do included (skipped on CPU: XLA:CPU has no ragged-all-to-all);
* ``dense``: ``jax.lax.all_to_all`` of the padded ``[ep, T, H]`` slots alone;
* ``memcpy``: a ``jax.lax.ppermute`` ring moving the mean received bytes of
  dispatch (device-timed), and one ``jax.device_put`` of the same bytes from
  device 0 to device 1 (host-timed).

Metrics, per rank, averaged over ranks: ``bottleneck GB/s`` = bytes the rank
receives (own share included) / time; ``nvlink GB/s`` = the part that came
from other devices / time; ``vs dense x`` = dense time / op time. Before
timing, each output is checked bit for bit (:mod:`.checks`); a FAIL or ERROR
makes the exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import traceback
from typing import Sequence

import jax
import numpy as np

from jax_moe_dispatch.bench import checks, ops, report, timing
from jax_moe_dispatch.bench.dispatch_case import Case
from jax_moe_dispatch.bench.session import Session, Suite

OPS = ("dispatch", "combine", "hybrid_dispatch", "hybrid_combine", "permute", "unpermute", "ragged",
       "dense", "memcpy")
# Timed unless --ops says otherwise (permute/unpermute, local and no communication, on request).
DEFAULT_OPS = tuple(op for op in OPS if op not in ("permute", "unpermute"))
IMPLS = ("native", "reference")


@dataclasses.dataclass
class Row:
  """One timed op x impl x dtype of one configuration (a CSV row)."""

  op: str
  impl: str
  dtype: str
  ep: int
  hidden: int
  tokens: int
  experts: int
  topk: int
  check: str = ""
  time_us: float = math.nan
  time_us_min: float = math.nan
  time_us_max: float = math.nan
  host_us: float = math.nan
  bottleneck_gbps: float = math.nan
  nvlink_gbps: float = math.nan
  vs_dense: float = math.nan
  recv_bytes: float = math.nan
  nvl_bytes: float = math.nan
  moved_bytes: float = math.nan
  iters: int = 0
  reps: int = 0
  timing: str = "loop"
  clock: str = ""
  loop_copy_bytes: int = 0
  note: str = ""
  check_detail: str = ""


COLUMNS = (
    report.Column("op", "op", 15), report.Column("impl", "impl", 13), report.Column("dtype", "dtype", 5),
    report.Column("ep", "ep", 2, "d"), report.Column("hidden", "H", 5, "d"),
    report.Column("check", "check", 10), report.Column("time_us", "time us", 9, ".1f"),
    report.Column("host_us", "host us", 9, ".1f"),
    report.Column("bottleneck_gbps", "bottleneck GB/s", 15, ".1f"),
    report.Column("nvlink_gbps", "nvlink GB/s", 11, ".1f"),
    report.Column("vs_dense", "vs dense x", 10, ".2f"),
)


def _names(choices: Sequence[str]):
  def parse(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in choices]
    if bad:
      raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
    return names
  return parse


def add_arguments(group) -> None:
  group.add_argument("--impl", default="auto",
                     help="implementations of ours to time, comma-separated from native,reference; "
                          "'auto' = native,reference when the native backend is available, else reference")
  group.add_argument("--ops", type=_names(OPS), default=list(DEFAULT_OPS), metavar="OP1,OP2,...",
                     help=f"ops to run, from {','.join(OPS)} (default: all but permute,unpermute)")
  group.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True,
                     help="also time dispatch of FP8 rows (quantize_fp8: e4m3 + one f32 scale per 128 "
                          "columns)")
  group.add_argument("--num-sms", type=int, default=24,
                     help="SMs the native kernels of every op use (the ops' num_sms argument)")
  group.add_argument("--max-recv-tokens", type=int, default=None,
                     help="static receive rows M of ours (default ep*T, never drops)")
  group.add_argument("--hybrid-rows", choices=("actual", "worst"), default="actual",
                     help="static rows N of hybrid_ep_dispatch's permuted output: 'actual' = the most any "
                          "rank needs for this routing (what a user with a known capacity sets), 'worst' = "
                          "the library default for topk (ep*T*min(K, L) + padding)")
  group.add_argument("--pad-multiple", type=int, default=None, help="hybrid_ep pad_multiple (default 1)")


def _impls(args: argparse.Namespace) -> tuple[list[str], str, bool]:
  """(implementations to time, the native backend's status, whether a requested native is missing)."""
  native_ok, why = ops.native_status()
  if args.impl == "auto":
    return (["native", "reference"] if native_ok else ["reference"]), why, False
  impls = _names(IMPLS)(args.impl)
  missing = "native" in impls and not native_ok
  return [i for i in impls if native_ok or i != "native"], why, missing


def setting(args: argparse.Namespace) -> str:
  impls, why, _ = _impls(args)
  return (f"setting: T={args.tokens}/rank, E={args.experts}, top-{args.topk}, bf16, scores |randn|+1; "
          f"ep {args.ep}; hidden {args.hidden_sweep or [args.hidden]}; impls {impls}; native: {why}; "
          f"num_sms {args.num_sms}; iters {args.iters} x reps {args.reps}, host-iters {args.host_iters}")


def plot(path: str, rows: Sequence[Row], title: str) -> None:
  report.bar_chart(path, rows, value="bottleneck_gbps", panel="ep", series="hidden",
                   label=lambda r: f"{r.op}\n{r.impl}" + ("" if r.dtype == "bf16" else f" {r.dtype}"),
                   ylabel="bottleneck GB/s per rank", title=title)


# ----------------------------------------------------------------------------


def run(session: Session) -> None:
  args = session.args
  impls, why, missing = _impls(args)
  if missing:
    session.note(f"native skipped: {why}")
    session.fail(f"--impl asks for native but it is unavailable: {why}")
  hiddens = args.hidden_sweep or [args.hidden]
  configs = []
  for h in hiddens:
    for ep in args.ep:
      if ep > len(session.devices) or ep < 1:
        session.note(f"ep={ep} skipped: {len(session.devices)} local devices")
      elif args.experts % ep:
        session.note(f"ep={ep} skipped: {args.experts} experts not divisible by it")
      else:
        configs.append((ep, h))
  for i, (ep, h) in enumerate(configs):
    if session.over_budget():
      session.note(f"time budget {args.time_budget:.0f}s spent: skipped configs {configs[i:]}")
      break
    try:
      _run_config(session, impls, ep, h, max(hiddens), i)
    except Exception as e:
      traceback.print_exc()
      session.fail(f"ERROR: config ep={ep} H={h}: {type(e).__name__}: {e}")
    gc.collect()


def _plan(session: Session, impls: Sequence[str], ep: int) -> list[tuple[str, str, str]]:
  a = session.args
  plan = [("dense", "jax", "bf16")] if "dense" in a.ops else []
  for impl in impls:
    for op in ("dispatch", "combine", "hybrid_dispatch", "hybrid_combine", "permute", "unpermute"):
      if op in a.ops:
        plan.append((op, impl, "bf16"))
        if op == "dispatch" and a.fp8:
          plan.append((op, impl, "fp8"))
  if "ragged" in a.ops:
    if session.on_cpu:
      session.note("ragged baseline skipped on CPU: XLA:CPU has no ragged-all-to-all")
    else:
      plan.append(("ragged", "jax", "bf16"))
  if "memcpy" in a.ops:
    plan.append(("memcpy", "ppermute_ring", "bf16"))
    if ep >= 2:
      plan.append(("memcpy", "device_put", "bf16"))
  return plan


def _run_config(session: Session, impls: Sequence[str], ep: int, hidden: int, max_hidden: int,
                index: int) -> None:
  a = session.args
  case = Case(a, session.devices, ep, hidden, index)
  if "native" in impls:
    ops.prepare_native(case.mesh, max_hidden * 2, a.tokens)
  session.progress(f"== config ep={ep} H={hidden} T={a.tokens} E={a.experts} K={a.topk} M={case.max_recv}")
  session.progress(f"   rows received per rank {case.recv_rows.tolist()} (cross-device "
                   f"{case.cross_rows.tolist()}), hybrid permuted rows N={case.num_rows}")
  dense_us = math.nan
  for op, impl, dtype in _plan(session, impls, ep):
    if session.over_budget():
      session.note(f"time budget {a.time_budget:.0f}s spent: skipped the rest of ep={ep} H={hidden} "
                   f"from {op}/{impl}")
      break
    row = _run_op(session, case, op, impl, dtype)
    if op == "dense":
      dense_us = row.time_us
    row.vs_dense = dense_us / row.time_us if row.time_us > 0 else math.nan
    label = f"ep={ep} H={hidden} {op}/{impl}/{dtype}"
    if row.check in ("FAIL", "ERROR"):
      session.fail(f"{row.check}: {label}: {row.check_detail}", correctness=row.check == "FAIL")
    session.add(row, label)


def _run_op(session: Session, case: Case, op: str, impl: str, dtype: str) -> Row:
  """Check and time one op; errors become an ERROR row (one broken op must not hide the others)."""
  a = session.args
  row = Row(op=op, impl=impl, dtype=dtype, ep=case.ep, hidden=case.hidden, tokens=case.tokens,
            experts=case.experts, topk=case.topk, iters=a.iters, reps=a.reps)
  label = f"ep={case.ep} H={case.hidden} {op}/{impl}/{dtype}"
  row_bytes = case.hidden + 4 * -(-case.hidden // 128) if dtype == "fp8" else case.hidden * 2
  row.recv_bytes = float(np.mean(case.recv_rows)) * row_bytes
  row.nvl_bytes = float(np.mean(case.cross_rows)) * row_bytes
  try:
    if impl == "device_put":
      _time_device_put(session, case, row, label)
    else:
      _time_loop(session, case, row, label)
  except Exception as e:
    row.check = "ERROR"
    row.check_detail = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
    traceback.print_exc()
  if row.time_us > 0:
    row.bottleneck_gbps = row.recv_bytes / row.time_us / 1e3
    row.nvlink_gbps = row.nvl_bytes / row.time_us / 1e3
  return row


def _describe(case: Case, row: Row) -> None:
  """Byte counts and notes of the baselines."""
  if row.op == "dense":
    row.moved_bytes = float(case.ep * case.tokens * case.hidden * 2)
    row.note = "collective only; moves every padded slot; bytes counted = real rows"
  elif row.op == "memcpy":
    rows = case.ring_buffer().shape[0] // case.ep
    row.recv_bytes = row.moved_bytes = float(rows * case.hidden * 2)
    row.nvl_bytes = row.recv_bytes if case.ep > 1 else 0.0
    row.note = "ppermute ring: each rank sends the mean dispatch bytes to the next"
  elif row.op == "ragged":
    row.note = "layout + packing + size exchange + rows + ids/probs (2 ragged_all_to_all)"
  elif row.op in ("permute", "unpermute"):
    row.nvl_bytes = 0.0
    row.note = "local (no communication); bytes counted = received rows"


def _time_loop(session: Session, case: Case, row: Row, label: str) -> None:
  a = session.args
  session.progress(f"{label}: compile + first call")
  jf, fn, args = case.jitted(row.op, row.impl, row.dtype)
  case.output(row.op, row.impl, row.dtype)
  if a.check:
    try:
      row.check_detail = case.check(row.op, row.impl, row.dtype)
      row.check = "PASS"
    except checks.CheckFailed as e:
      row.check, row.check_detail = "FAIL", str(e)
  else:
    row.check, row.check_detail = "n/a", "checks disabled (--no-check)"
  session.progress(f"{label}: check {row.check} {row.check_detail}")
  _describe(case, row)
  for _ in range(max(0, a.warmup - 1)):
    jax.block_until_ready(jf(*args))
  row.host_us = timing.host_time(jf, args, a.host_iters) * 1e6
  session.progress(f"{label}: host median {row.host_us:.1f} us; compiling the {a.iters}-call loop")
  t = timing.device_time(fn, args, iters=a.iters, reps=a.reps, wrap=case.wrap, clock=a.clock)
  row.time_us, row.time_us_min, row.time_us_max = t.median_s * 1e6, t.min_s * 1e6, t.max_s * 1e6
  row.loop_copy_bytes, row.clock = t.copy_bytes, t.clock
  if t.copy_bytes:
    row.note = (row.note + "; " if row.note else "") + f"loop body copies {t.copy_bytes / 2**20:.1f} MiB/iter"
    session.progress(f"{label}: warning: XLA put {t.copy_bytes / 2**20:.1f} MiB of copies in the timing "
                     "loop's body; their cost is part of the time")


def _time_device_put(session: Session, case: Case, row: Row, label: str) -> None:
  a = session.args
  buf = case.ring_buffer()
  rows = buf.shape[0] // case.ep
  src = jax.block_until_ready(jax.device_put(buf[:rows], session.devices[0]))
  dst = session.devices[1]
  session.progress(f"{label}: device {session.devices[0].id} -> {dst.id}")
  out = jax.block_until_ready(jax.device_put(src, dst))
  if a.check:
    try:
      checks.expect("device_put copy", out, np.asarray(src))
      row.check, row.check_detail = "PASS", "bitwise equal to the source"
    except checks.CheckFailed as e:
      row.check, row.check_detail = "FAIL", str(e)
  else:
    row.check, row.check_detail = "n/a", "checks disabled (--no-check)"
  put = lambda s: jax.device_put(s, dst)  # noqa: E731
  for _ in range(a.warmup):
    jax.block_until_ready(put(src))
  n = max(a.host_iters, a.reps)
  times = [timing.host_time(put, (src,), 1) for _ in range(n)]
  row.timing = "host"
  row.time_us = row.host_us = float(np.median(times)) * 1e6
  row.time_us_min, row.time_us_max = min(times) * 1e6, max(times) * 1e6
  row.iters, row.reps = 1, n
  row.recv_bytes = row.nvl_bytes = row.moved_bytes = float(rows * case.hidden * 2)
  row.note = f"jax.device_put of one [{rows},{case.hidden}] bf16 array, device 0 -> 1, host-timed"


SUITE = Suite(name="dispatch", description="fused/hybrid dispatch and combine vs JAX baselines",
              row=Row, columns=COLUMNS, add_arguments=add_arguments, setting=setting, run=run, plot=plot)
