"""Dispatch backends and the choice between them.

``reference`` (pure JAX, everywhere) and ``native`` (our CUDA kernels through
XLA FFI) implement :class:`~jax_moe_dispatch.backends.base.Backend`. Adding a
backend means one module with that class and one entry in :func:`get_backend`.
"""

from __future__ import annotations

import functools
import logging

import jax

from jax_moe_dispatch.backends.base import Backend, DispatchHandle
from jax_moe_dispatch.backends.reference import ReferenceBackend

__all__ = ["Backend", "DispatchHandle", "ReferenceBackend", "get_backend"]

logger = logging.getLogger("jax_moe_dispatch")

_IMPLEMENTATIONS = ("auto", "native", "reference")


@functools.cache
def _log_once(level: int, message: str) -> None:
  logger.log(level, message)


def _native_module():
  from jax_moe_dispatch.backends import native  # Imports the extension lazily.

  return native


def get_backend(implementation: str | None = "auto", protocol: str = "deepep") -> Backend:
  """Return the backend for ``implementation`` (called at trace time).

  Args:
    implementation: ``"reference"``, ``"native"`` or ``"auto"`` (``None`` means
      ``"auto"``). ``"auto"`` picks the native backend when JAX runs on GPUs,
      the extension is built and :func:`jax_moe_dispatch.get_buffer` has set up
      buffers; otherwise the reference backend, with a warning on GPUs since
      that path is slow there.
    protocol: ``"deepep"`` or ``"hybridep"``: whose SM budget the native
      kernels use (:func:`jax_moe_dispatch.buffer.set_deepep_num_sms`).

  Raises:
    ValueError: unknown implementation.
    RuntimeError: ``"native"`` asked for but unavailable; the message says why.
  """
  implementation = implementation or "auto"
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(
        f"implementation={implementation!r} is not one of {_IMPLEMENTATIONS}."
    )
  if implementation == "reference":
    return ReferenceBackend()
  if implementation == "native":
    native = _native_module()
    if not native.native_available():
      raise RuntimeError(
          "implementation='native' but the native backend is unavailable: "
          f"{native.native_unavailable_reason()}. Fix: reinstall with a CUDA "
          "compiler on PATH (pip install . builds ffi/ when nvcc is found) and "
          "run on NVIDIA GPUs, or use implementation='reference'."
      )
    _log_once(logging.INFO, "jax_moe_dispatch: using the native backend.")
    return _native_backend(native, protocol)
  if jax.default_backend() != "gpu":
    _log_once(logging.INFO, "jax_moe_dispatch: using the reference backend.")
    return ReferenceBackend()
  native = _native_module()
  if not native.native_available():
    _log_once(
        logging.WARNING,
        "jax_moe_dispatch: running on GPU with the slow reference backend "
        f"because the native one is unavailable: {native.native_unavailable_reason()}.",
    )
    return ReferenceBackend()
  from jax_moe_dispatch import buffer

  if not buffer.has_buffer():
    _log_once(
        logging.WARNING,
        "jax_moe_dispatch: native backend built but no buffer is set up, so the "
        "slow reference backend (dense all_to_all) runs. Fix: call "
        "jax_moe_dispatch.get_buffer(mesh, hidden_bytes) before tracing.",
    )
    return ReferenceBackend()
  _log_once(logging.INFO, "jax_moe_dispatch: using the native backend.")
  return _native_backend(native, protocol)


def _native_backend(native, protocol: str) -> Backend:
  from jax_moe_dispatch import buffer

  return native.NativeBackend(buffer.num_sms(protocol))
