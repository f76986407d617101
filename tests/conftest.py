"""Shared test set-up: 8 emulated CPU devices, a mesh helper, the gpu/slow markers.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is added before JAX is
imported (it only affects the CPU platform, so GPU runs keep their GPUs).
``gpu``-marked tests skip unless JAX sees at least one GPU. Matmuls run at
full precision (no TF32) so that numeric oracles hold on GPUs too.
"""

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

# Full-precision matmuls, so float64 oracles also hold on GPUs (TF32 by default).
jax.config.update("jax_default_matmul_precision", "highest")


def mesh(n: int, axis_name: str = "ep", platform: str = "cpu") -> Mesh:
  """A 1-D mesh over the first ``n`` devices of ``platform`` (CPU by default, also on GPU hosts).

  Built with ``jax.sharding.Mesh`` (not ``jax.make_mesh``, whose Explicit axis
  types break ``shard_map`` in_specs in jax 0.10).
  """
  devices = jax.devices(platform)
  if len(devices) < n:
    pytest.skip(f"needs {n} {platform} devices, found {len(devices)}")
  return Mesh(np.array(devices[:n]), (axis_name,))


@pytest.fixture
def make_mesh():
  """The :func:`mesh` helper as a fixture."""
  return mesh


def gpu_count() -> int:
  try:
    return len(jax.devices("gpu"))
  except RuntimeError:
    return 0


def pytest_configure(config):
  config.addinivalue_line("markers", "gpu: needs NVIDIA GPUs; skipped without them")
  config.addinivalue_line("markers", "slow: slower CPU test (still part of the default run)")


def pytest_collection_modifyitems(config, items):
  gpu_items = [item for item in items if "gpu" in item.keywords]
  if gpu_items and gpu_count() == 0:
    skip = pytest.mark.skip(reason="no GPU visible to JAX")
    for item in gpu_items:
      item.add_marker(skip)
