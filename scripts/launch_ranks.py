#!/usr/bin/env python
"""Start N processes of one JAX program on this machine as the ranks of one ``jax.distributed`` job.

    python scripts/launch_ranks.py -n 8 --gpus 1 -- python my_program.py --its-flags
    python scripts/launch_ranks.py -n 2 -- python my_program.py       # CPU processes

Each process gets, in its environment:

* ``JAX_COORDINATOR_ADDRESS`` (``127.0.0.1:<free port>``), ``JMD_NUM_PROCESSES``
  and ``JMD_PROCESS_ID``: what :func:`jax.distributed.initialize` needs
  (:func:`jax_moe_dispatch.backends.distributed.initialize_from_launcher` reads them);
* with ``--gpus G``: ``JAX_LOCAL_DEVICE_IDS`` (GPU ``i * G // N`` for process
  ``i``: N/G processes share each GPU, each as its own rank),
  ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` and
  ``XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 * G / N`` (the processes of one GPU
  split its memory). Every process sees every GPU.

Each process's stdout and stderr go to ``<log-dir>/rank<i>.log`` (the folder's
earlier ``rank*`` files are removed first). The launcher waits for all of them,
kills them all (process groups) after ``--timeout`` seconds or ``--grace``
seconds after the first one fails, prints one line per rank and exits non-zero
unless every rank exited 0. Importable: :func:`launch` does the same and returns
the per-rank results. Standard library only.

Several processes on one GPU time-slice it: they are for checking correctness
at many ranks on few GPUs, not for speed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Mapping, Optional, Sequence


@dataclasses.dataclass
class RankResult:
  """How one process ended."""

  rank: int
  returncode: Optional[int]  # None: killed by the launcher.
  log: pathlib.Path
  why: str  # "" if it exited by itself, else why the launcher killed it.

  @property
  def ok(self) -> bool:
    return self.returncode == 0

  def tail(self, chars: int = 3000) -> str:
    try:
      return self.log.read_text(errors="replace")[-chars:]
    except OSError as e:
      return f"(no log: {e})"


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def rank_env(rank: int, num_processes: int, port: int, gpus: int) -> dict[str, str]:
  """The variables process ``rank`` gets (see the module docstring)."""
  env = {
      "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
      "JMD_NUM_PROCESSES": str(num_processes),
      "JMD_PROCESS_ID": str(rank),
  }
  if gpus:
    env["JAX_LOCAL_DEVICE_IDS"] = str(rank * gpus // num_processes)
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 * gpus / num_processes:.3f}"
  return env


def _kill(proc: subprocess.Popen) -> None:
  """Terminate the process group the launcher started for ``proc``, then kill what is left."""
  for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
    if proc.poll() is not None:
      return
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      return
    try:
      proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
      pass


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    gpus: int = 0,
    timeout_s: float = 600.0,
    grace_s: float = 30.0,
    log_dir: os.PathLike | str,
    env: Optional[Mapping[str, str]] = None,
) -> list[RankResult]:
  """Run ``command`` as ``num_processes`` ranks and wait for them (see the module docstring).

  Args:
    command: the program and its arguments, the same for every rank.
    num_processes: how many ranks.
    gpus: how many GPUs to spread them over (0: no GPU variables). Must divide
      ``num_processes``.
    timeout_s: every process still running after this long is killed.
    grace_s: once a process has exited non-zero, how long the others may still
      run (they may be waiting for it) before they are killed.
    log_dir: where ``rank<i>.log`` go; earlier ``rank*`` files there are removed.
    env: the base environment (default: this process's).

  Returns:
    One :class:`RankResult` per rank, in rank order.
  """
  if num_processes < 1:
    raise ValueError(f"num_processes must be >= 1, got {num_processes}")
  if gpus < 0 or (gpus and num_processes % gpus):
    raise ValueError(f"gpus={gpus} must be 0 or divide num_processes={num_processes}")
  log_dir = pathlib.Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  for old in log_dir.glob("rank*"):
    old.unlink()
  port = free_port()
  base = dict(os.environ if env is None else env)
  procs, logs = [], []
  try:
    for rank in range(num_processes):
      log = log_dir / f"rank{rank}.log"
      logs.append(log)
      with open(log, "wb") as out:
        procs.append(subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**base, **rank_env(rank, num_processes, port, gpus)}, start_new_session=True))
    why = [""] * num_processes
    deadline = time.monotonic() + timeout_s
    reason = f"timeout after {timeout_s:g} s"
    while any(p.poll() is None for p in procs):
      now = time.monotonic()
      failed = [p for p in procs if p.poll() not in (None, 0)]
      if failed and deadline > now + grace_s:
        deadline = now + grace_s
        reason = f"killed {grace_s:g} s after rank {procs.index(failed[0])} failed"
      elif now >= deadline:
        for rank, p in enumerate(procs):
          if p.poll() is None:
            why[rank] = reason
            _kill(p)
        break
      time.sleep(0.1)
  finally:
    for p in procs:  # Also on KeyboardInterrupt and errors: leave nothing running.
      _kill(p)
  return [RankResult(rank, None if why[rank] else p.returncode, logs[rank], why[rank])
          for rank, p in enumerate(procs)]


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    print("usage: launch_ranks.py -n N [--gpus G] [--timeout S] [--grace S] [--log-dir D] "
          "-- command ...", file=sys.stderr)
    return 2
  split = argv.index("--")
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("-n", "--num-processes", type=int, required=True)
  p.add_argument("--gpus", type=int, default=0, help="GPUs to spread the processes over")
  p.add_argument("--timeout", type=float, default=600.0, help="seconds before every rank is killed")
  p.add_argument("--grace", type=float, default=30.0,
                 help="seconds the others may run after one rank failed")
  p.add_argument("--log-dir", default="rank_logs")
  args = p.parse_args(argv[:split])
  command = argv[split + 1:]
  if not command:
    p.error("no command after --")
  results = launch(command, args.num_processes, gpus=args.gpus, timeout_s=args.timeout,
                   grace_s=args.grace, log_dir=args.log_dir)
  for r in results:
    status = "ok" if r.ok else (f"exit {r.returncode}" if r.returncode is not None else r.why)
    print(f"rank {r.rank}: {status} ({r.log})")
  bad = [r for r in results if not r.ok]
  if bad:
    print(f"--- last lines of {bad[0].log}:\n{bad[0].tail(2000)}", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
