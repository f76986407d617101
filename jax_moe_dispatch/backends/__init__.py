"""Dispatch backends, the choice between them, and the native kernels' SM budget.

``reference`` (pure JAX, everywhere) and ``native`` (our CUDA kernels through
XLA FFI) implement :class:`~jax_moe_dispatch.backends.base.Backend`. Which one
runs depends only on what cannot change while a process runs: the requested
implementation, JAX's default platform and whether the CUDA extension is
built. The native backend's buffers (:mod:`jax_moe_dispatch.backends.buffer`) are
process state that it looks up; they never decide which backend runs.

This package imports nothing above it: the ops reach it through
:mod:`jax_moe_dispatch.core.transport`, and :mod:`jax_moe_dispatch.backends.buffer` imports
:mod:`~jax_moe_dispatch.backends.native`, never the other way round.
How to add a backend: ``docs/architecture.md``.
"""

from __future__ import annotations

import functools
import logging
import typing
from typing import Callable, Literal, Optional

import jax

from jax_moe_dispatch.backends import native
from jax_moe_dispatch.backends.base import Backend, DispatchHandle
from jax_moe_dispatch.backends.reference import ReferenceBackend

__all__ = [
    "IMPLEMENTATIONS",
    "Backend",
    "DispatchHandle",
    "Implementation",
    "ReferenceBackend",
    "check_implementation",
    "default_num_sms",
    "get_backend",
    "set_deepep_num_sms",
    "set_hybridep_num_sms",
]

logger = logging.getLogger("jax_moe_dispatch")

Implementation = Literal["auto", "native", "reference"]
IMPLEMENTATIONS: tuple[str, ...] = typing.get_args(Implementation)

# SMs (one thread block each) the native kernels use when an op is given none;
# the seed's defaults, changed by set_deepep_num_sms / set_hybridep_num_sms.
_NUM_SMS = {"deepep": 20, "hybridep": 24}
_NUM_SMS_READ: set[str] = set()


def _set_num_sms(protocol: str, num_sms: int) -> None:
  num_sms = check_num_sms(num_sms)
  if protocol in _NUM_SMS_READ and num_sms != _NUM_SMS[protocol]:
    logger.warning(
        "jax_moe_dispatch: the %s SM default changes from %d to %d after it was read: configs "
        "made and functions traced before keep %d. Fix: set it before building configs and "
        "tracing, or pass num_sms= (TokenDispatcherConfig.moe_%s_num_sms) explicitly.",
        protocol, _NUM_SMS[protocol], num_sms, _NUM_SMS[protocol], protocol)
  _NUM_SMS[protocol] = num_sms


def set_deepep_num_sms(num_sms: int) -> None:
  """Set the default SM budget of the DeepEP-protocol ops (``fused_dispatch``/``fused_combine``).

  The default is picked up when a :class:`~jax_moe_dispatch.TokenDispatcherConfig`
  is built and when an op is called without ``num_sms``; the value then is part
  of the trace. Configs built and functions traced earlier keep their value (a
  later change logs a warning), so set it once, before either.
  """
  _set_num_sms("deepep", num_sms)


def set_hybridep_num_sms(num_sms: int) -> None:
  """Set the default SM budget of the HybridEP-protocol ops, as :func:`set_deepep_num_sms`."""
  _set_num_sms("hybridep", num_sms)


def default_num_sms(protocol: str) -> int:
  """The current default SM budget of ``protocol`` (``"deepep"`` or ``"hybridep"``)."""
  _NUM_SMS_READ.add(protocol)
  return _NUM_SMS[protocol]


def check_num_sms(num_sms: object) -> int:
  """``num_sms`` as an int, or ``ValueError`` unless it is a positive int."""
  if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms <= 0:
    raise ValueError(f"num_sms must be a positive int, got {num_sms!r}.")
  return num_sms


def check_implementation(implementation: Optional[str]) -> str:
  """``implementation`` with ``None`` read as ``"auto"``; ``ValueError`` if unknown."""
  implementation = implementation or "auto"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}.")
  return implementation


@functools.cache
def _log_once(level: int, message: str) -> None:
  logger.log(level, message)


def _choose(implementation: str) -> str:
  """``"native"`` or ``"reference"`` for a checked implementation; logged once per process."""
  if implementation == "reference":
    _log_once(logging.INFO, "jax_moe_dispatch: using the reference backend.")
    return "reference"
  if implementation == "native":
    if not native.native_available():
      raise RuntimeError(
          "implementation='native' but the native backend is unavailable: "
          f"{native.native_unavailable_reason()}. Fix: reinstall with a CUDA "
          "compiler on PATH (pip install . builds ffi/ when nvcc is found) and "
          "run on NVIDIA GPUs, or use implementation='reference'.")
    _log_once(logging.INFO, "jax_moe_dispatch: using the native backend.")
    return "native"
  if jax.default_backend() != "gpu":
    _log_once(logging.INFO, "jax_moe_dispatch: using the reference backend.")
    return "reference"
  if not native.native_available():
    _log_once(
        logging.WARNING,
        "jax_moe_dispatch: running on GPU with the slow reference backend because the "
        f"native one is unavailable: {native.native_unavailable_reason()}.")
    return "reference"
  _log_once(logging.INFO, "jax_moe_dispatch: using the native backend.")
  return "native"


def get_backend(implementation: Optional[str] = "auto", *,
                num_sms: Optional[int] = None,
                reserve_staging: Optional[Callable[[int, str], None]] = None) -> Backend:
  """Return the backend that runs ``implementation``.

  Args:
    implementation: ``"reference"``, ``"native"`` or ``"auto"`` (``None``
      means ``"auto"``): the native backend when JAX's default platform is GPU
      and the CUDA extension is built, the reference backend otherwise (with a
      warning on GPUs, where it is slow). The choice is logged once per process
      on the ``jax_moe_dispatch`` logger.
    num_sms: SMs the native kernels use; ``None``:
      :func:`default_num_sms` of ``"deepep"``.
    reserve_staging: the native backend's staging hook (see
      :class:`~jax_moe_dispatch.backends.native.NativeBackend`).

  Raises:
    ValueError: unknown implementation.
    RuntimeError: ``"native"`` asked for but unavailable; the message says why.
  """
  if _choose(check_implementation(implementation)) == "reference":
    return ReferenceBackend()
  return native.NativeBackend(
      check_num_sms(default_num_sms("deepep") if num_sms is None else num_sms), reserve_staging)
