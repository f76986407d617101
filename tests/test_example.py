"""examples/train_moe.py trains: the loss falls, in-process and as a script."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_moe.py"


def load_example():
  spec = importlib.util.spec_from_file_location("train_moe", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("argv", [
    ["--steps", "30"],
    ["--steps", "20", "--backend", "hybridep", "--capacity-factor", "1.5", "--ep", "4"],
])
def test_loss_falls(argv):
  losses = load_example().main([*argv, "--devices", "cpu", "--quiet"])
  assert len(losses) == int(argv[1]) and np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.5 * losses[0], losses


@pytest.mark.slow
def test_script_runs_as_readme_says():
  """`python examples/train_moe.py` sets up its own CPU devices (XLA_FLAGS unset here)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  out = subprocess.run([sys.executable, str(SCRIPT), "--steps", "3", "--quiet"], env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "8 x cpu on axis 'ep'" in out.stdout and "loss: first" in out.stdout, out.stdout
