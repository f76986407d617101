"""On >= 2 GPUs: the example's training step with the native backend equals the reference's."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import gpu_count
from jax.sharding import Mesh

pytestmark = pytest.mark.gpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _native_reason():
  if gpu_count() < 2:
    return f"needs >= 2 GPUs, found {gpu_count()}"
  try:
    from jax_moe_dispatch.backends import native
  except ImportError as e:
    return f"native backend module missing: {e}"
  if not native.native_available():
    return f"native backend unavailable: {native.native_unavailable_reason()}"
  return None


@pytest.fixture(scope="module")
def example():
  reason = _native_reason()
  if reason:
    pytest.skip(reason)
  from test_example import load_example

  return load_example()


def _one_step(example, implementation, backend):
  # SGD so that parameter differences are gradient differences (Adam's first
  # step is lr * sign(g), which amplifies rounding noise on tiny gradients).
  args = example.parse_args(["--devices", "gpu", "--implementation", implementation,
                             "--backend", backend, "--optimizer", "sgd", "--lr", "0.1"])
  _, devices = example.select_devices("gpu", None)
  if implementation == "native":
    example.setup_buffers(Mesh(np.array(devices), ("ep",)), args.hidden * 4, args.tokens)
  _, _, params, opt_state, train_step = example.build(args, devices)
  params, _, loss = train_step(params, opt_state, jax.numpy.int32(0))
  return jax.device_get(params), float(loss)


@pytest.mark.parametrize("backend", ["deepep", "hybridep"])
def test_native_step_equals_reference(example, backend):
  ref_params, ref_loss = _one_step(example, "reference", backend)
  params, loss = _one_step(example, "native", backend)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_twenty_native_steps_do_not_hang(example):
  """A subprocess with a timeout: a hung kernel cannot be interrupted from Python."""
  # The installed package (with its built extension), not the source tree.
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  cmd = [sys.executable, str(ROOT / "examples" / "train_moe.py"), "--devices", "gpu",
         "--implementation", "native", "--steps", "20", "--quiet"]
  try:
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"20 native training steps did not finish in 300 s (hang?): {e}")
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  assert "-> native" in out.stdout and "loss: first" in out.stdout, out.stdout
