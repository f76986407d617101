"""Benchmark MoE dispatch/combine against JAX baselines, by DeepEP's measure.

Run ``python -m jax_moe_dispatch.bench --help``. Default setting (DESIGN §6,
DeepEP's intranode test): bf16, 4096 tokens per rank, hidden 7168, top-8 of
256 experts, scores ``|randn| + 1``, every local device on one ``"ep"`` axis.

For each configuration (ep size x hidden size) this measures, in one process,
on the same tokens and routing:

* ours: ``fused_dispatch`` (bf16, and FP8 rows from ``quantize_fp8``),
  ``fused_combine``, ``hybrid_ep_dispatch``, ``hybrid_ep_combine`` for each
  ``--impl`` (``native`` = our CUDA backend, ``reference`` = the pure-JAX one);
* ``ragged``: ``jax.lax.ragged_all_to_all`` dispatch of the same tokens,
  everything a user must do included (destination layout, packed send buffer,
  size exchange, a second ragged_all_to_all for the per-row expert ids and
  probabilities that ours delivers too). XLA:CPU lacks it: skipped on CPU;
* ``dense``: ``jax.lax.all_to_all`` of the padded ``[ep, T, H]`` slots alone
  (packing not timed; it moves padding and does no compaction);
* ``memcpy``: a ``jax.lax.ppermute`` ring in which every rank sends the mean
  received bytes of ``dispatch`` to the next rank (device-timed), and one
  ``jax.device_put`` of the same bytes from device 0 to device 1 (host-timed).

Timing. Each op runs per rank inside ``jax.shard_map``. The reported time is
device-side: ``--iters`` calls inside ONE jitted ``jax.lax.fori_loop``, each
call's inputs perturbed in one element by a token derived from the previous
call's output (a one-element in-place update that is a no-op at run time), so
XLA can neither hoist nor merge the calls; the loop is run ``--reps`` times and
the median per-call time is reported. The median of ``--host-iters`` single
jitted calls, each waited for with ``block_until_ready``, is reported beside it
(``host_us``; includes launch overhead).

Metrics, per rank, averaged over ranks (DeepEP's definitions):

* ``bottleneck GB/s`` = bytes this rank receives, its own share included, /
  time. Dispatch: received rows x H x 2 (FP8: H x 1 + 4 x ceil(H / 128)).
  Combine: the same bytes, flowing back. Rows come from the routing arrays,
  counted on the host (a token counts once per destination rank).
* ``nvlink GB/s`` = the part of those bytes that crossed from another GPU /
  time.
* ``vs dense x`` = time of ``dense`` / time of the op, same configuration.

Correctness guard: before timing, every op's output is checked once against
a NumPy oracle computed from the same inputs (bitwise for rows, ids, probs,
counts; combine inputs are the received rows scaled by ``2**rank`` so the sums
are exact), and each non-reference implementation is also compared with the
reference backend on the same inputs (bitwise for dispatch outputs and
handles; combine bitwise or within one bf16 ulp). The ``check`` column says
PASS / PASS(1ulp) / FAIL; any FAIL or ERROR is printed loudly and makes the
exit status 1.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import gc
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import numpy as np

OPS = ("dispatch", "combine", "hybrid_dispatch", "hybrid_combine", "ragged", "dense", "memcpy")
IMPLS = ("native", "reference")
CSV_FIELDS = (
    "op", "impl", "dtype", "ep", "hidden", "tokens", "experts", "topk", "check",
    "time_us", "time_us_min", "time_us_max", "host_us", "bottleneck_gbps", "nvlink_gbps",
    "vs_dense", "recv_bytes", "nvl_bytes", "moved_bytes", "iters", "reps", "timing", "note",
    "check_detail",
)


def _log(msg: str) -> None:
  print(msg, flush=True)


def _int_list(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _name_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
  def parse(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in choices]
    if bad:
      raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(choices)}")
    return names
  return parse


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m jax_moe_dispatch.bench",
      description=(
          "Time fused_dispatch/fused_combine and hybrid_ep_dispatch/combine against "
          "jax.lax.ragged_all_to_all, a dense jax.lax.all_to_all of padded slots and a P2P "
          "copy, all in one process on the same data; check ours against the reference "
          "backend first. Bandwidths are DeepEP's: received bytes (own share included) per "
          "rank / time ('bottleneck') and the cross-GPU part of them ('nvlink')."),
      formatter_class=argparse.ArgumentDefaultsHelpFormatter,
      epilog=(
          "Examples:\n"
          "  full setting on all GPUs:  python -m jax_moe_dispatch.bench --csv out.csv --plot out.png\n"
          "  CPU smoke test:            python -m jax_moe_dispatch.bench --cpu-devices 4 --impl reference "
          "--tokens 64 --hidden 128 --experts 16 --topk 2 --ep 2,4"),
  )
  p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (T)")
  p.add_argument("--hidden", type=int, default=7168, help="hidden size H (when --hidden-sweep is not given)")
  p.add_argument("--hidden-sweep", type=_int_list, default=None, metavar="H1,H2,...",
                 help="hidden sizes to sweep, e.g. 7168,4096,2048; the first is run for every ep "
                      "size before the next (so a time budget cuts the least important last)")
  p.add_argument("--experts", type=int, default=256, help="total experts E")
  p.add_argument("--topk", type=int, default=8, help="experts per token K")
  p.add_argument("--ep", type=_int_list, default=None, metavar="N1,N2,...",
                 help="expert-parallel sizes to sweep (the first N devices); default: all local devices")
  p.add_argument("--impl", default="auto",
                 help="implementations of ours to time, comma-separated from native,reference; "
                      "'auto' = native,reference when the native backend is available, else reference")
  p.add_argument("--ops", type=_name_list(OPS), default=list(OPS), metavar="OP1,OP2,...",
                 help=f"ops to run, from {','.join(OPS)}")
  p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True,
                 help="also time dispatch of FP8 rows (quantize_fp8: e4m3 + one f32 scale per 128 columns)")
  p.add_argument("--num-sms", type=int, default=24, help="SMs for the native kernels (set_deepep_num_sms)")
  p.add_argument("--max-recv-tokens", type=int, default=None,
                 help="static receive rows M of ours (default ep*T, never drops)")
  p.add_argument("--hybrid-rows", choices=("actual", "worst"), default="actual",
                 help="static rows N of hybrid_ep_dispatch's permuted output: 'actual' = the most "
                      "any rank needs for this routing (what a user with a known capacity sets), "
                      "'worst' = the library default for topk (ep*T*min(K, L) + padding)")
  p.add_argument("--pad-multiple", type=int, default=None, help="hybrid_ep pad_multiple (default 1)")
  p.add_argument("--iters", type=int, default=20, help="calls inside one timed fori_loop")
  p.add_argument("--reps", type=int, default=5, help="timed runs of the loop (median reported)")
  p.add_argument("--host-iters", type=int, default=20, help="host-timed single calls (median reported)")
  p.add_argument("--warmup", type=int, default=3, help="untimed single calls before timing")
  p.add_argument("--seed", type=int, default=0, help="base seed; each configuration draws fresh data")
  p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                 help="check outputs against the NumPy oracle and the reference backend before timing")
  p.add_argument("--time-budget", type=float, default=0.0,
                 help="seconds; once spent, remaining ops/configurations are skipped (0 = no limit)")
  p.add_argument("--csv", default=None, metavar="PATH", help="write results as CSV (rows appended as they finish)")
  p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
  p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                 help="emulate N CPU devices (sets XLA_FLAGS before JAX starts; for tests)")
  return p


# ----------------------------------------------------------------------------
# Host-side routing facts and NumPy oracles.


@dataclasses.dataclass
class Routing:
  """Routing of one configuration, on the host: [R, T, K] per rank."""

  idx: np.ndarray  # int32 [R, T, K] global expert ids.
  probs: np.ndarray  # float32 [R, T, K].
  num_experts: int
  max_recv: int

  def __post_init__(self):
    self.R, self.T, self.K = self.idx.shape
    self.L = self.num_experts // self.R
    self.owner = self.idx // self.L
    ranks = np.arange(self.R)
    self.dest = (self.owner[..., None] == ranks).any(axis=2)  # [R(src), T, R(dst)]
    self.counts = self.dest.sum(axis=1)  # [R(src), R(dst)]
    self._lists = {}

  def recv_list(self, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(source rank, source token) of rank d's kept receive rows, rank-major, truncated at M."""
    if d not in self._lists:
      rs, rt = [], []
      for s in range(self.R):
        t = np.nonzero(self.dest[s, :, d])[0]
        rs.append(np.full(t.shape, s))
        rt.append(t)
      rs, rt = np.concatenate(rs)[: self.max_recv], np.concatenate(rt)[: self.max_recv]
      self._lists[d] = (rs, rt)
    return self._lists[d]

  def recv_rows(self) -> np.ndarray:
    """[R]: rows each rank keeps, own share included."""
    return np.array([len(self.recv_list(d)[0]) for d in range(self.R)])

  def local_rows(self) -> np.ndarray:
    """[R]: rows each rank keeps from itself."""
    return np.array([int((self.recv_list(d)[0] == d).sum()) for d in range(self.R)])

  def local_ids(self, d: int) -> np.ndarray:
    """[n, K]: local expert ids of rank d's receive rows, -1 where elsewhere."""
    rs, rt = self.recv_list(d)
    g = self.idx[rs, rt]
    return np.where(self.owner[rs, rt] == d, g - d * self.L, -1).astype(np.int32)

  def permuted_src(self, d: int, num_rows: int, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expert-major layout at rank d: (src_row [N], src_k [N], tokens_per_expert [L]); -1 = padding."""
    key = ("perm", d, num_rows, pad)
    if key not in self._lists:
      self._lists[key] = self._permuted_src(d, num_rows, pad)
    return self._lists[key]

  def _permuted_src(self, d: int, num_rows: int, pad: int):
    ids = self.local_ids(d)
    src, ks, sizes = [], [], []
    for e in range(self.L):
      rows, kk = np.nonzero(ids == e)  # Row-major: rows ascending (K experts are distinct).
      padded = -(-len(rows) // pad) * pad
      src += [rows, np.full(padded - len(rows), -1)]
      ks += [kk, np.full(padded - len(rows), -1)]
      sizes.append(padded)
    src = np.concatenate(src).astype(np.int64)
    ks = np.concatenate(ks).astype(np.int64)
    starts = np.cumsum(sizes) - np.array(sizes)
    tpe = np.clip(starts + sizes, 0, num_rows) - np.clip(starts, 0, num_rows)
    out_src = np.full(num_rows, -1, np.int64)
    out_k = np.full(num_rows, -1, np.int64)
    n = min(num_rows, len(src))
    out_src[:n], out_k[:n] = src[:n], ks[:n]
    return out_src, out_k, tpe.astype(np.int32)

  def permuted_rows_needed(self, pad: int) -> int:
    need = 0
    for d in range(self.R):
      ids = self.local_ids(d)
      sizes = [(-(-int((ids == e).sum()) // pad)) * pad for e in range(self.L)]
      need = max(need, sum(sizes))
    return max(need, 1)


def _bits(a: np.ndarray) -> np.ndarray:
  """The raw bits of a, as unsigned integers of the same width and shape."""
  a = np.ascontiguousarray(a)
  return a.view(f"u{a.dtype.itemsize}")


def _same_bits(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(_bits(a), _bits(b))


def _first_diff(name: str, got, want) -> str:
  got, want = np.asarray(got), np.asarray(want)
  if got.shape != want.shape or got.dtype != want.dtype:
    return f"{name}: got {got.dtype}{got.shape}, want {want.dtype}{want.shape}"
  bad = np.nonzero(_bits(got) != _bits(want))
  where = tuple(int(i[0]) for i in bad)
  n = len(bad[0])
  return f"{name}: {n} elements differ, first at {where}: got {got[where]!r}, want {want[where]!r}"


class CheckFailed(Exception):
  pass


def _expect(name: str, got, want) -> None:
  if not _same_bits(got, want):
    raise CheckFailed(_first_diff(name, got, want))


def _ulp_close(got: np.ndarray, want: np.ndarray) -> bool:
  """Within one bf16 ulp of want, elementwise (for sums whose order may differ)."""
  g = np.asarray(got, np.float32)
  w = np.asarray(want, np.float32)
  tol = np.abs(w) * 2.0 ** -7 + 1e-30
  return bool(np.all(np.abs(g - w) <= tol))


def _per_rank(a, R: int) -> np.ndarray:
  a = np.asarray(a)
  return a.reshape((R, a.shape[0] // R) + a.shape[1:])


# ----------------------------------------------------------------------------
# Result rows and printing.


@dataclasses.dataclass
class Row:
  op: str
  impl: str
  dtype: str
  ep: int
  hidden: int
  tokens: int
  experts: int
  topk: int
  check: str = ""
  check_detail: str = ""
  time_us: float = float("nan")
  time_us_min: float = float("nan")
  time_us_max: float = float("nan")
  host_us: float = float("nan")
  bottleneck_gbps: float = float("nan")
  nvlink_gbps: float = float("nan")
  vs_dense: float = float("nan")
  recv_bytes: float = float("nan")
  nvl_bytes: float = float("nan")
  moved_bytes: float = float("nan")
  iters: int = 0
  reps: int = 0
  timing: str = "loop"
  note: str = ""

  def csv_dict(self) -> dict:
    out = {}
    for f in CSV_FIELDS:
      v = getattr(self, f)
      if isinstance(v, float):
        v = "" if math.isnan(v) else f"{v:.6g}"
      out[f] = v
    return out


def _fmt(v: float, spec: str) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "-".rjust(int(spec.split(".")[0]))
  return format(v, spec)


TABLE_HEAD = (f"{'op':<15} {'impl':<13} {'dtype':<5} {'ep':>2} {'H':>5} {'check':<10} "
              f"{'time us':>9} {'host us':>9} {'bottleneck GB/s':>15} {'nvlink GB/s':>11} {'vs dense x':>10}")


def table_line(r: Row) -> str:
  return (f"{r.op:<15} {r.impl:<13} {r.dtype:<5} {r.ep:>2} {r.hidden:>5} {r.check[:10]:<10} "
          f"{_fmt(r.time_us, '9.1f')} {_fmt(r.host_us, '9.1f')} {_fmt(r.bottleneck_gbps, '15.1f')} "
          f"{_fmt(r.nvlink_gbps, '11.1f')} {_fmt(r.vs_dense, '10.2f')}")


class CsvWriter:
  def __init__(self, path: Optional[str], header: list[str]):
    self.path = path
    self.f = None
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self.f = open(path, "w", newline="")
      for line in header:
        self.f.write(f"# {line}\n")
      self.w = csv.DictWriter(self.f, fieldnames=CSV_FIELDS)
      self.w.writeheader()
      self.f.flush()

  def add(self, row: Row) -> None:
    if self.f:
      self.w.writerow(row.csv_dict())
      self.f.flush()

  def close(self) -> None:
    if self.f:
      self.f.close()


def write_plot(path: str, rows: list[Row], title: str) -> None:
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    _log(f"[bench] matplotlib is not importable: no plot written to {path}")
    return
  timed = [r for r in rows if not math.isnan(r.bottleneck_gbps)]
  if not timed:
    _log("[bench] nothing timed: no plot written")
    return
  eps = sorted({r.ep for r in timed})
  hiddens = sorted({r.hidden for r in timed})
  labels = []
  for r in timed:
    lab = f"{r.op}\n{r.impl}" + ("" if r.dtype == "bf16" else f" {r.dtype}")
    if lab not in labels:
      labels.append(lab)
  fig, axes = plt.subplots(len(eps), 1, figsize=(max(8, 1.1 * len(labels) + 2), 3.6 * len(eps)),
                           squeeze=False)
  width = 0.8 / len(hiddens)
  for ax, ep in zip(axes[:, 0], eps):
    for j, h in enumerate(hiddens):
      vals = []
      for lab in labels:
        match = [r for r in timed if r.ep == ep and r.hidden == h and
                 f"{r.op}\n{r.impl}" + ("" if r.dtype == "bf16" else f" {r.dtype}") == lab]
        vals.append(match[0].bottleneck_gbps if match else 0.0)
      xs = [i + (j - (len(hiddens) - 1) / 2) * width for i in range(len(labels))]
      ax.bar(xs, vals, width, label=f"H={h}")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("bottleneck GB/s per rank")
    ax.set_title(f"ep={ep}")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  _log(f"[bench] plot written to {path}")


# ----------------------------------------------------------------------------
# The benchmark proper (JAX imported lazily so --cpu-devices can act first).


def _native_status() -> tuple[bool, str]:
  try:
    from jax_moe_dispatch.backends import native
  except Exception as e:  # Not built or not importable.
    return False, f"native backend not importable ({type(e).__name__}: {e})"
  try:
    if native.native_available():
      return True, "available"
    reason = getattr(native, "native_unavailable_reason", lambda: "native_available() is False")()
    return False, str(reason)
  except Exception as e:
    return False, f"native_available() raised {type(e).__name__}: {e}"


class Bench:
  def __init__(self, args, jax, devices, impls, out: CsvWriter, start: float):
    self.a = args
    self.jax = jax
    self.jnp = jax.numpy
    self.devices = devices
    self.impls = impls
    self.out = out
    self.start = start
    self.rows: list[Row] = []
    self.notes: list[str] = []
    self.failures: list[str] = []
    self.on_cpu = devices[0].platform == "cpu"

  # -- helpers -------------------------------------------------------------
  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def over_budget(self) -> bool:
    return self.a.time_budget > 0 and self.elapsed() > self.a.time_budget

  def note(self, msg: str) -> None:
    if msg not in self.notes:
      self.notes.append(msg)
      _log(f"[bench] note: {msg}")

  def progress(self, msg: str) -> None:
    _log(f"[{self.elapsed():7.1f}s] {msg}")

  def shard(self, fn, nargs: int):
    from jax.sharding import PartitionSpec as P

    return self.jax.shard_map(fn, mesh=self.mesh, in_specs=tuple(P("ep") for _ in range(nargs)),
                              out_specs=P("ep"), check_vma=False)

  def looped(self, fn, n: int, args: Sequence[Any]):
    """n calls of fn in one fori_loop, with a data dependency from each call to the next.

    Single-array ops whose output has the input's shape (dense all_to_all, the ppermute
    ring) feed their output back as the next input. Otherwise the small arguments
    (routing, handles: at most a quarter of the largest argument's bytes) are carried
    and perturbed in one element by a token read from the previous output, a no-op at
    run time that XLA cannot prove; large row buffers are not carried or touched, so
    the loop adds no copies of them.
    """
    jax, jnp = self.jax, self.jnp
    leaves = [jax.tree.leaves(a) for a in args]
    sizes = [sum(l.size * l.dtype.itemsize for l in ls) for ls in leaves]
    out_shape = jax.eval_shape(self.shard(fn, len(args)), *args)
    if (len(args) == 1 and isinstance(out_shape, jax.ShapeDtypeStruct)
        and out_shape.shape == args[0].shape and out_shape.dtype == args[0].dtype):
      return lambda a: jax.lax.fori_loop(0, n, lambda _, v: fn(v), a)
    big = max(sizes)
    carried = [i for i, s in enumerate(sizes) if 4 * s <= big] or [int(np.argmax(sizes))]

    def token(out):
      for leaf in jax.tree.leaves(out):
        if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size:
          v = leaf.reshape(-1)[0].astype(jnp.float32)
          return jnp.isnan(v)  # Never true here; XLA cannot know.
      leaf = jax.tree.leaves(out)[0]
      return leaf.reshape(-1)[0] == jnp.iinfo(leaf.dtype).min

    def perturb(a, tok):
      if a.size == 0:
        return a
      first = (0,) * a.ndim
      v = a[first]
      if a.dtype == jnp.bool_:
        other = ~v
      else:
        other = (v.astype(jnp.float32) + 1).astype(a.dtype)
      return a.at[first].set(jnp.where(tok, other, v))

    def run(*args):
      out = fn(*args)

      def step(_, carry):
        small, out = carry
        tok = token(out)
        small = jax.tree.map(lambda a: perturb(a, tok), small)
        full = list(args)
        for i, a in zip(carried, small):
          full[i] = a
        return small, fn(*full)

      if n > 1:
        _, out = jax.lax.fori_loop(1, n, step, ([args[i] for i in carried], out))
      return out

    return run

  def block(self, out):
    return self.jax.block_until_ready(out)

  # -- one configuration ---------------------------------------------------
  def run_config(self, ep: int, hidden: int, cfg_index: int) -> None:
    jax, jnp = self.jax, self.jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    a = self.a
    T, E, K = a.tokens, a.experts, a.topk
    L = E // ep
    M = a.max_recv_tokens or ep * T
    self.mesh = Mesh(np.array(self.devices[:ep]), ("ep",))
    sharding = NamedSharding(self.mesh, P("ep"))
    self.cfg = dict(ep=ep, hidden=hidden, tokens=T, experts=E, topk=K)
    self.progress(f"== config ep={ep} H={hidden} T={T} E={E} K={K} M={M}")

    if "native" in self.impls:
      from jax_moe_dispatch import buffer

      buffer.set_deepep_num_sms(a.num_sms)
      max_h = max(self.hiddens)
      buffer.get_buffer(self.mesh, max_h * 2, axis_name="ep", max_num_tokens=T)

    # Fresh routing and tokens for this configuration (never zeros).
    rng = np.random.default_rng([a.seed, cfg_index])
    scores = np.abs(rng.standard_normal((ep * T, E), dtype=np.float32)) + 1.0
    idx = np.argpartition(-scores, K - 1, axis=1)[:, :K].astype(np.int32)
    top = np.take_along_axis(scores, idx, axis=1)
    probs = (top / top.sum(axis=1, keepdims=True)).astype(np.float32)
    routing = Routing(idx.reshape(ep, T, K), probs.reshape(ep, T, K), E, M)
    key = jax.random.key(a.seed * 1000003 + cfg_index)
    x = jax.jit(lambda k: jax.random.normal(k, (ep * T, hidden), jnp.float32).astype(jnp.bfloat16),
                out_shardings=sharding)(key)
    d_idx = jax.device_put(idx, sharding)
    d_probs = jax.device_put(probs, sharding)
    rmap_np = np.zeros((ep * T, E), bool)
    np.put_along_axis(rmap_np, idx, True, axis=1)
    dprobs_np = np.zeros((ep * T, E), np.float32)
    np.put_along_axis(dprobs_np, idx, probs, axis=1)
    d_rmap = jax.device_put(rmap_np, sharding)
    d_dprobs = jax.device_put(dprobs_np, sharding)
    xh = _per_rank(np.asarray(x), ep) if a.check else None

    recv_rows = routing.recv_rows()
    cross_rows = recv_rows - routing.local_rows()
    row_bf16 = hidden * 2
    row_fp8 = hidden + 4 * (-(-hidden // 128))
    pad = a.pad_multiple or 1
    if a.hybrid_rows == "actual":
      N = routing.permuted_rows_needed(pad)
    else:
      from jax_moe_dispatch.permute import max_permuted_rows

      N = max_permuted_rows(M, L, K, pad)
    self.progress(f"   rows received per rank {recv_rows.tolist()} (cross-GPU {cross_rows.tolist()}), "
                  f"hybrid permuted rows N={N}")
    ctx = dict(routing=routing, x=x, xh=xh, idx=d_idx, probs=d_probs, rmap=d_rmap, dprobs=d_dprobs,
               M=M, N=N, L=L, pad=pad, hidden=hidden, sharding=sharding,
               bytes_bf16=(recv_rows * row_bf16, cross_rows * row_bf16),
               bytes_fp8=(recv_rows * row_fp8, cross_rows * row_fp8))
    self.cache: dict = {}
    self.dense_time = float("nan")

    plan = []
    if "dense" in a.ops:
      plan.append(("dense", "jax", "bf16"))
    for impl in self.impls:
      if "dispatch" in a.ops:
        plan.append(("dispatch", impl, "bf16"))
        if a.fp8:
          plan.append(("dispatch", impl, "fp8"))
      if "combine" in a.ops:
        plan.append(("combine", impl, "bf16"))
      if "hybrid_dispatch" in a.ops:
        plan.append(("hybrid_dispatch", impl, "bf16"))
      if "hybrid_combine" in a.ops:
        plan.append(("hybrid_combine", impl, "bf16"))
    if "ragged" in a.ops:
      if self.on_cpu:
        self.note("ragged baseline skipped on CPU: XLA:CPU has no ragged-all-to-all")
      else:
        plan.append(("ragged", "jax", "bf16"))
    if "memcpy" in a.ops:
      plan.append(("memcpy", "ppermute_ring", "bf16"))
      if ep >= 2:
        plan.append(("memcpy", "device_put", "bf16"))

    for op, impl, dtype in plan:
      if self.over_budget():
        self.note(f"time budget {a.time_budget:.0f}s spent: skipped the rest of ep={ep} H={hidden} "
                  f"from {op}/{impl}")
        break
      self.run_case(op, impl, dtype, ctx)
    del ctx, x, d_idx, d_probs, d_rmap, d_dprobs, xh
    self.cache = {}
    gc.collect()

  # -- op builders -----------------------------------------------------------
  def op_fn(self, op: str, impl: str, dtype: str, ctx):
    """(per-rank fn, global args) of an op; prerequisites computed untimed."""
    from jax_moe_dispatch import fused_a2a
    from jax_moe_dispatch.fp8 import quantize_fp8

    jax, jnp = self.jax, self.jnp
    E, M, N, L, pad = self.a.experts, ctx["M"], ctx["N"], ctx["L"], ctx["pad"]
    ep = self.cfg["ep"]
    if op == "dispatch" and dtype == "bf16":
      def f(x, idx, probs):
        return fused_a2a.fused_dispatch(x, idx, probs, E, "ep", max_recv_tokens=M, implementation=impl)
      return f, (ctx["x"], ctx["idx"], ctx["probs"])
    if op == "dispatch" and dtype == "fp8":
      if "xq" not in self.cache:
        self.cache["xq"] = jax.jit(self.shard(quantize_fp8, 1))(ctx["x"])
      xq, xs = self.cache["xq"]

      def f(xq, xs, idx, probs):
        return fused_a2a.fused_dispatch((xq, xs), idx, probs, E, "ep", max_recv_tokens=M,
                                        implementation=impl)
      return f, (xq, xs, ctx["idx"], ctx["probs"])
    if op == "combine":
      disp = self.output("dispatch", impl, "bf16", ctx)
      y = jax.jit(self.shard(_scale_by_rank, 1))(disp[0])

      def f(y, handle):
        return fused_a2a.fused_combine(y, handle, "ep", implementation=impl)
      return f, (y, disp[4])
    if op == "hybrid_dispatch":
      def f(x, rmap, dprobs):
        return fused_a2a.hybrid_ep_dispatch(x, rmap, dprobs, L, "ep", num_permuted_tokens=N,
                                            pad_multiple=pad, max_recv_tokens=M, implementation=impl)
      return f, (ctx["x"], ctx["rmap"], ctx["dprobs"])
    if op == "hybrid_combine":
      disp = self.output("hybrid_dispatch", impl, "bf16", ctx)
      y = jax.jit(self.shard(_scale_by_rank, 1))(disp[0])

      def f(y, handle):
        return fused_a2a.hybrid_ep_combine(y, handle, "ep", implementation=impl)
      return f, (y, disp[4])
    if op == "ragged":
      def f(x, idx, probs):
        return _ragged_dispatch(jax, x, idx, probs, E)
      return f, (ctx["x"], ctx["idx"], ctx["probs"])
    if op == "dense":
      if "slots" not in self.cache:
        self.cache["slots"] = jax.jit(self.shard(lambda x, i: _dense_slots(jax, x, i, E), 2))(
            ctx["x"], ctx["idx"])
      def f(slots):
        return jax.lax.all_to_all(slots, "ep", 0, 0, tiled=True)
      return f, (self.cache["slots"],)
    if op == "memcpy":
      if "ring_buf" not in self.cache:
        rows = int(round(float(np.mean(ctx["routing"].recv_rows()))))
        key = jax.random.key(self.a.seed + 7)
        self.cache["ring_buf"] = jax.jit(
            lambda k: jax.random.normal(k, (ep * rows, ctx["hidden"]), jnp.float32).astype(jnp.bfloat16),
            out_shardings=ctx["sharding"])(key)
      perm = [(i, (i + 1) % ep) for i in range(ep)]

      def f(buf):
        return jax.lax.ppermute(buf, "ep", perm)
      return f, (self.cache["ring_buf"],)
    raise ValueError(op)

  def single(self, op, impl, dtype, ctx):
    k = ("single", op, impl, dtype)
    if k not in self.cache:
      fn, args = self.op_fn(op, impl, dtype, ctx)
      self.cache[k] = (self.jax.jit(self.shard(fn, len(args))), fn, args)
    return self.cache[k]

  def output(self, op, impl, dtype, ctx):
    """Output of one untimed call (cached): the input of dependent ops and of the checks."""
    k = ("out", op, impl, dtype)
    if k not in self.cache:
      jf, _, args = self.single(op, impl, dtype, ctx)
      self.cache[k] = self.block(jf(*args))
    return self.cache[k]

  # -- checks ---------------------------------------------------------------
  def check(self, op, impl, dtype, out, ctx) -> tuple[str, str]:
    if not self.a.check:
      return "n/a", "checks disabled (--no-check)"
    status, details = "PASS", []
    loose = self.check_oracle(op, impl, dtype, out, ctx)
    if loose:
      status = "PASS(1ulp)"
      details.append(f"oracle: {loose}")
    if impl not in ("reference", "jax", "ppermute_ring", "device_put"):
      ref = self.output(op, "reference", dtype, ctx)
      got_l, ref_l = self.jax.tree.leaves(out), self.jax.tree.leaves(ref)
      if len(got_l) != len(ref_l):
        raise CheckFailed(f"vs reference: {len(got_l)} outputs, reference has {len(ref_l)}")
      for i, (g, r) in enumerate(zip(got_l, ref_l)):
        g, r = np.asarray(g), np.asarray(r)
        if _same_bits(g, r):
          continue
        if op in ("combine", "hybrid_combine") and g.shape == r.shape and _ulp_close(g, r):
          status = "PASS(1ulp)"
          details.append("vs reference: combine within 1 bf16 ulp, not bitwise")
          continue
        raise CheckFailed("vs reference: " + _first_diff(f"output leaf {i}", g, r))
      details.append("bitwise equal to reference" if status == "PASS" else "")
    return status, "; ".join(d for d in details if d)

  def check_oracle(self, op, impl, dtype, out, ctx) -> str:
    """Raise CheckFailed on a mismatch; return '' or a note when only within 1 ulp."""
    rt: Routing = ctx["routing"]
    R, T, K, L, M, N = rt.R, rt.T, rt.K, rt.L, ctx["M"], ctx["N"]
    xh = ctx["xh"]
    H = xh.shape[-1]
    if op == "dispatch":
      if dtype == "fp8":
        xq, xs = self.cache["xq"]
        src = (_per_rank(xq, R), _per_rank(xs, R))
        recv = (_per_rank(out[0][0], R), _per_rank(out[0][1], R))
      else:
        src, recv = (xh,), (_per_rank(out[0], R),)
      r_idx, r_probs, tpe = (_per_rank(o, R) for o in out[1:4])
      for d in range(R):
        rs, rt_ = rt.recv_list(d)
        n = len(rs)
        for j, (s_arr, r_arr) in enumerate(zip(src, recv)):
          want = np.zeros((M,) + s_arr.shape[2:], s_arr.dtype)
          want[:n] = s_arr[rs, rt_]
          _expect(f"rank {d} recv payload {j}", r_arr[d], want)
        ids = np.full((M, K), -1, np.int32)
        ids[:n] = rt.local_ids(d)
        _expect(f"rank {d} recv_token_indices", r_idx[d], ids)
        pr = np.zeros((M, K), np.float32)
        pr[:n] = np.where(ids[:n] >= 0, rt.probs[rs, rt_], 0)
        _expect(f"rank {d} recv_token_probs", r_probs[d], pr)
        want_tpe = np.bincount(ids[ids >= 0], minlength=L).astype(np.int32)
        _expect(f"rank {d} tokens_per_expert", tpe[d], want_tpe)
      return ""
    if op == "combine":
      # Input rows were scaled by 2**rank, so each token's sum is x * sum(2**d): exact in f32.
      w = np.zeros((R, T), np.float32)
      for d in range(R):
        rs, rt_ = rt.recv_list(d)
        w[rs, rt_] += 2.0 ** d
      want = (xh.astype(np.float32) * w[..., None]).astype(xh.dtype)
      _expect("combine output", _per_rank(out, R), want)
      return ""
    if op == "hybrid_dispatch":
      px, pp, _, ptpe = (_per_rank(o, R) if o is not None else None for o in out[:4])
      for d in range(R):
        rs, rt_ = rt.recv_list(d)
        src_row, src_k, tpe = rt.permuted_src(d, N, ctx["pad"])
        ok = src_row >= 0
        want = np.zeros((N, H), xh.dtype)
        want[ok] = xh[rs[src_row[ok]], rt_[src_row[ok]]]
        _expect(f"rank {d} permuted_x", px[d], want)
        wp = np.zeros((N,), np.float32)
        wp[ok] = rt.probs[rs[src_row[ok]], rt_[src_row[ok]], src_k[ok]]
        _expect(f"rank {d} permuted_probs", pp[d], wp)
        _expect(f"rank {d} tokens_per_expert", ptpe[d], tpe)
      return ""
    if op == "hybrid_combine":
      # Input: permuted rows scaled by 2**rank. Unpermute sums a row's copies in f32 and
      # rounds to bf16 (n * x); combine sums over ranks in f32, exactly for ep <= 8.
      acc = np.zeros((R, T, H), np.float32)
      for d in range(R):
        rs, rt_ = rt.recv_list(d)
        src_row, _, _ = rt.permuted_src(d, N, ctx["pad"])
        n = np.bincount(src_row[src_row >= 0], minlength=len(rs))[: len(rs)].astype(np.float32)
        part = (xh[rs, rt_].astype(np.float32) * n[:, None]).astype(xh.dtype).astype(np.float32)
        acc[rs, rt_] += part * np.float32(2.0 ** d)
      want = acc.astype(xh.dtype)
      got = _per_rank(out, R)
      if _same_bits(got, want):
        return ""
      if _ulp_close(got, want):
        return "hybrid_combine within 1 bf16 ulp of the unpermute-then-combine oracle"
      raise CheckFailed(_first_diff("hybrid_combine output", got, want))
    if op == "ragged":
      recv, meta = _per_rank(out[0], R), _per_rank(out[1], R)
      Mr = R * T
      for d in range(R):
        rs, rt_ = rt.recv_list(d)
        n = len(rs)
        want = np.zeros((Mr, H), xh.dtype)
        want[:n] = xh[rs, rt_]
        _expect(f"rank {d} ragged rows", recv[d], want)
        ids = rt.local_ids(d)
        pr = np.where(ids >= 0, rt.probs[rs, rt_], 0).astype(np.float32)
        _expect(f"rank {d} ragged ids", meta[d][:n, :K], ids)
        _expect(f"rank {d} ragged probs", meta[d][:n, K:].view(np.float32), pr)
      return ""
    if op == "dense":
      got = _per_rank(out, R).reshape(R, R, T, H)
      for d in range(R):
        want = np.zeros((R, T, H), xh.dtype)
        for s in range(R):
          t = np.nonzero(rt.dest[s, :, d])[0]
          want[s, : len(t)] = xh[s, t]
        _expect(f"rank {d} dense slots", got[d], want)
      return ""
    if op == "memcpy":
      buf = _per_rank(self.cache["ring_buf"], R)
      got = _per_rank(out, R)
      _expect("ppermute ring", got, np.roll(buf, 1, axis=0))
      return ""
    raise ValueError(op)

  # -- timing ---------------------------------------------------------------
  def run_case(self, op, impl, dtype, ctx) -> None:
    a = self.a
    row = Row(op=op, impl=impl, dtype=dtype, iters=a.iters, reps=a.reps, **self.cfg)
    label = f"ep={row.ep} H={row.hidden} {op}/{impl}/{dtype}"
    recv_b, nvl_b = ctx["bytes_fp8" if dtype == "fp8" else "bytes_bf16"]
    row.recv_bytes, row.nvl_bytes = float(np.mean(recv_b)), float(np.mean(nvl_b))
    try:
      if impl == "device_put":
        self.time_device_put(row, ctx, label)
      else:
        self.progress(f"{label}: compile + first call")
        jf, fn, args = self.single(op, impl, dtype, ctx)
        out = self.output(op, impl, dtype, ctx)
        try:
          row.check, row.check_detail = self.check(op, impl, dtype, out, ctx)
        except CheckFailed as e:
          row.check, row.check_detail = "FAIL", str(e)
        self.progress(f"{label}: check {row.check} {row.check_detail}")
        if op == "dense":
          row.moved_bytes = float(ctx["routing"].R * ctx["routing"].T * ctx["hidden"] * 2)
          row.note = "collective only; moves every padded slot; bytes counted = real rows"
        if op == "memcpy":
          rows = self.cache["ring_buf"].shape[0] // ctx["routing"].R
          row.recv_bytes = row.moved_bytes = float(rows * ctx["hidden"] * 2)
          row.nvl_bytes = row.recv_bytes if ctx["routing"].R > 1 else 0.0
          row.note = "ppermute ring: each rank sends the mean dispatch bytes to the next"
        if op == "ragged":
          row.note = "layout + packing + size exchange + rows + ids/probs (2 ragged_all_to_all)"
        for _ in range(max(0, a.warmup - 1)):
          self.block(jf(*args))
        host = []
        for _ in range(a.host_iters):
          t0 = time.perf_counter()
          self.block(jf(*args))
          host.append(time.perf_counter() - t0)
        row.host_us = statistics.median(host) * 1e6 if host else float("nan")
        self.progress(f"{label}: host median {row.host_us:.1f} us; compiling the {a.iters}-call loop")
        jl = self.jax.jit(self.shard(self.looped(fn, a.iters, args), len(args))).lower(*args).compile()
        copies = _loop_copies(jl)
        if copies:
          row.note = (row.note + "; " if row.note else "") + f"loop body copies {copies / 2**20:.1f} MiB/iter"
          self.progress(f"{label}: warning: the timing loop's body copies {copies / 2**20:.1f} MiB per "
                        "iteration (scaffolding cost included in time)")
        self.block(jl(*args))
        per = []
        for _ in range(a.reps):
          t0 = time.perf_counter()
          self.block(jl(*args))
          per.append((time.perf_counter() - t0) / a.iters)
        row.time_us = statistics.median(per) * 1e6
        row.time_us_min, row.time_us_max = min(per) * 1e6, max(per) * 1e6
        del jl
    except Exception as e:  # One broken op must not hide the others.
      row.check = "ERROR"
      row.check_detail = f"{type(e).__name__}: {e}".replace("\n", " ")[:500]
      traceback.print_exc()
      sys.stdout.flush()
    t = row.time_us * 1e-6
    if t > 0:
      row.bottleneck_gbps = row.recv_bytes / t / 1e9
      row.nvlink_gbps = row.nvl_bytes / t / 1e9
    if op == "dense" and not math.isnan(row.time_us):
      self.dense_time = row.time_us
    row.vs_dense = self.dense_time / row.time_us if row.time_us > 0 else float("nan")
    if row.check in ("FAIL", "ERROR"):
      msg = f"{row.check}: {label}: {row.check_detail}"
      self.failures.append(msg)
      banner = "!" * 78
      for stream in (sys.stdout, sys.stderr):
        kind = "CORRECTNESS " if row.check == "FAIL" else ""
        print(f"{banner}\n!!! {kind}{msg}\n{banner}", file=stream, flush=True)
    self.progress(f"{label}: {table_line(row)}")
    self.rows.append(row)
    self.out.add(row)

  def time_device_put(self, row: Row, ctx, label: str) -> None:
    jax = self.jax
    a = self.a
    buf = self.cache.get("ring_buf")
    if buf is None:
      self.op_fn("memcpy", "ppermute_ring", "bf16", ctx)
      buf = self.cache["ring_buf"]
    rows = buf.shape[0] // ctx["routing"].R
    src = jax.device_put(buf[:rows], self.devices[0])
    self.block(src)
    dst_dev = self.devices[1]
    self.progress(f"{label}: device {self.devices[0].id} -> {dst_dev.id}")
    out = self.block(jax.device_put(src, dst_dev))
    row.check = "PASS" if (not a.check or _same_bits(np.asarray(out), np.asarray(src))) else "FAIL"
    if not a.check:
      row.check = "n/a"
    for _ in range(a.warmup):
      self.block(jax.device_put(src, dst_dev))
    times = []
    for _ in range(max(a.host_iters, a.reps)):
      t0 = time.perf_counter()
      self.block(jax.device_put(src, dst_dev))
      times.append(time.perf_counter() - t0)
    row.timing = "host"
    row.time_us = row.host_us = statistics.median(times) * 1e6
    row.time_us_min, row.time_us_max = min(times) * 1e6, max(times) * 1e6
    row.iters, row.reps = 1, len(times)
    row.recv_bytes = row.nvl_bytes = row.moved_bytes = float(rows * ctx["hidden"] * 2)
    row.note = f"jax.device_put of one [{rows},{ctx['hidden']}] bf16 array, device 0 -> 1, host-timed"


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def _loop_copies(compiled) -> int:
  """Bytes of plain copy instructions of at least 1 MiB outside the entry computation.

  In the timing loop these run every iteration (XLA copies a carried buffer it
  could not update in place), so they would be scaffolding cost; 0 expected.
  """
  import re

  try:
    text = compiled.as_text()
  except Exception:
    return 0
  total, comp = 0, ""
  for line in text.splitlines():
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


def _scale_by_rank(rows):
  """rows * 2**rank (exact in bf16): makes combine outputs checkable bit for bit."""
  import jax
  import jax.numpy as jnp

  s = jnp.exp2(jax.lax.axis_index("ep").astype(jnp.float32))
  return (rows.astype(jnp.float32) * s).astype(rows.dtype)


def _dense_slots(jax, x, idx, num_experts):
  """[R, T, H] slots: slot d holds this rank's tokens for rank d, packed, zero padded."""
  jnp = jax.numpy
  R = jax.lax.axis_size("ep")
  T = x.shape[0]
  owner = idx // (num_experts // R)
  dest = (owner[:, :, None] == jnp.arange(R)[None, None, :]).any(axis=1)  # [T, R]
  pos = jnp.where(dest, jnp.cumsum(dest.astype(jnp.int32), axis=0) - 1, T)
  dst = jnp.broadcast_to(jnp.arange(R)[None, :], pos.shape)
  slots = jnp.zeros((R, T) + x.shape[1:], x.dtype)
  return slots.at[dst, pos].set(jnp.broadcast_to(x[:, None], (T, R) + x.shape[1:]), mode="drop")


def _ragged_dispatch(jax, x, idx, probs, num_experts):
  """What a user writes to dispatch with jax.lax.ragged_all_to_all (per rank).

  Same tokens and output layout as fused_dispatch (rank-major, token order, zero
  padding): destination mask -> packed send buffer (gather) -> counts all-gathered
  -> offsets -> ragged_all_to_all of rows, and of [ids | probs bits] metadata.
  """
  jnp = jax.numpy
  R = jax.lax.axis_size("ep")
  me = jax.lax.axis_index("ep")
  T, K = idx.shape
  L = num_experts // R
  owner = idx // L
  on_rank = owner[:, None, :] == jnp.arange(R)[None, :, None]  # [T, R, K]
  dest = on_rank.any(axis=-1)  # [T, R]
  d32 = dest.astype(jnp.int32)
  counts = d32.sum(axis=0)  # [R]
  starts = jnp.cumsum(counts) - counts
  slot = jnp.where(dest, starts[None, :] + jnp.cumsum(d32, axis=0) - 1, R * T)  # [T, R]
  tok = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, R))
  dst = jnp.broadcast_to(jnp.arange(R, dtype=jnp.int32)[None, :], (T, R))
  src_tok = jnp.zeros((R * T,), jnp.int32).at[slot].set(tok, mode="drop")
  src_dst = jnp.zeros((R * T,), jnp.int32).at[slot].set(dst, mode="drop")
  send = jnp.take(x, src_tok, axis=0)
  local_ids = jnp.where(on_rank, idx[:, None, :] - jnp.arange(R)[None, :, None] * L, -1)
  local_probs = jnp.where(on_rank, probs[:, None, :], 0.0).astype(jnp.float32)
  meta = jnp.concatenate(
      [local_ids.astype(jnp.int32), jax.lax.bitcast_convert_type(local_probs, jnp.int32)], axis=-1)
  send_meta = meta[src_tok, src_dst]  # [R*T, 2K]
  all_counts = jax.lax.all_gather(counts, "ep")  # [R(src), R(dst)]
  out_offsets = (jnp.cumsum(all_counts, axis=0) - all_counts)[me]
  recv_sizes = all_counts[:, me]
  rows = jax.lax.ragged_all_to_all(send, jnp.zeros((R * T,) + x.shape[1:], x.dtype), starts, counts,
                                   out_offsets, recv_sizes, axis_name="ep")
  meta_out = jax.lax.ragged_all_to_all(send_meta, jnp.zeros((R * T, 2 * K), jnp.int32), starts,
                                       counts, out_offsets, recv_sizes, axis_name="ep")
  return rows, meta_out


# ----------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  if args.cpu_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.cpu_devices}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jaxlib

  start = time.perf_counter()
  devices = jax.local_devices()
  native_ok, native_why = _native_status()
  if args.impl == "auto":
    impls = ["native", "reference"] if native_ok else ["reference"]
  else:
    impls = _name_list(IMPLS)(args.impl)
  notes = []
  if "native" in impls and not native_ok:
    notes.append(f"native skipped: {native_why}")
    print("!" * 78 + f"\n!!! --impl asks for native but it is unavailable: {native_why}\n" + "!" * 78,
          flush=True)
    impls = [i for i in impls if i != "native"]
  eps = args.ep or [len(devices)]
  hiddens = args.hidden_sweep or [args.hidden]
  command = shlex.join(["python", "-m", "jax_moe_dispatch.bench", *argv])
  kind = devices[0].device_kind
  header = [
      "jax_moe_dispatch benchmark",
      f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
      f"device: {len(devices)} x {kind} ({devices[0].platform}); host {platform.node()}",
      f"jax: {jax.__version__} (jaxlib {jaxlib.__version__}); python {platform.python_version()}",
      f"command: {command}",
      (f"setting: T={args.tokens}/rank, E={args.experts}, top-{args.topk}, bf16, scores |randn|+1; "
       f"ep {eps}; hidden {hiddens}; impls {impls}; native: {native_why}; num_sms {args.num_sms}; "
       f"iters {args.iters} x reps {args.reps}, host-iters {args.host_iters}"),
      ("env: " + " ".join(f"{k}={os.environ[k]}" for k in
                          ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                           "XLA_FLAGS") if k in os.environ)),
  ]
  for line in header:
    _log(line)
  out = CsvWriter(args.csv, header)
  bench = Bench(args, jax, devices, impls, out, start)
  bench.hiddens = hiddens
  for n in notes:
    bench.note(n)
  configs = []
  for h in hiddens:
    for ep in eps:
      if ep > len(devices) or ep < 1:
        bench.note(f"ep={ep} skipped: {len(devices)} local devices")
      elif args.experts % ep:
        bench.note(f"ep={ep} skipped: {args.experts} experts not divisible by it")
      else:
        configs.append((ep, h))
  for i, (ep, h) in enumerate(configs):
    if bench.over_budget():
      bench.note(f"time budget {args.time_budget:.0f}s spent: skipped configs {configs[i:]}")
      break
    try:
      bench.run_config(ep, h, i)
    except Exception as e:
      msg = f"ERROR: config ep={ep} H={h}: {type(e).__name__}: {e}"
      bench.failures.append(msg)
      traceback.print_exc()
      print("!" * 78 + f"\n!!! {msg}\n" + "!" * 78, flush=True)
  out.close()
  if args.plot:
    try:
      write_plot(args.plot, bench.rows, f"{len(devices)} x {kind}, jax {jax.__version__}, T={args.tokens}, "
                 f"E={args.experts}, top-{args.topk}")
    except Exception as e:
      _log(f"[bench] plot failed: {type(e).__name__}: {e}")
  _log("")
  _log("==== RESULTS ====")
  for line in header[:5]:
    _log(line)
  _log(TABLE_HEAD)
  for r in bench.rows:
    _log(table_line(r))
  for n in bench.notes:
    _log(f"note: {n}")
  if args.csv:
    _log(f"csv: {args.csv}")
  if bench.failures:
    _log(f"FAILURES ({len(bench.failures)}):")
    for f in bench.failures:
      _log(f"  {f[:240]}")
  _log(f"total {bench.elapsed():.1f}s; status {'FAIL' if bench.failures else 'OK'}")
  _log("==== END RESULTS ====")
  return 1 if bench.failures else 0


if __name__ == "__main__":
  sys.exit(main())
