"""Where benchmark results go: the printed table, the CSV file and the bar chart.

A suite's rows are dataclass instances: every field is a CSV column, and the
suite's :class:`Column` list picks the fields of the printed table. Floats
that are NaN print as ``-`` and are empty in the CSV.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Any, Callable, Optional, Sequence


def log(msg: str) -> None:
  """Print one line now (the log is read while a long run is still going)."""
  print(msg, flush=True)


@dataclasses.dataclass(frozen=True)
class Column:
  """One column of the printed table.

  Attributes:
    field: the row attribute shown.
    title: the header.
    width: characters.
    spec: format spec of numbers (e.g. ``".1f"``), right-aligned; ``""`` for
      text, left-aligned and cut to ``width``.
  """

  field: str
  title: str
  width: int
  spec: str = ""


def table_head(columns: Sequence[Column]) -> str:
  """The header line of the printed table."""
  return " ".join(f"{c.title:<{c.width}}" if not c.spec else f"{c.title:>{c.width}}" for c in columns)


def table_line(columns: Sequence[Column], row: Any) -> str:
  """One row of the printed table."""
  cells = []
  for c in columns:
    v = getattr(row, c.field)
    if not c.spec:
      cells.append(f"{str(v)[:c.width]:<{c.width}}")
    elif isinstance(v, float) and math.isnan(v):
      cells.append(f"{'-':>{c.width}}")
    else:
      cells.append(f"{v:>{c.width}{c.spec}}")
  return " ".join(cells)


def csv_fields(row_type: type) -> list[str]:
  """The CSV columns of a suite: the fields of its row dataclass, in order."""
  return [f.name for f in dataclasses.fields(row_type)]


class CsvFile:
  """A CSV of rows, written as they finish: ``# key: value`` header lines, then a header row.

  With ``path=None`` nothing is written.
  """

  def __init__(self, path: Optional[str], header: Sequence[str], fields: Sequence[str]):
    self.path = path
    self._file = None
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._file = open(path, "w", newline="")
      for line in header:
        self._file.write(f"# {line}\n")
      self._writer = csv.DictWriter(self._file, fieldnames=list(fields))
      self._writer.writeheader()
      self._file.flush()

  def add(self, row: Any) -> None:
    if self._file:
      self._writer.writerow({k: _csv_value(v) for k, v in dataclasses.asdict(row).items()})
      self._file.flush()

  def close(self) -> None:
    if self._file:
      self._file.close()
      self._file = None


def _csv_value(v: Any) -> Any:
  if isinstance(v, float):
    return "" if math.isnan(v) else f"{v:.6g}"
  return v


def bar_chart(path: str, rows: Sequence[Any], *, value: str, label: Callable[[Any], str],
              panel: str, series: str, ylabel: str, title: str) -> None:
  """A PNG of grouped bars: one panel per ``panel`` value, one bar colour per ``series`` value.

  Rows whose ``value`` is NaN are left out. Needs matplotlib; without it, says
  so and writes nothing.
  """
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    log(f"[bench] matplotlib is not importable: no plot written to {path}")
    return
  rows = [r for r in rows if not math.isnan(getattr(r, value))]
  if not rows:
    log("[bench] nothing timed: no plot written")
    return
  panels = sorted({getattr(r, panel) for r in rows})
  kinds = sorted({getattr(r, series) for r in rows})
  labels = list(dict.fromkeys(label(r) for r in rows))
  fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.1 * len(labels) + 2), 3.6 * len(panels)),
                           squeeze=False)
  width = 0.8 / len(kinds)
  for ax, p in zip(axes[:, 0], panels):
    for j, k in enumerate(kinds):
      vals = {label(r): getattr(r, value) for r in rows if getattr(r, panel) == p and getattr(r, series) == k}
      xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(labels))]
      ax.bar(xs, [vals.get(lab, 0.0) for lab in labels], width, label=f"{series}={k}")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{panel}={p}")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  log(f"[bench] plot written to {path}")
