"""Device and host timing of one function, for every benchmark suite.

:func:`device_time` runs ``iters`` calls of a function inside ONE jitted
``jax.lax.fori_loop`` and reports the per-call time (median over ``reps``
runs of the loop). The calls are chained by :func:`chain`: the loop carries
the function's arguments and its last output; before each call, one element
of every argument array is rewritten with a value chosen by a test on the
previous output (``isnan`` of its first floating element: never true, but
XLA cannot know), so XLA can neither hoist work out of the loop nor merge
calls. The rewrite is an in-place one-element update of a carried buffer, and
each call writes its output where the previous call's was, so the loop copies
no data. The arguments are donated to the loop (one untimed copy of them is
made first, and each run hands its carried arguments, unchanged, to the
next), so no call copies them on entry either. The loop's own cost (the
one-element updates and the loop counter) is part of the time.

Two clocks (``clock``): ``"trace"`` (the suites' default on GPUs) reads the
device's kernel timestamps from a :mod:`jax.profiler` trace of the timed runs:
per run, the span from the first kernel's start to the last kernel's end on
each device (the slowest device counts), divided by ``iters``. ``"wall"`` is
the host's clock around each run, so it also holds the run's fixed host cost
(launching the executable, waiting for its end): on an H200 that was 0.3 to
0.5 ms per run, 30 to 50 us per call at ``iters=10``, a quarter of a small
grouped GEMM's time, and it varied from run to run. Inside a training step
that cost is paid once per step, not per op, so the trace clock is the op's
time; where a trace holds no device kernels (CPU) it falls back to the wall
clock and says so in :attr:`LoopTime.clock`.

:func:`loop_copy_bytes` reads the compiled loop and counts large copies XLA
put in its body anyway (expected: none); suites report it beside the time.
:func:`host_time` is the median of single jitted calls, each waited for with
``block_until_ready``, launch and dispatch overhead included.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


@dataclasses.dataclass(frozen=True)
class LoopTime:
  """Per-call device time of one function, from :func:`device_time`.

  Attributes:
    median_s, min_s, max_s: per-call seconds over the timed runs of the loop.
    copy_bytes: bytes of copies of 1 MiB or more that XLA put in the loop body
      (0 expected; when not 0, that copy's cost is part of the times).
    clock: ``"trace"`` (device kernel timestamps) or ``"wall"`` (host clock);
      module docstring.
  """

  median_s: float
  min_s: float
  max_s: float
  copy_bytes: int
  clock: str = "wall"


def _never(out: Any) -> jax.Array:
  """``isnan`` of the first element of ``out``'s first floating array: False, but XLA cannot prove it."""
  for leaf in jax.tree.leaves(out):
    if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size:
      return jnp.isnan(leaf.reshape(-1)[0].astype(jnp.float32))
  raise ValueError("device_time chains calls through a test on a floating-point output, and fn returned "
                   "none. Fix: make fn also return a non-empty floating-point array.")


def _rewrite_first(a: jax.Array, flip: jax.Array) -> jax.Array:
  """``a`` with its first element changed where ``flip``, else as it was (in place)."""
  if a.size == 0:
    return a
  first = (0,) * a.ndim
  v = a[first]
  if a.dtype == jnp.bool_:
    other = ~v
  elif jnp.issubdtype(a.dtype, jnp.integer):
    other = v + 1
  else:
    other = (v.astype(jnp.float32) + 1).astype(a.dtype)
  return a.at[first].set(jnp.where(flip, other, v))


def chain(fn: Callable[..., Any], n: int) -> Callable[..., Any]:
  """``n`` calls of ``fn`` in one ``fori_loop``; returns ``(args as carried, last output)``.

  Each call after the first gets the carried arguments with one element of
  each array rewritten by a test on the previous output that is never true,
  so each call depends on the one before it while computing on the same data.
  """
  if n < 1:
    raise ValueError(f"chain needs n >= 1 calls, got {n}.")

  def run(*args):
    def step(_, carry):
      now, prev = carry
      flip = _never(prev)
      now = jax.tree.map(lambda a: _rewrite_first(a, flip), now)
      return now, fn(*now)

    return jax.lax.fori_loop(1, n, step, (args, fn(*args)))

  return run


def compile_loop(fn: Callable[..., Any], args: Sequence[Any], *, iters: int,
                 wrap: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda f: f) -> Any:
  """The compiled loop :func:`device_time` runs: :func:`chain` of ``iters`` calls, arguments donated."""
  looped = jax.jit(wrap(chain(fn, iters)), donate_argnums=tuple(range(len(args))))
  return looped.lower(*args).compile()


Clock = Literal["trace", "wall"]


def device_time(fn: Callable[..., Any], args: Sequence[Any], *, iters: int, reps: int,
                wrap: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda f: f,
                clock: Clock = "wall") -> LoopTime:
  """Per-call device time of ``fn(*args)``: :func:`chain` of ``iters`` calls, jitted, run ``reps`` times.

  Args:
    fn: the function to time (per rank when ``wrap`` is a ``shard_map``); its
      output must hold a floating-point array.
    args: its arguments (arrays or pytrees of arrays); not modified.
    iters: calls inside the loop; the loop's time is divided by it.
    reps: timed runs of the loop, after one untimed run.
    wrap: applied to the looped function before ``jax.jit``, e.g.
      ``functools.partial(jax.shard_map, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))``.
    clock: ``"trace"`` or ``"wall"`` (module docstring); ``"trace"`` falls
      back to ``"wall"`` where the trace holds no device kernels.
  """
  if clock not in ("trace", "wall"):
    raise ValueError(f"clock={clock!r}; use 'trace' or 'wall'.")
  state = jax.tree.map(jnp.copy, tuple(args))
  compiled = compile_loop(fn, state, iters=iters, wrap=wrap)
  copies = loop_copy_bytes(compiled)
  state, _ = jax.block_until_ready(compiled(*state))
  per_call = []
  if clock == "trace":
    with tempfile.TemporaryDirectory() as log_dir:
      with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(reps):
          state, _ = jax.block_until_ready(compiled(*state))
      per_call = [span / iters for span in run_spans(log_dir, reps)]
  if not per_call:
    clock = "wall"
    for _ in range(reps):
      t0 = time.perf_counter()
      state, _ = jax.block_until_ready(compiled(*state))
      per_call.append((time.perf_counter() - t0) / iters)
  return LoopTime(statistics.median(per_call), min(per_call), max(per_call), copies, clock)


def run_spans(log_dir: str, runs: int) -> list[float]:
  """Seconds from first kernel start to last kernel end of each of ``runs`` traced runs.

  Reads the Perfetto trace :func:`jax.profiler.trace` wrote under ``log_dir``;
  the device's kernels are split into runs at the ``runs - 1`` widest gaps
  between them (runs were waited for one by one, so the host's turnaround
  separates them); with several devices, each run's slowest device counts.
  Empty when the trace holds fewer than ``runs`` device kernels per device.
  """
  paths = glob.glob(os.path.join(log_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  if len(paths) != 1:
    return []
  with gzip.open(paths[0]) as fh:
    trace = json.load(fh)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  devices = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
             and "GPU" in str(e.get("args", {}).get("name", ""))}
  kernels = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in devices:
      kernels[e["pid"]].append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))))
  spans = []
  for intervals in kernels.values():
    if len(intervals) < runs:
      return []
    intervals.sort()
    gaps = sorted(range(1, len(intervals)),
                  key=lambda i: intervals[i][0] - intervals[i - 1][1])[len(intervals) - runs:]
    bounds = [0, *sorted(gaps), len(intervals)]
    spans.append([(max(end for _, end in intervals[a:b]) - intervals[a][0]) * 1e-6
                  for a, b in zip(bounds, bounds[1:])])
  return [max(run) for run in zip(*spans)] if spans else []


def scratch_bytes(fn: Callable[..., Any], args: Sequence[Any]) -> int:
  """XLA's temporary memory for one jitted call of ``fn(*args)`` (compiled, not run)."""
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def host_time(jitted: Callable[..., Any], args: Sequence[Any], n: int) -> float:
  """Median seconds of ``n`` single calls of ``jitted(*args)``, each waited for (NaN if n is 0)."""
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) if times else float("nan")


def loop_copy_bytes(compiled: Any) -> int:
  """Bytes of ``copy`` instructions of at least 1 MiB outside the entry computation.

  Such a copy runs every iteration of a loop (XLA copies a carried buffer it
  could not update in place), so its cost would be part of the timed calls.
  Copies inside fusions (layout changes) are not counted.
  """
  total, comp = 0, ""
  for line in compiled.as_text().splitlines():
    head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and not line.startswith(" "):
      comp = "ENTRY" if head.group(1) else head.group(2)
      continue
    m = re.search(r"=\s*(\w+)\[([\d,]*)\]\{[^}]*\}\s+copy\(", line)
    if not m or comp == "ENTRY" or comp.startswith(("fused", "wrapped")):
      continue
    n = math.prod(int(v) for v in m.group(2).split(",") if v) * _DTYPE_BYTES.get(m.group(1), 4)
    if n >= 2**20:
      total += n
  return total
