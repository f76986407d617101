#!/usr/bin/env python3
"""Turn a CSV written by ``python -m jax_moe_dispatch.bench --csv`` into Markdown.

Usage: python scripts/bench_to_md.py bench.csv [more.csv ...] > section.md

The ``# key: value`` header lines of the CSV (date, device, jax, command,
setting) become a list above the table; the table has one row per op x impl x
dtype x ep x hidden. Paste the output under "Results" in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys

COLUMNS = (
    ("op", "op", None),
    ("impl", "impl", None),
    ("dtype", "dtype", None),
    ("ep", "ep", None),
    ("hidden", "H", None),
    ("check", "check", None),
    ("time_us", "time (us)", ".1f"),
    ("host_us", "host (us)", ".1f"),
    ("bottleneck_gbps", "bottleneck GB/s", ".1f"),
    ("nvlink_gbps", "nvlink GB/s", ".1f"),
    ("vs_dense", "vs dense x", ".2f"),
)
HEADER_KEYS = ("date", "device", "jax", "command", "setting", "env")


def _cell(value: str, spec) -> str:
  if value in ("", None):
    return "-"
  if spec:
    try:
      v = float(value)
    except ValueError:
      return value
    return "-" if math.isnan(v) else format(v, spec)
  return value.replace("|", "\\|")


def convert(path: str) -> str:
  with open(path) as f:
    lines = f.read().splitlines()
  meta = {}
  for line in lines:
    if line.startswith("# ") and ": " in line:
      key, value = line[2:].split(": ", 1)
      meta[key] = value
  rows = list(csv.DictReader(l for l in lines if not l.startswith("#")))
  out = []
  for key in HEADER_KEYS:
    if key in meta:
      value = f"`{meta[key]}`" if key in ("command", "env") else meta[key]
      out.append(f"- {key}: {value}")
  out.append("")
  out.append("| " + " | ".join(title for _, title, _ in COLUMNS) + " |")
  out.append("|" + "|".join("---" if spec is None else "---:" for _, _, spec in COLUMNS) + "|")
  for r in rows:
    out.append("| " + " | ".join(_cell(r.get(key, ""), spec) for key, _, spec in COLUMNS) + " |")
  notes = sorted({r["note"] for r in rows if r.get("note")})
  ok = ("PASS", "PASS(1ulp)", "n/a")  # PASS(1ulp): CSVs from before the shared oracle.
  fails = [r for r in rows if r.get("check") not in ok]
  if notes or fails:
    out.append("")
  for n in notes:
    out.append(f"- note: {n}")
  for r in fails:
    out.append(f"- **{r['check']}** {r['op']}/{r['impl']}/{r['dtype']} ep={r['ep']} H={r['hidden']}: "
               f"{r.get('check_detail', '')}")
  return "\n".join(out) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("csv", nargs="+", help="CSV files from the benchmark CLI")
  args = p.parse_args(argv)
  sys.stdout.write("\n".join(convert(path) for path in args.csv))
  return 0


if __name__ == "__main__":
  sys.exit(main())
