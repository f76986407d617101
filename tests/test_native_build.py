"""The CUDA extension on machines without GPUs: built when nvcc is there, importable, sane.

CI sets ``JMD_REQUIRE_CUDA=1`` when nvcc is on PATH, so a build that silently
skipped the extension fails here instead of passing with the reference backend.
"""

import os

import pytest

from jax_moe_dispatch.backends import buffer, native

REQUIRED = os.environ.get("JMD_REQUIRE_CUDA") == "1"


def test_extension_built_when_required():
  if not REQUIRED and not native.extension_built():
    pytest.skip("JMD_REQUIRE_CUDA is not set and the extension is not built")
  assert native.extension_built(), native.native_unavailable_reason()
  ext = native.extension()
  assert set(ext.handlers()) == {"jmd_dispatch", "jmd_dispatch_cached", "jmd_combine",
                                 "jmd_hybrid_dispatch", "jmd_hybrid_dispatch_cached",
                                 "jmd_hybrid_combine", "jmd_permute", "jmd_unpermute"}
  for name in ("create_group", "create_exported", "open_peers", "set_timeout", "free_all", "reset"):
    assert callable(getattr(ext, name)), name
  assert 0 < ext.region_bytes() < 1 << 20
  assert ext.MAX_RANKS == 8


def test_failure_descriptions():
  if not native.extension_built():
    pytest.skip("extension not built")
  ext = native.extension()
  gpus = ["GPU 2", "GPU 3"]
  msg = ext._describe_diag(1, 0, 1, 3, 7, 6, gpus, 0, 2.5)
  assert msg.startswith("GPU 2 timed out after 2500 ms waiting for GPU 3 (group position 1)")
  assert "notify step of call #7" in msg and "last saw call #6" in msg
  assert "completion step" in ext._describe_diag(1, 1, 0, 2, 7, 6, gpus, 1, 1.0)
  assert "group position 9" in ext._describe_diag(1, 1, 9, 2, 7, 6, gpus, 0, 1.0)
  procs = ["process 0 (GPU 0)", "process 1 (GPU 0)"]
  msg = ext._describe_diag(1, 0, 0, 0, 3, 2, procs, 1, 5.0)
  assert msg.startswith("process 1 (GPU 0) timed out after 5000 ms waiting for process 0 (GPU 0) "
                        "(group position 0)"), msg
  assert "inconsistent axis indices" in ext._describe_diag(2, 0, 0, 2, 7, 0, gpus, 1, 1.0)
  assert ext._describe_diag(0, 0, 0, 0, 0, 0, ["GPU 0"], 0, 1.0) == ""


def test_mismatch_descriptions_name_both_signatures():
  """kDiagMismatch (3): another op or shape in the same call, or a peer in another call."""
  if not native.extension_built():
    pytest.skip("extension not built")
  ext = native.extension()
  gpus = ["GPU 0", "GPU 1"]
  # [kind, T, M, streams, payloads, dtype, row bytes...]: kind 1 dispatch, 3 combine.
  dispatch = [1, 16, 32, 3, 3, 0, 144, 8, 4]
  combine = [3, 16, 32, 1, 1, 1, 144]
  msg = ext._describe_diag(3, 0, 1, 0, 5, 5, gpus, 0, 1.0, dispatch, combine)
  assert msg.startswith("GPU 0 ran dispatch(T=16, M=32, 3 payloads of 3 arrays, row bytes "
                        "[144, 8, 4]) as call #5 but GPU 1 (group position 1) ran combine(T=16, "
                        "M=32, row bytes 144, bfloat16)"), msg
  assert "same op with the same shapes" in msg and "Fix:" in msg
  other_t = ext._describe_diag(3, 0, 0, 1, 2, 2, gpus, 1, 1.0, dispatch, [1, 8] + dispatch[2:])
  assert "GPU 1 ran dispatch(T=16" in other_t and "GPU 0 (group position 0) ran dispatch(T=8" in other_t
  ahead = ext._describe_diag(3, 0, 1, 0, 5, 6, gpus, 0, 1.0, dispatch, combine)
  assert "was in call #5" in ahead and "had already published call #6" in ahead, ahead
  done = ext._describe_diag(3, 1, 1, 0, 5, 6, gpus, 0, 1.0)
  assert "finish call #6 while it was in call #5" in done, done


def test_native_unavailable_without_gpu_says_why():
  import jax

  if jax.default_backend() == "gpu":
    pytest.skip("GPUs present")
  assert not native.native_available()
  assert native.native_unavailable_reason()
  b = buffer.get_buffer(jax.devices()[:2], 1024)  # Nothing native to set up on CPU.
  assert not b.native and not buffer.has_buffer()
  assert buffer.get_hidden_bytes(jax.numpy.zeros((3, 7168), jax.numpy.bfloat16)) == 14336
  with pytest.raises(NotImplementedError, match="UCCL-EP"):
    buffer.get_uccl_ep_buffer()
  with pytest.raises(ValueError, match="hidden_bytes"):
    buffer.get_buffer(jax.devices()[:2], 0)
