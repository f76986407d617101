"""Lifecycle of the native backend's NVLink buffers (the seed's names, adapted to JAX).

The native backend gives every GPU of an expert-parallel group one small signal
region (``region_bytes()``, a few KiB) in device memory that the other GPUs of
the group can write through CUDA peer access. Rows never pass through it: a
dispatch loads each received row straight from the sender's XLA input buffer
into the receiver's output, and a combine loads rows straight from the
experts' XLA buffers, so there is no staging buffer sized by ``hidden_bytes``
(the argument is kept for parity with the seed and checked). The region only
carries per-call counts, buffer addresses and completion flags.

Call :func:`get_buffer` once, before tracing, with the mesh (or device list)
and axis that the ops will run over; on CPUs and without the CUDA extension it
does nothing (the reference backend needs no buffer). One process drives all
GPUs of a group; groups spanning processes (``jax.distributed``) are not
supported by the native backend yet.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Optional, Sequence, Union

import jax
import numpy as np

from jax_moe_dispatch.backends import native, set_deepep_num_sms, set_hybridep_num_sms

__all__ = [
    "Buffer",
    "free_buffer",
    "get_buffer",
    "get_hidden_bytes",
    "get_uccl_ep_buffer",
    "has_buffer",
    "init_hybrid_ep_buffer",
    "last_error",
    "reset_hybrid_ep_buffer",
    "set_deepep_num_sms",
    "set_hybridep_num_sms",
]

logger = logging.getLogger("jax_moe_dispatch")

_DEFAULT_TIMEOUT_S = 10.0
_buffer: Optional["Buffer"] = None

MeshLike = Union[jax.sharding.Mesh, Sequence[jax.Device]]


@dataclasses.dataclass(frozen=True)
class Buffer:
  """What :func:`get_buffer` set up.

  Attributes:
    groups: CUDA device ordinals of each expert-parallel group, in axis order
      (empty when nothing native was set up, e.g. on CPU).
    axis_name: the mesh axis the groups run along.
    hidden_bytes: bytes per token row the caller declared.
    max_num_tokens: tokens per rank the caller declared, if any.
    region_bytes: device bytes of the signal region on each GPU.
    timeout_s: how long a GPU waits for a peer before failing the call.
  """

  groups: tuple[tuple[int, ...], ...]
  axis_name: str
  hidden_bytes: int
  max_num_tokens: Optional[int]
  region_bytes: int
  timeout_s: float

  @property
  def native(self) -> bool:
    return bool(self.groups)


def _ext():
  return native.extension()


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  return int(value)


def _groups(mesh: MeshLike, axis_name: str) -> list[list[jax.Device]]:
  if isinstance(mesh, jax.sharding.Mesh):
    if axis_name not in mesh.axis_names:
      raise ValueError(
          f"axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}. Fix: pass "
          "the name of the expert-parallel axis.")
    devices = np.moveaxis(mesh.devices, mesh.axis_names.index(axis_name), -1)
    return [list(row) for row in devices.reshape(-1, devices.shape[-1])]
  devices = list(mesh)
  if not devices or not all(isinstance(d, jax.Device) for d in devices):
    raise TypeError("mesh must be a jax.sharding.Mesh or a non-empty sequence of jax.Device.")
  return [devices]


def get_buffer(
    mesh: MeshLike,
    hidden_bytes: int,
    *,
    axis_name: str = "ep",
    max_num_tokens: Optional[int] = None,
    timeout_s: Optional[float] = None,
) -> Buffer:
  """Set up the native buffers of every expert-parallel group of ``mesh``.

  Idempotent: the same groups again keep their state. Call it before tracing
  (``implementation="auto"`` picks the native backend only once buffers exist).

  Args:
    mesh: a :class:`jax.sharding.Mesh` with axis ``axis_name`` (every slice
      along the other axes forms one group), or the devices of one group in axis
      order (as given to :func:`jax.pmap`).
    hidden_bytes: bytes of one token row (:func:`get_hidden_bytes`).
    axis_name: the expert-parallel axis of ``mesh``.
    max_num_tokens: tokens per rank, for the record (buffers do not scale with it).
    timeout_s: how long a GPU waits for a peer before the call fails with an
      error instead of hanging; default ``$JMD_TIMEOUT_S`` or 10 s.

  Raises:
    NotImplementedError: the group spans processes.
    RuntimeError: the GPUs cannot reach each other with peer access, or a CUDA
      call failed; the message says which.
  """
  global _buffer
  hidden_bytes = _positive_int("hidden_bytes", hidden_bytes)
  if max_num_tokens is not None:
    max_num_tokens = _positive_int("max_num_tokens", max_num_tokens)
  if timeout_s is None:
    timeout_s = float(os.environ.get("JMD_TIMEOUT_S", _DEFAULT_TIMEOUT_S))
  if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
    raise ValueError(f"timeout_s must be a finite positive number, got {timeout_s!r}.")
  groups = _groups(mesh, axis_name)
  if any(d.platform != "gpu" for g in groups for d in g) or not native.native_available():
    reason = ("the devices are not GPUs" if any(d.platform != "gpu" for g in groups for d in g)
              else native.native_unavailable_reason())
    logger.info("jax_moe_dispatch.get_buffer: no native buffers (%s); the reference backend "
                "needs none.", reason)
    _buffer = Buffer((), axis_name, hidden_bytes, max_num_tokens, 0, float(timeout_s))
    return _buffer
  ext = _ext()
  me = jax.process_index()
  ordinals = []
  for group in groups:
    if any(d.process_index != me for d in group):
      raise NotImplementedError(
          "the native backend drives all GPUs of an expert-parallel group from one process; "
          f"this group spans processes {sorted({d.process_index for d in group})}. Fix: run one "
          "process per node, or implementation='reference'.")
    if len(group) > ext.MAX_RANKS:
      raise ValueError(
          f"the native backend supports up to {ext.MAX_RANKS} GPUs per expert-parallel group "
          f"(one NVLink node), got {len(group)}. Fix: a smaller '{axis_name}' axis, or "
          "implementation='reference'.")
    ordinals.append(tuple(int(d.local_hardware_id) for d in group))
  for group in ordinals:
    ext.create_group(list(group), float(timeout_s))
  _buffer = Buffer(tuple(ordinals), axis_name, hidden_bytes, max_num_tokens,
                   int(ext.region_bytes()), float(timeout_s))
  logger.info("jax_moe_dispatch: native buffers on GPU groups %s (%d bytes each).",
              _buffer.groups, _buffer.region_bytes)
  return _buffer


def init_hybrid_ep_buffer(
    mesh: MeshLike,
    hidden_dim: int,
    max_num_tokens: int,
    num_local_experts: Optional[int] = None,
    num_sms_dispatch_api: Optional[int] = None,
    num_sms_combine_api: Optional[int] = None,
    fp8_dispatch: bool = False,
    *,
    axis_name: str = "ep",
) -> Buffer:
  """The seed's HybridEP initialiser: :func:`get_buffer` plus the HybridEP SM budget.

  ``num_local_experts`` is accepted for parity (buffers do not depend on it);
  dispatch and combine share one SM budget, the larger of the two given.
  """
  del num_local_experts
  sms = [n for n in (num_sms_dispatch_api, num_sms_combine_api) if n is not None]
  if sms:
    set_hybridep_num_sms(max(sms))
  hidden_bytes = _positive_int("hidden_dim", hidden_dim) * (1 if fp8_dispatch else 2)
  return get_buffer(mesh, hidden_bytes, axis_name=axis_name, max_num_tokens=max_num_tokens)


def reset_hybrid_ep_buffer() -> None:
  """Zero every signal region and call counter (waits for the GPUs to be idle).

  Use it after a failed call left ranks out of step; a fresh process needs nothing.
  """
  if has_buffer():
    _ext().reset()


def free_buffer() -> None:
  """Release every group's device memory; the native backend needs :func:`get_buffer` again."""
  global _buffer
  if has_buffer():
    _ext().free_all()
  _buffer = None


def has_buffer() -> bool:
  """Whether native buffers are set up in this process."""
  return _buffer is not None and _buffer.native


def last_error(device: Optional[jax.Device] = None) -> str:
  """What the last failed native call recorded on ``device`` (default: every GPU), or ``''``.

  A GPU that waits longer than ``timeout_s`` for a peer stops its kernel (XLA then
  reports a CUDA launch failure); this says which peer and which call.
  """
  if not has_buffer():
    return ""
  ext = _ext()
  ordinals = ([int(device.local_hardware_id)] if device is not None
              else sorted({o for g in _buffer.groups for o in g}))
  return "\n".join(msg for msg in (ext.last_error(o) for o in ordinals) if msg)


def get_hidden_bytes(x) -> int:
  """Bytes of one token row as the buffers count them: ``H * max(itemsize, 2)``."""
  return int(x.shape[-1]) * max(np.dtype(x.dtype).itemsize, 2)


def get_uccl_ep_buffer(*args, **kwargs):
  """UCCL-EP is not available in this build."""
  raise NotImplementedError(
      "UCCL-EP is not available in this build of jax_moe_dispatch. Fix: "
      "moe_flex_dispatcher_backend='deepep' or 'hybridep'.")
