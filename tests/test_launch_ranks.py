"""scripts/launch_ranks.py: per-rank variables and logs; no rank outlives a failure or timeout."""

import importlib.util
import pathlib
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def launcher():
  spec = importlib.util.spec_from_file_location("launch_ranks_under_test",
                                                ROOT / "scripts" / "launch_ranks.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Dataclasses look their module up.
  spec.loader.exec_module(module)
  return module


def program(body: str) -> list[str]:
  prelude = "import os, sys, time\nr = int(os.environ['JMD_PROCESS_ID'])\n"
  return [sys.executable, "-c", prelude + body]


def test_each_rank_gets_its_variables_and_its_log(launcher, tmp_path):
  (tmp_path / "rank7.log").write_text("stale")
  results = launcher.launch(program(
      "print(r, os.environ['JMD_NUM_PROCESSES'], os.environ['JAX_COORDINATOR_ADDRESS'],"
      " os.environ['JAX_LOCAL_DEVICE_IDS'], os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])"),
      4, gpus=2, timeout_s=60, log_dir=tmp_path)
  assert [r.rank for r in results] == [0, 1, 2, 3] and all(r.ok for r in results)
  assert not (tmp_path / "rank7.log").exists()  # Earlier logs are cleared.
  lines = [r.log.read_text().split() for r in results]
  assert [line[0] for line in lines] == ["0", "1", "2", "3"]
  assert {line[1] for line in lines} == {"4"} and len({line[2] for line in lines}) == 1
  assert [line[3] for line in lines] == ["0", "0", "1", "1"]  # Two ranks per GPU.
  assert {line[4] for line in lines} == {"0.450"}


def test_a_failed_rank_ends_the_others_after_the_grace(launcher, tmp_path):
  start = time.monotonic()
  results = launcher.launch(program("print('hello', flush=True)\nif r == 1: sys.exit(3)\n"
                                    "time.sleep(120)"),
                            3, timeout_s=100, grace_s=1, log_dir=tmp_path)
  assert time.monotonic() - start < 30
  assert results[1].returncode == 3 and results[1].why == ""
  for r in (results[0], results[2]):
    assert r.returncode is None and "after rank 1 failed" in r.why and not r.ok
    assert "hello" in r.tail()


def test_the_timeout_kills_every_rank(launcher, tmp_path):
  start = time.monotonic()
  results = launcher.launch(program("time.sleep(120)"), 2, timeout_s=2, log_dir=tmp_path)
  assert time.monotonic() - start < 30
  assert all(r.returncode is None and r.why == "timeout after 2 s" for r in results)


def test_command_line(launcher, tmp_path, capsys):
  assert launcher.main(["-n", "2", "--log-dir", str(tmp_path), "--",
                        *program("sys.exit(r)")]) == 1
  out = capsys.readouterr().out
  assert "rank 0: ok" in out and "rank 1: exit 1" in out
  assert launcher.main(["-n", "1"]) == 2  # No command.
