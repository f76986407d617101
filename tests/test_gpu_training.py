"""On >= 2 GPUs: the example's training step with the native backend equals the reference's.

Where the library claims bit-identical results (the dispatcher's stages: dispatch,
permutation, combine) native and reference are compared bit for bit; the whole
training step to float32 rounding, since XLA may fuse the code around the ops
differently in the two programs.
"""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import gpu_count
from jax.sharding import Mesh, PartitionSpec as P

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
def test_dispatcher_stages_bitwise(example, backend):
  """token_permutation2 -> rows x powers of two -> token_unpermutation, native vs reference.

  Every output (permuted rows, tokens per expert, permuted probabilities,
  combined tokens) must be bit-identical: the ops are, and the powers of two
  keep the code between them exact.
  """
  import jax_moe_dispatch as jmd
  from jax_moe_dispatch.backends import buffer

  ep, T, E, K, H = 2, 24, 8, 2, 64
  mesh = Mesh(np.array(jax.devices("gpu")[:ep]), ("ep",))
  buffer.get_buffer(mesh, 4 * H, axis_name="ep")
  rng = np.random.default_rng(17)
  x = rng.normal(size=(ep * T, H))
  x = np.where(np.abs(x) < 0.05, 0.5, x).astype(jax.numpy.bfloat16)
  idx = np.argsort(rng.random((ep * T, E)), axis=1)[:, :K].astype(np.int32)
  probs = (rng.random((ep * T, K)) * 0.9 + 0.1).astype(np.float32)

  def run(implementation):
    config = jmd.TokenDispatcherConfig(num_moe_experts=E, moe_router_topk=K,
                                       moe_flex_dispatcher_backend=backend,
                                       implementation=implementation)

    def body(x, idx, probs):
      d = jmd.MoEFlexTokenDispatcher(config)
      px, tpe, pp, state = d.token_permutation2(x, token_probs=probs, token_indices=idx)
      scale = (2.0 ** (jax.numpy.arange(px.shape[0]) % 3)).astype(px.dtype)[:, None]
      return px, tpe[None], pp, d.token_unpermutation(px * scale, state)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    return [np.asarray(a) for a in f(x, idx, probs)]

  native, reference = run("native"), run("reference")
  for name, a, b in zip(("permuted_x", "tokens_per_expert", "permuted_probs", "combined"),
                        native, reference):
    assert a.dtype == b.dtype and a.shape == b.shape, name
    bad = np.flatnonzero(a.view(f"u{a.dtype.itemsize}") != b.view(f"u{b.dtype.itemsize}"))
    assert bad.size == 0, f"{backend} {name}: {bad.size} elements differ, first at {bad[0]}"
  assert np.abs(native[3].astype(np.float32)).sum() > 0


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
