"""The benchmark CLI on CPU: tiny settings, every op checked, CSV rows as expected.

Each test runs ``python -m jax_moe_dispatch.bench`` in a subprocess so that it
gets its own emulated CPU devices whatever this process's JAX was set up with.
"""

from __future__ import annotations

import csv
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["--impl", "reference", "--tokens", "64", "--hidden", "128", "--experts", "16", "--topk", "2",
        "--iters", "2", "--reps", "2", "--host-iters", "2", "--warmup", "1"]


def _env() -> dict:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _run(args, code=None, timeout=600):
  cmd = [sys.executable, "-m", "jax_moe_dispatch.bench", *args] if code is None else \
        [sys.executable, "-c", code, *args]
  return subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _read_csv(path):
  with open(path) as f:
    lines = f.read().splitlines()
  header = [l[2:] for l in lines if l.startswith("# ")]
  rows = list(csv.DictReader(l for l in lines if not l.startswith("#")))
  return header, rows


def test_help():
  res = _run(["--help"])
  assert res.returncode == 0, res.stderr
  for flag in ("--suite", "--tokens", "--hidden-sweep", "--ep", "--impl", "--ops", "--fp8", "--num-sms",
               "--iters", "--csv", "--plot", "--time-budget", "--cpu-devices"):
    assert flag in res.stdout


@pytest.mark.slow
def test_cpu_tiny_run(tmp_path):
  out = tmp_path / "bench.csv"
  res = _run([*TINY, "--ep", "2,4", "--csv", str(out), "--plot", str(tmp_path / "bench.png")])
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
  text = res.stdout
  for want in ("device: 4 x cpu", "jax: ", "command: python -m jax_moe_dispatch.bench", "==== RESULTS ====",
               "ragged baseline skipped on CPU", "status OK"):
    assert want in text, want
  header, rows = _read_csv(out)
  assert any(h.startswith("date: ") for h in header)
  assert any(h.startswith("command: ") and "--ep 2,4" in h for h in header)
  got = {(r["op"], r["impl"], r["dtype"], int(r["ep"]), int(r["hidden"])) for r in rows}
  want = set()
  for ep in (2, 4):
    want |= {("dense", "jax", "bf16", ep, 128), ("dispatch", "reference", "bf16", ep, 128),
             ("dispatch", "reference", "fp8", ep, 128), ("combine", "reference", "bf16", ep, 128),
             ("hybrid_dispatch", "reference", "bf16", ep, 128),
             ("hybrid_combine", "reference", "bf16", ep, 128),
             ("memcpy", "ppermute_ring", "bf16", ep, 128), ("memcpy", "device_put", "bf16", ep, 128)}
  assert got == want
  assert len(rows) == len(want)
  for r in rows:
    assert r["check"] == "PASS", r
    assert r["check_detail"].startswith("bitwise equal to the "), r
    assert float(r["time_us"]) > 0 and float(r["host_us"]) > 0, r
    assert float(r["bottleneck_gbps"]) > 0, r
    assert float(r["bottleneck_gbps"]) >= float(r["nvlink_gbps"]) > 0, r
    if r["op"] == "dense":
      assert float(r["vs_dense"]) == 1.0
  # Dispatch and combine count the same bytes; FP8 rows are H + 4 * H / 128 bytes.
  by = {(r["op"], r["dtype"], r["ep"]): r for r in rows}
  for ep in ("2", "4"):
    assert by[("dispatch", "bf16", ep)]["recv_bytes"] == by[("combine", "bf16", ep)]["recv_bytes"]
    bf16 = float(by[("dispatch", "bf16", ep)]["recv_bytes"])
    fp8 = float(by[("dispatch", "fp8", ep)]["recv_bytes"])
    assert fp8 == pytest.approx(bf16 * (128 + 4) / 256)


# A reference backend whose permutation swaps two rows: the guard must say FAIL,
# loudly, and the exit status must be 1.
_BROKEN = """
import sys
import jax_moe_dispatch.core.permute as p
orig = p.permute
def bad(rows, perm):
  out = orig(rows, perm)
  return out.at[0].set(out[1])
p.permute = bad
from jax_moe_dispatch import bench
sys.exit(bench.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_fail_is_loud(tmp_path):
  out = tmp_path / "bench.csv"
  res = _run([*TINY, "--ep", "2", "--ops", "hybrid_dispatch,dispatch", "--no-fp8", "--csv", str(out)],
             code=_BROKEN)
  assert res.returncode == 1, res.stdout[-4000:] + res.stderr[-4000:]
  assert "!!! CORRECTNESS FAIL" in res.stdout and "!!! CORRECTNESS FAIL" in res.stderr
  _, rows = _read_csv(out)
  checks = {r["op"]: r["check"] for r in rows}
  assert checks == {"dispatch": "PASS", "hybrid_dispatch": "FAIL"}


@pytest.mark.slow
def test_bench_to_md(tmp_path):
  out = tmp_path / "bench.csv"
  res = _run([*TINY, "--ep", "2", "--ops", "dispatch,dense", "--no-fp8", "--csv", str(out)])
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
  md = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_to_md.py"), str(out)],
                      capture_output=True, text=True, check=True).stdout
  assert "| op | impl |" in md
  assert "| dispatch | reference | bf16 | 2 | 128 | PASS |" in md
  assert "command: `python -m jax_moe_dispatch.bench" in md


# ----------------------------------------------------------------------------
# The timing harness, in this process (8 emulated CPU devices, see conftest.py).

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_moe_dispatch.bench import ops, timing  # noqa: E402


def _wrap(mesh):
  return functools.partial(jax.shard_map, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"), check_vma=False)


def _loop_bodies(text: str) -> str:
  """The HLO text of every computation that is a while loop's body."""
  bodies = set(re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", text))
  heads = [(re.match(r"%?([\w.\-]+)", c), c) for c in re.split(r"\n(?=\S)", text)]
  return "\n".join(c for m, c in heads if m and m.group(1) in bodies)


def test_chain_calls_in_the_loop_and_changes_nothing(make_mesh):
  mesh = make_mesh(4)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4 * 16, 128)), jnp.float32)
  compiled = timing.compile_loop(ops.ppermute_ring, (x,), iters=5, wrap=_wrap(mesh))
  assert "collective-permute(" in _loop_bodies(compiled.as_text())  # Not hoisted out of the loop.
  (carried,), out = compiled(jnp.copy(x))
  np.testing.assert_array_equal(carried, x)
  np.testing.assert_array_equal(out, np.roll(np.asarray(x).reshape(4, 16, 128), 1, axis=0).reshape(64, 128))


def test_no_per_call_copies_where_feeding_the_output_back_copied(make_mesh):
  # A ring of 1 MiB per rank. Feeding each call's output back as the next input (the
  # old harness) makes XLA copy the buffer every iteration; the chain copies nothing.
  # (XLA:CPU splits all_to_all into per-peer slices and fuses the one-element rewrite
  # into them, so the dense baseline's loop is only meaningful on GPU, where the
  # benchmark reports loop_copy_bytes for every row.)
  mesh = make_mesh(4)
  x = jnp.ones((4 * 256, 1024), jnp.float32)
  feedback = lambda a: jax.lax.fori_loop(0, 5, lambda _, v: ops.ppermute_ring(v), a)  # noqa: E731
  old = jax.jit(_wrap(mesh)(feedback)).lower(x).compile()
  assert timing.loop_copy_bytes(old) >= 2**20
  new = timing.compile_loop(ops.ppermute_ring, (x,), iters=5, wrap=_wrap(mesh))
  assert timing.loop_copy_bytes(new) == 0


def test_device_time_on_one_device_leaves_the_arguments():
  a = jnp.asarray(np.random.default_rng(1).normal(size=(64, 32)), jnp.float32)
  b = jnp.asarray(np.random.default_rng(2).normal(size=(32, 16)), jnp.float32)
  t = timing.device_time(jnp.matmul, (a, b), iters=3, reps=3)
  assert 0 < t.min_s <= t.median_s <= t.max_s
  assert t.copy_bytes == 0
  np.testing.assert_array_equal(a @ b, jnp.matmul(a, b))  # a and b were not donated away.


def test_trace_clock_falls_back_to_wall_without_device_kernels():
  a = jnp.asarray(np.random.default_rng(3).normal(size=(32, 32)), jnp.float32)
  t = timing.device_time(jnp.matmul, (a, a), iters=2, reps=2, clock="trace")
  assert t.clock == "wall" and 0 < t.min_s <= t.median_s <= t.max_s
  with pytest.raises(ValueError, match="clock"):
    timing.device_time(jnp.matmul, (a, a), iters=2, reps=1, clock="cpu")


def _write_trace(log_dir: pathlib.Path, kernels: dict) -> None:
  """A Perfetto trace as jax.profiler writes it: device process names, then kernel events (us)."""
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 1, "ts": 0.0, "dur": 10_000.0, "name": "host work"}]
  for pid, (name, intervals) in enumerate(kernels.items(), start=2):
    events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}})
    events += [{"ph": "X", "pid": pid, "ts": a, "dur": b - a, "name": "k"} for a, b in intervals]
  (log_dir / "plugins" / "profile" / "run").mkdir(parents=True)
  import gzip
  import json
  with gzip.open(log_dir / "plugins" / "profile" / "run" / "host.perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)


def test_run_spans_splits_runs_at_the_widest_gaps_and_takes_the_slowest_device(tmp_path):
  # Two runs of three kernels per device (1 us gaps inside a run, 500 us between runs).
  gpu0 = [(0, 100), (101, 150), (151, 300), (800, 900), (901, 950), (951, 1000)]
  gpu1 = [(5, 100), (101, 150), (151, 320), (805, 900), (901, 950), (951, 990)]
  _write_trace(tmp_path, {"/device:GPU:0": gpu0, "/device:GPU:1": gpu1})
  spans = timing.run_spans(str(tmp_path), 2)
  np.testing.assert_allclose(spans, [315e-6, 200e-6])
  assert timing.run_spans(str(tmp_path), 7) == []  # Fewer kernels than runs: no spans.


def test_device_time_needs_a_floating_output():
  with pytest.raises(ValueError, match="floating-point output"):
    timing.device_time(lambda i: i + 1, (jnp.arange(4),), iters=2, reps=1)
