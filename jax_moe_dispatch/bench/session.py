"""What a benchmark suite is, and what it runs in: flags, devices, time budget, results."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Callable, Sequence

import jax

from jax_moe_dispatch.bench import report


@dataclasses.dataclass
class Session:
  """One run of one suite.

  Attributes:
    args: the parsed command line (common flags and the suite's own).
    devices: ``jax.local_devices()``.
    csv: where finished rows are appended.
    columns: the suite's printed table.
    start: ``time.perf_counter()`` when the run started.
    rows, notes, failures: what the run produced, in order.
  """

  args: argparse.Namespace
  devices: Sequence[jax.Device]
  csv: report.CsvFile
  columns: Sequence[report.Column]
  start: float = dataclasses.field(default_factory=time.perf_counter)
  rows: list = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)
  failures: list[str] = dataclasses.field(default_factory=list)

  @property
  def on_cpu(self) -> bool:
    return self.devices[0].platform == "cpu"

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def over_budget(self) -> bool:
    """Whether ``--time-budget`` seconds are spent (never, when it is 0)."""
    return self.args.time_budget > 0 and self.elapsed() > self.args.time_budget

  def fits(self, scratch_bytes: float, what: str) -> bool:
    """Whether ``scratch_bytes`` fit on the first device (at most 60% of its memory limit); notes it when not."""
    stats = self.devices[0].memory_stats() or {}
    limit = float(stats.get("bytes_limit", 0)) or float("inf")
    if scratch_bytes <= 0.6 * limit:
      return True
    self.note(f"{what} not run: XLA wants {scratch_bytes / 2**30:.0f} GiB of scratch "
              f"(device limit {limit / 2**30:.0f} GiB)")
    return False

  def progress(self, msg: str) -> None:
    report.log(f"[{self.elapsed():7.1f}s] {msg}")

  def note(self, msg: str) -> None:
    """A note for the results section (each distinct note once)."""
    if msg not in self.notes:
      self.notes.append(msg)
      report.log(f"[bench] note: {msg}")

  def fail(self, msg: str, *, correctness: bool = False) -> None:
    """Record a failure (the exit status becomes 1) and print it in a banner on stdout and stderr."""
    self.failures.append(msg)
    banner = "!" * 78
    kind = "CORRECTNESS " if correctness else ""
    for stream in (sys.stdout, sys.stderr):
      print(f"{banner}\n!!! {kind}{msg}\n{banner}", file=stream, flush=True)

  def add(self, row: Any, label: str) -> None:
    """A finished row: logged, appended to the CSV and to the results table."""
    self.progress(f"{label}: {report.table_line(self.columns, row)}")
    self.rows.append(row)
    self.csv.add(row)


@dataclasses.dataclass(frozen=True)
class Suite:
  """One benchmark table, as the CLI runs it (``--suite NAME``).

  Attributes:
    name: the ``--suite`` value.
    description: one line for ``--help``.
    row: the dataclass of one result row; its fields are the CSV columns.
    columns: the printed table.
    add_arguments: adds the suite's own flags to its ``argparse`` group.
    setting: one header line describing what runs, from the parsed flags.
    run: measures, adding each finished row with :meth:`Session.add`.
    plot: writes the ``--plot`` PNG of the rows: ``plot(path, rows, title)``.
  """

  name: str
  description: str
  row: type
  columns: Sequence[report.Column]
  add_arguments: Callable[[Any], None]
  setting: Callable[[argparse.Namespace], str]
  run: Callable[[Session], None]
  plot: Callable[[str, Sequence[Any], str], None]
