"""``python -m jax_moe_dispatch.bench``: parse the flags, run one suite, print and save its table."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import traceback
from typing import Optional, Sequence

import jax
import jaxlib

from jax_moe_dispatch.bench import dispatch, gemm, moe, report
from jax_moe_dispatch.bench.session import Session, Suite

# The suites, by --suite name. A new table: one module defining a Suite, one entry here.
SUITES: dict[str, Suite] = {s.name: s for s in (dispatch.SUITE, gemm.SUITE, moe.SUITE)}

_ENV_KEYS = ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "XLA_FLAGS")


def _int_list(text: str) -> list[int]:
  try:
    return [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Defaults shown, description and examples kept as written."""


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m jax_moe_dispatch.bench",
      description=(
          "Benchmark suites of jax_moe_dispatch, one table per run (--suite).\n\n"
          "dispatch (default): fused_dispatch/fused_combine and hybrid_ep_dispatch/combine against\n"
          "jax.lax.ragged_all_to_all, a dense jax.lax.all_to_all of padded slots and a P2P copy, all\n"
          "in one process on the same data, every output checked against the NumPy oracle first.\n"
          "Bandwidths are DeepEP's: received bytes (own share included) per rank / time\n"
          "('bottleneck') and the cross-device part of them ('nvlink')."),
      formatter_class=_Formatter,
      epilog=(
          "Examples:\n"
          "  full setting on all GPUs:  python -m jax_moe_dispatch.bench --csv out.csv --plot out.png\n"
          "  CPU smoke test:            python -m jax_moe_dispatch.bench --cpu-devices 4 --impl reference "
          "--tokens 64 --hidden 128 --experts 16 --topk 2 --ep 2,4"),
  )
  p.add_argument("--suite", choices=sorted(SUITES), default="dispatch",
                 help="which table: " + "; ".join(f"{s.name}: {s.description}" for s in SUITES.values()))
  p.add_argument("--tokens", type=int, default=4096, help="tokens per rank (T)")
  p.add_argument("--hidden", type=int, default=7168, help="hidden size H (when --hidden-sweep is not given)")
  p.add_argument("--hidden-sweep", type=_int_list, default=None, metavar="H1,H2,...",
                 help="hidden sizes to sweep, e.g. 7168,4096,2048; the first is run for every ep "
                      "size before the next (so a time budget cuts the least important last)")
  p.add_argument("--experts", type=int, default=256, help="total experts E")
  p.add_argument("--topk", type=int, default=8, help="experts per token K")
  p.add_argument("--ep", type=_int_list, default=None, metavar="N1,N2,...",
                 help="expert-parallel sizes to sweep (the first N devices); default: all local devices")
  p.add_argument("--iters", type=int, default=20, help="calls inside one timed fori_loop")
  p.add_argument("--reps", type=int, default=5, help="timed runs of the loop (median reported)")
  p.add_argument("--clock", choices=("trace", "wall"), default="trace",
                 help="how a loop is timed: 'trace' = the device's kernel timestamps from a profiler "
                      "trace (falls back to 'wall' where there are none, e.g. CPU), 'wall' = the host "
                      "clock, which adds each run's fixed launch cost (bench/timing.py)")
  p.add_argument("--host-iters", type=int, default=20, help="host-timed single calls (median reported)")
  p.add_argument("--warmup", type=int, default=3, help="untimed single calls before timing")
  p.add_argument("--seed", type=int, default=0, help="base seed; each configuration draws fresh data")
  p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                 help="check outputs against the NumPy oracle (and ours against the reference backend) "
                      "before timing")
  p.add_argument("--time-budget", type=float, default=0.0,
                 help="seconds; once spent, remaining ops/configurations are skipped (0 = no limit)")
  p.add_argument("--csv", default=None, metavar="PATH",
                 help="write results as CSV (rows appended as they finish)")
  p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
  p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                 help="emulate N CPU devices (before JAX starts its backends; for tests)")
  for suite in SUITES.values():
    suite.add_arguments(p.add_argument_group(f"--suite {suite.name}"))
  return p


def _emulate_cpu_devices(n: int) -> None:
  """N CPU devices: must run before JAX initialises its backends (the first device query)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  if "JAX_PLATFORMS" not in os.environ:
    jax.config.update("jax_platforms", "cpu")


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Run the CLI; returns the exit status (1 on any FAIL or ERROR)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  if args.cpu_devices:
    _emulate_cpu_devices(args.cpu_devices)
  suite = SUITES[args.suite]
  devices = jax.local_devices()
  args.ep = args.ep or [len(devices)]
  kind = devices[0].device_kind
  header = [
      f"jax_moe_dispatch benchmark, suite {suite.name}",
      f"date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
      f"device: {len(devices)} x {kind} ({devices[0].platform}); host {platform.node()}",
      f"jax: {jax.__version__} (jaxlib {jaxlib.__version__}); python {platform.python_version()}",
      f"command: {shlex.join(['python', '-m', 'jax_moe_dispatch.bench', *argv])}",
      suite.setting(args),
      "env: " + " ".join(f"{k}={os.environ[k]}" for k in _ENV_KEYS if k in os.environ),
  ]
  for line in header:
    report.log(line)
  session = Session(args, devices, report.CsvFile(args.csv, header, report.csv_fields(suite.row)),
                    suite.columns)
  try:
    suite.run(session)
  except Exception as e:
    traceback.print_exc()
    session.fail(f"ERROR: suite {suite.name}: {type(e).__name__}: {e}")
  session.csv.close()
  if args.plot:
    try:
      suite.plot(args.plot, session.rows, f"{len(devices)} x {kind}, jax {jax.__version__}, "
                 f"T={args.tokens}, E={args.experts}, top-{args.topk}")
    except Exception as e:
      report.log(f"[bench] plot failed: {type(e).__name__}: {e}")
  _print_results(session, header)
  return 1 if session.failures else 0


def _print_results(session: Session, header: Sequence[str]) -> None:
  """The summary block that scripts cut out of the log, between the two markers."""
  report.log("")
  report.log("==== RESULTS ====")
  for line in header[:5]:
    report.log(line)
  report.log(report.table_head(session.columns))
  for row in session.rows:
    report.log(report.table_line(session.columns, row))
  for n in session.notes:
    report.log(f"note: {n}")
  if session.args.csv:
    report.log(f"csv: {session.args.csv}")
  if session.failures:
    report.log(f"FAILURES ({len(session.failures)}):")
    for f in session.failures:
      report.log(f"  {f[:240]}")
  report.log(f"total {session.elapsed():.1f}s; status {'FAIL' if session.failures else 'OK'}")
  report.log("==== END RESULTS ====")
