"""Several processes as the ranks of one expert axis (``jax.distributed``).

``scripts/launch_ranks.py`` starts N copies of ``tests/multirank/worker.py``;
each joins the job, runs the ops for its own rank over the global mesh and
checks that rank against the NumPy oracle (rows, metadata and handles bit for
bit, combine sums bit for bit where their float32 order is fixed), writing one
result per case and rank. A test here passes when every rank passed the case.

* CPU (CI): 2 processes with jax's CPU collectives (gloo) run the reference
  backend's ops and the example's training step; the training step equals the
  same step run in this one process over 2 devices, bit for bit.
* GPU (``gpu`` marker): the native backend with ep = 2, 4 and 8 ranks, one
  process each, spread over the GPUs there are (N processes share one GPU on a
  one-GPU machine; no XLA collective runs, which would fail there), through
  every case: dispatch/combine in three dtypes, drops, skew, cached dispatch
  and gradients, hybrid, many calls with fresh routing, a straggler, ranks
  running different ops or shapes as one call (every rank ends it naming both
  signatures, then recovers after a reset), 100 buffer set-up/free cycles
  (device memory where it started), a HybridEP round trip larger than
  init_hybrid_ep_buffer's staging (grown once while tracing, freeing the old)
  and a dead peer (bounded errors naming it); and, with 2 GPUs or more, the example's
  training step with one process per GPU (its gradient all-reduce through
  XLA next to the native ops). The many-calls case runs up to 1000 pairs but
  starts no chunk after 30 s (ranks sharing a GPU time-slice it) and needs
  at least 100. ``JMD_MULTIRANK_TIMEOUT_S`` (default 270) bounds each ep's
  run, ``JMD_MULTIRANK_ARGS`` adds worker flags (e.g. ``--calls-budget 120``);
  ``-rP`` shows each case's time per rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import sys
import threading

import jax
import numpy as np
import pytest
from conftest import gpu_count
from jax.sharding import Mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multirank" / "worker.py"


def _load(name: str, path: pathlib.Path):
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Before it runs: dataclasses look their module up.
    spec.loader.exec_module(module)
  return sys.modules[name]


launcher = _load("launch_ranks", ROOT / "scripts" / "launch_ranks.py")
worker = _load("multirank_worker", WORKER)

# The example runs XLA collectives, which fail when processes share a GPU.
GPU_CASES = [name for name, impls in worker.CASES.items()
             if "native" in impls and name != "example"]
CPU_CASES = ["dispatch_combine_bf16", "cached_and_grads", "hybrid", "exchange_timeout", "example"]
EXAMPLE_STEPS = 2


class Run:
  """The per-rank results of one launch."""

  def __init__(self, num_ranks: int, results, out: pathlib.Path):
    self.num_ranks = num_ranks
    self.results = results
    self.records: dict[str, dict[int, dict]] = {}
    for rank in range(num_ranks):
      path = out / f"rank{rank}.jsonl"
      for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        self.records.setdefault(record["case"], {})[rank] = record

  def check(self, case: str) -> dict[int, dict]:
    """The case's record of every rank; fails naming the ranks that failed or gave none."""
    records = self.records.get(case, {})
    missing = [r for r in range(self.num_ranks) if r not in records]
    failed = {r: rec["error"] for r, rec in sorted(records.items()) if not rec["ok"]}
    if missing or failed:
      logs = "\n".join(
          f"--- rank {r.rank} (exit {r.returncode}{', ' + r.why if r.why else ''}), "
          f"last lines of {r.log}:\n{r.tail(2500)}"
          for r in self.results if r.rank in missing or r.rank in failed)
      pytest.fail(f"{case}: failed on ranks {failed}; no result from ranks {missing}\n{logs}",
                  pytrace=False)
    return records

  def summary(self) -> str:
    lines = []
    for case, records in self.records.items():
      times = [records[r]["seconds"] for r in sorted(records)]
      extra = {k: v for k, v in records[min(records)].items()
               if k not in ("case", "rank", "ok", "error", "seconds", "checks")}
      lines.append(f"{case:24s} ok={all(r['ok'] for r in records.values())} "
                   f"seconds/rank={times} {extra}")
    codes = [r.returncode if r.returncode is not None else r.why for r in self.results]
    return "\n".join(lines + [f"exit codes: {codes}"])


def launch(impl: str, num_ranks: int, out: pathlib.Path, *, gpus: int, timeout_s: float,
           args=()) -> Run:
  results = launcher.launch(
      [sys.executable, str(WORKER), "--impl", impl, "--out", str(out), *args], num_ranks,
      gpus=gpus, timeout_s=timeout_s, log_dir=out)
  return Run(num_ranks, results, out)


# ----------------------------------------------------------------------------
# CPU: the reference backend over 2 processes equals one process.


def _example_steps(implementation: str, devices):
  """The worker's example steps in this process: (losses as hex, parameters)."""
  example = _load("train_moe", ROOT / "examples" / "train_moe.py")
  args = example.parse_args(worker.example_argv(implementation))
  if implementation == "native":
    example.setup_buffers(Mesh(np.array(devices), ("ep",)), args.hidden * 4, args.tokens)
  _, _, params, opt_state, step = example.build(args, devices)
  losses = []
  for i in range(EXAMPLE_STEPS):
    params, opt_state, loss = step(params, opt_state, jax.numpy.int32(i))
    losses.append(float(loss).hex())
  return losses, params


def test_two_cpu_processes_equal_one_process(tmp_path):
  runs = []
  thread = threading.Thread(target=lambda: runs.append(launch(
      "reference", 2, tmp_path, gpus=0, timeout_s=240,
      args=["--cases", ",".join(CPU_CASES), "--example-steps", str(EXAMPLE_STEPS)])))
  thread.start()
  try:  # Meanwhile, the same training steps in this process, over 2 of its CPU devices.
    devices = jax.devices("cpu")[:2]
    losses, params = _example_steps("reference", devices)
  finally:
    thread.join()
  (run,) = runs
  for case in CPU_CASES:
    run.check(case)
  for rank, record in run.records["example"].items():
    assert record["losses"] == losses, (rank, record["losses"], losses)
    assert record["params_sha256"] == worker.shard_digest(params, devices[rank]), rank


# ----------------------------------------------------------------------------
# GPU: the native backend with ep = 2, 4, 8 processes on however many GPUs there are.

_gpu_runs: dict[int, Run] = {}


def _gpus_for(num_ranks: int) -> int:
  """The most GPUs (at most one per rank) that split the ranks evenly."""
  g = min(gpu_count(), num_ranks)
  while num_ranks % g:
    g -= 1
  return g


@pytest.fixture(scope="module", params=[2, 4, 8], ids=lambda n: f"ep{n}")
def native_run(request, tmp_path_factory) -> Run:
  n = request.param
  if n not in _gpu_runs:
    from jax_moe_dispatch.backends import native

    assert native.native_available(), native.native_unavailable_reason()
    out = tmp_path_factory.mktemp(f"ranks_ep{n}")
    timeout = float(os.environ.get("JMD_MULTIRANK_TIMEOUT_S", 270))
    extra = shlex.split(os.environ.get("JMD_MULTIRANK_ARGS", ""))
    _gpu_runs[n] = launch("native", n, out, gpus=_gpus_for(n), timeout_s=timeout,
                          args=["--cases", ",".join(GPU_CASES), "--calls-budget", "30", *extra])
    print(f"\nep={n} on {_gpus_for(n)} GPU(s), logs in {out}:\n{_gpu_runs[n].summary()}")
  return _gpu_runs[n]


@pytest.mark.gpu
def test_native_training_one_process_per_gpu(tmp_path):
  """The example's training step (native ops, XLA's gradient all-reduce), one process per GPU."""
  if gpu_count() < 2:
    pytest.skip(f"needs 2 GPUs (XLA collectives fail on a shared GPU), found {gpu_count()}")
  run = launch("native", 2, tmp_path, gpus=2, timeout_s=240,
               args=["--cases", "example", "--example-steps", str(EXAMPLE_STEPS)])
  records = run.check("example")
  losses, params = _example_steps("native", jax.devices("gpu")[:2])
  for rank, record in records.items():
    got = [float.fromhex(v) for v in record["losses"]]
    np.testing.assert_allclose(got, [float.fromhex(v) for v in losses], rtol=1e-5,
                               err_msg=f"rank {rank}")


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_native_ranks(native_run, case):
  records = native_run.check(case)
  if case == "many_calls":
    calls = records[0]["calls"]
    assert calls >= 100, f"only {calls} dispatch+combine pairs ran within the budget"
