"""Run per-rank functions over emulated CPU devices and compare with the oracle.

Import this before jax in a test module: it makes sure 8 host devices exist
(the flag only works before jax initialises its backends).
"""

from __future__ import annotations

import functools
import os
import sys
import zlib

_FLAG = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402


def need_devices(n: int) -> None:
  if len(jax.devices()) < n:
    pytest.skip(f"needs {n} devices, have {len(jax.devices())} (set XLA_FLAGS={_FLAG} before jax starts)")


@functools.cache
def mesh(ep: int) -> Mesh:
  need_devices(ep)
  return Mesh(np.array(jax.devices()[:ep]), ("ep",))


def _squeeze(tree):
  return jax.tree.map(lambda v: v[0], tree)


def _expand(tree):
  return jax.tree.map(lambda v: v[None], tree)


def ep_map(fn, ep: int, mode: str = "shard_map"):
  """Return ``g(*args)`` running ``fn`` per rank; args/outputs have a leading ``[ep]`` axis.

  ``mode``: ``"shard_map"`` (``jax.jit(jax.shard_map(...))`` over a 1-D mesh
  ``("ep",)``) or ``"pmap"`` (``jax.pmap(axis_name="ep")``).
  """
  need_devices(ep)
  if mode == "pmap":
    return jax.pmap(fn, axis_name="ep", devices=jax.devices()[:ep])
  assert mode == "shard_map", mode

  def per_rank(*args):
    return _expand(fn(*_squeeze(args)))

  return jax.jit(jax.shard_map(per_rank, mesh=mesh(ep), in_specs=P("ep"), out_specs=P("ep")))


def to_np(tree):
  return jax.tree.map(np.asarray, tree)


def bits(a) -> np.ndarray:
  """View an array as unsigned ints of its width, for bitwise comparison."""
  a = np.ascontiguousarray(np.asarray(a))
  return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bitwise(got, want, what: str = "") -> None:
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
  bad = np.argwhere(bits(got) != bits(want))
  assert bad.size == 0, (
      f"{what}: {len(bad)} elements differ, first at {tuple(bad[0])}: "
      f"got {got[tuple(bad[0])]!r}, want {want[tuple(bad[0])]!r}"
  )


def assert_equal_int(got, want, what: str = "") -> None:
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
  assert np.issubdtype(got.dtype, np.integer), f"{what}: dtype {got.dtype}"
  bad = np.argwhere(got != want)
  assert bad.size == 0, (
      f"{what}: {len(bad)} elements differ, first at {tuple(bad[0])}: "
      f"got {got[tuple(bad[0])]}, want {want[tuple(bad[0])]}"
  )


def tol(dtype) -> dict:
  """allclose tolerances for a float64 oracle vs a result of ``dtype``."""
  if np.dtype(dtype) == np.float32:
    return dict(rtol=2e-6, atol=2e-6)
  return dict(rtol=2e-2, atol=2e-2)  # bf16 / f16 output rounding.


def assert_close(got, want, dtype=None, what: str = "") -> None:
  got = np.asarray(got)
  assert got.shape == np.shape(want), f"{what}: shape {got.shape} != {np.shape(want)}"
  np.testing.assert_allclose(got.astype(np.float64), want, err_msg=what,
                             **tol(dtype or got.dtype))


def rand(rng, shape, dtype):
  """Nonzero random data of ``dtype`` (numpy; bf16 via ml_dtypes)."""
  a = rng.normal(size=shape)
  a = np.where(np.abs(a) < 0.05, 0.5, a)  # Never exactly zero.
  return a.astype(dtype)


def rng_for(*salt) -> np.random.Generator:
  """A generator seeded by ``salt`` (stable across runs and processes)."""
  return np.random.default_rng(zlib.crc32(repr(salt).encode()))


def native_group(n: int, gpus: int) -> int:
  """Skip unless ``gpus >= n``; else set up the native buffers of an ``n``-GPU group; returns ``n``."""
  if gpus < n:
    pytest.skip(f"needs {n} GPUs, found {gpus}")
  from jax_moe_dispatch.backends import buffer, native

  assert native.native_available(), native.native_unavailable_reason()
  buffer.get_buffer(mesh(n), 4096, axis_name="ep")
  return n


def both_impls(fn, ep: int, *args, impls=("native", "reference")) -> dict:
  """``{impl: numpy outputs}`` of ``fn(impl, *per_rank_args)`` run per rank for each of ``impls``."""
  return {impl: to_np(ep_map(lambda *a, impl=impl: fn(impl, *a), ep)(*args)) for impl in impls}


def assert_same(tree_a, tree_b, what: str) -> None:
  """Every leaf of ``tree_a`` bit for bit equal to ``tree_b``'s (native vs reference)."""
  leaves_a, leaves_b = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
  assert len(leaves_a) == len(leaves_b)
  for i, (a, b) in enumerate(zip(leaves_a, leaves_b)):
    assert_bitwise(a, b, f"{what}[{i}] native vs reference")
