"""Lifecycle of the native backend's buffers (the seed's names, adapted to JAX).

The native backend gives every rank of an expert-parallel group one small
signal region (``region_bytes()``, a few KiB) in device memory that the other
ranks of the group can write. It only carries per-call counts, buffer
addresses and completion flags; rows are pulled by the receiving side. How a
group is run depends on who drives its GPUs:

* One process drives every GPU of the group (the usual single-process JAX
  program): regions are reached through CUDA peer access, and a dispatch loads
  each received row straight from the sender's XLA input buffer into the
  receiver's output (a combine likewise from the experts' buffers). There is
  no staging buffer; ``hidden_bytes`` is checked and kept for parity with the
  seed.
* One process per rank (:func:`jax.distributed.initialize`, one process per
  GPU, or several processes sharing one GPU as several ranks): XLA's buffers
  cannot be exported through CUDA IPC, so each rank also gets a staging buffer
  sized from ``hidden_bytes`` and ``max_num_tokens`` (:func:`init_hybrid_ep_buffer`:
  from the HybridEP sizes); a call copies its inputs there first, and the peers
  map it with CUDA IPC. An op traced with sizes that need more staging grows it
  first (:func:`reserve_staging`). The handles are exchanged
  through ``jax.distributed``'s key-value store (:mod:`jax_moe_dispatch.backends.distributed`).
  Such a group must lie within one node.

Call :func:`get_buffer` once, before tracing, with the mesh (or device list)
and axis that the ops will run over (every process of a group must call it
with the same arguments); on CPUs and without the CUDA extension it does
nothing (the reference backend needs no buffer).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
from typing import Callable, Optional, Sequence, Union

import jax
import numpy as np

from jax_moe_dispatch.backends import (distributed, native, set_deepep_num_sms,
                                       set_hybridep_num_sms, staging)

__all__ = [
    "Buffer",
    "free_buffer",
    "get_buffer",
    "get_hidden_bytes",
    "get_uccl_ep_buffer",
    "has_buffer",
    "init_hybrid_ep_buffer",
    "last_error",
    "reserve_staging",
    "reset_hybrid_ep_buffer",
    "set_deepep_num_sms",
    "set_hybridep_num_sms",
]

logger = logging.getLogger("jax_moe_dispatch")

_DEFAULT_TIMEOUT_S = 10.0
# Groups spanning processes: the first call of a program waits until every
# process has compiled it, so the default also covers compile-time skew.
_DEFAULT_PROCESSES_TIMEOUT_S = 120.0
# Staged bytes per row besides hidden_bytes: routing metadata (top-k ids and
# weights per destination, FP8 scales) and the send lists.
_STAGING_METADATA_BYTES = 256
_buffer: Optional["Buffer"] = None
# This process's ranks of groups spanning processes: (key-value store key of the
# group, this rank's position, every rank's name), for the collective steps.
_spanning: list[tuple[str, int, list[str]]] = []
# Key-value store exchanges this process started; every process counts the same
# (SPMD), so the count keeps the keys of successive set-ups apart.
_exchanges = 0

MeshLike = Union[jax.sharding.Mesh, Sequence[jax.Device]]


@dataclasses.dataclass(frozen=True)
class Buffer:
  """What :func:`get_buffer` set up in this process.

  Attributes:
    groups: the expert-parallel groups this process takes part in, each as its
      devices' ``jax.Device.id`` in axis order (empty when nothing native was
      set up, e.g. on CPU).
    spans_processes: for each group, whether it has one rank per process
      (``jax.distributed``) rather than one process driving all its GPUs.
    local_devices: CUDA ordinals of this process's GPUs in those groups.
    axis_name: the mesh axis the groups run along.
    hidden_bytes: bytes per token row the caller declared.
    max_num_tokens: tokens per rank the caller declared, if any.
    region_bytes: device bytes of the signal region of each rank.
    staging_bytes: device bytes of each rank's staging buffer in groups that
      span processes (0 when there are none).
    timeout_s: how long a rank waits for a peer before failing the call.
  """

  groups: tuple[tuple[int, ...], ...]
  spans_processes: tuple[bool, ...]
  local_devices: tuple[int, ...]
  axis_name: str
  hidden_bytes: int
  max_num_tokens: Optional[int]
  region_bytes: int
  staging_bytes: int
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
  """Set up the native buffers of this process's expert-parallel groups of ``mesh``.

  Idempotent: the same groups again keep their state (only the timeout
  changes) unless they need more staging than they have; staging never shrinks
  while set up (:func:`free_buffer` releases it). Call it before tracing
  (``implementation="auto"`` picks the native backend only once buffers
  exist). When a group spans processes, every
  process of it must call this with the same arguments: the ranks exchange
  their buffers' CUDA IPC handles through ``jax.distributed``.

  Args:
    mesh: a :class:`jax.sharding.Mesh` with axis ``axis_name`` (every slice
      along the other axes forms one group; with ``jax.distributed``, the
      global mesh), or the devices of one group in axis order (as given to
      :func:`jax.pmap`).
    hidden_bytes: bytes of one token row (:func:`get_hidden_bytes`). Groups
      spanning processes stage rows, so this must cover the widest rows an op
      moves (e.g. ``4 * H`` when float32 gradients are combined).
    axis_name: the expert-parallel axis of ``mesh``.
    max_num_tokens: tokens per rank. Required when a group spans processes:
      each rank's staging buffer holds ``ep * max_num_tokens`` rows of
      ``hidden_bytes`` plus 256 bytes of routing metadata per row; an op
      traced with sizes that need more grows it (:func:`reserve_staging`).
      Otherwise only recorded.
    timeout_s: how long a rank waits for a peer before the call fails with an
      error instead of hanging (also bounds the set-up exchange between
      processes); default ``$JMD_TIMEOUT_S``, else 10 s, or 120 s when a group
      spans processes (its first call also waits for the slowest process to
      compile the program).

  Raises:
    ValueError: bad arguments, a group larger than the native backend
      supports, a group spanning processes with several of its GPUs in one
      process, or no ``max_num_tokens`` for a group spanning processes.
    RuntimeError: the GPUs cannot reach each other, a group spans nodes, or a
      CUDA call failed; the message says which. Nothing is left set up.
    TimeoutError: a process of a group did not reach ``get_buffer``; named.
  """
  hidden_bytes = _positive_int("hidden_bytes", hidden_bytes)
  return _get_buffer(
      mesh, axis_name, hidden_bytes, max_num_tokens, timeout_s, "get_buffer(mesh, hidden_bytes, "
      "max_num_tokens=...)",
      lambda ranks: ranks * max_num_tokens * (hidden_bytes + _STAGING_METADATA_BYTES))


def _get_buffer(mesh: MeshLike, axis_name: str, hidden_bytes: int, max_num_tokens: Optional[int],
                timeout_s: Optional[float], fix: str,
                staging_for: Callable[[int], int]) -> Buffer:
  """:func:`get_buffer` with staging of ``staging_for(ranks)`` bytes (``fix``: the call to name)."""
  global _buffer
  if max_num_tokens is not None:
    max_num_tokens = _positive_int("max_num_tokens", max_num_tokens)
  groups = _groups(mesh, axis_name)
  me = jax.process_index()
  mine = [g for g in groups if any(d.process_index == me for d in g)]
  spans = tuple(len({d.process_index for d in g}) > 1 for g in mine)
  if timeout_s is None:
    timeout_s = float(os.environ.get(
        "JMD_TIMEOUT_S", _DEFAULT_PROCESSES_TIMEOUT_S if any(spans) else _DEFAULT_TIMEOUT_S))
  if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
    raise ValueError(f"timeout_s must be a finite positive number, got {timeout_s!r}.")
  timeout_s = float(timeout_s)
  if any(d.platform != "gpu" for g in groups for d in g) or not native.native_available():
    reason = ("the devices are not GPUs" if any(d.platform != "gpu" for g in groups for d in g)
              else native.native_unavailable_reason())
    logger.info("jax_moe_dispatch.get_buffer: no native buffers (%s); the reference backend "
                "needs none.", reason)
    _buffer = Buffer((), (), (), axis_name, hidden_bytes, max_num_tokens, 0, 0, timeout_s)
    return _buffer
  ext = _ext()
  for group, span in zip(mine, spans):
    if len(group) > ext.MAX_RANKS:
      raise ValueError(
          f"the native backend supports up to {ext.MAX_RANKS} ranks per expert-parallel group "
          f"(one node), got {len(group)}. Fix: a smaller '{axis_name}' axis, or "
          "implementation='reference'.")
    processes = [d.process_index for d in group]
    if span and len(set(processes)) != len(group):
      raise ValueError(
          "the native backend runs an expert-parallel group either from one process or with one "
          f"rank per process; the group of '{axis_name}' on processes {processes} has several "
          "GPUs in one process. Fix: one process per GPU (or one per node), or "
          "implementation='reference'.")
  staging_bytes = 0
  if any(spans):
    if max_num_tokens is None:
      raise ValueError(
          f"the '{axis_name}' axis spans processes, so get_buffer needs max_num_tokens (tokens per "
          f"rank): it sizes each rank's staging buffer. Fix: {fix}.")
    staging_bytes = staging_for(max(len(g) for g, span in zip(mine, spans) if span))
  return _set_up(mine, spans, axis_name, hidden_bytes, max_num_tokens, timeout_s, staging_bytes)


def _set_up(mine: Sequence[Sequence[jax.Device]], spans: tuple[bool, ...], axis_name: str,
            hidden_bytes: int, max_num_tokens: Optional[int], timeout_s: float,
            staging_bytes: int, *, check_reads: bool = True) -> Buffer:
  """Make ``mine`` (with ``spans``) this process's groups, with ``staging_bytes`` of staging.

  The current buffers are kept (only the timeout changes) if they are of the
  same groups with at least that much staging; otherwise they are released and
  set up again. ``check_reads``: check that one-process groups read each
  other's XLA buffers in place (not while tracing: it puts an array).
  """
  global _buffer, _exchanges
  ext = _ext()
  me = jax.process_index()
  local = tuple(int(d.local_hardware_id) for g in mine for d in g if d.process_index == me)
  new = Buffer(tuple(tuple(int(d.id) for d in g) for g in mine), spans, local, axis_name,
               hidden_bytes, max_num_tokens, int(ext.region_bytes()), staging_bytes, timeout_s)
  if (_buffer is not None and (_buffer.groups, _buffer.spans_processes) == (new.groups, spans)
      and _buffer.staging_bytes >= staging_bytes):
    new = dataclasses.replace(new, staging_bytes=_buffer.staging_bytes)
    for ordinal in local:
      ext.set_timeout(ordinal, timeout_s)
  else:
    if _buffer is not None:
      _release(ext, _buffer.timeout_s)
    _buffer = None
    try:
      for group, span in zip(mine, spans):
        if not span:
          ext.create_group([int(d.local_hardware_id) for d in group], timeout_s)
          if check_reads:
            _check_in_place_reads(ext, group)
      if any(spans):
        _exchanges += 1
        for group, span in zip(mine, spans):
          if span:  # Groups are disjoint: their first device names them.
            key = f"jax_moe_dispatch/{_exchanges}/group{group[0].id}"
            _join(ext, key, group, axis_name, timeout_s, staging_bytes)
    except BaseException:
      _release(ext, timeout_s)
      raise
  _buffer = new
  logger.info("jax_moe_dispatch: native buffers for groups %s (spanning processes: %s; %d region "
              "bytes, %d staging bytes per rank).", new.groups, new.spans_processes,
              new.region_bytes, new.staging_bytes)
  return _buffer


def reserve_staging(nbytes: int, what: str) -> None:
  """Grow the staging buffers to ``nbytes`` per rank if they are smaller; called while tracing.

  The native backend calls this while it traces an op whose group spans
  processes, with the staging that op's round trip needs
  (:mod:`jax_moe_dispatch.backends.staging`), so the buffer is large enough
  before the program can run; nothing grows inside a running program. Every
  process of a group traces the same program, so all of them grow together:
  their buffers are released and set up again through the same exchange as
  :func:`get_buffer` (which waits for this process's GPUs to be idle). Each
  growth logs one warning naming the old and new sizes. Without groups
  spanning processes (no staging) this does nothing.
  """
  if _buffer is None or not any(_buffer.spans_processes) or nbytes <= _buffer.staging_bytes:
    return
  old = _buffer
  logger.warning(
      "jax_moe_dispatch: a %s traced now needs %d staging bytes per rank: the staging buffer "
      "grows from %d to %d bytes (released and set up again in every process of the group, "
      "which waits for the GPUs). Calling init_hybrid_ep_buffer(...) (or get_buffer) with sizes "
      "this large before tracing avoids the reallocation.",
      what, nbytes, old.staging_bytes, nbytes)
  devices = {d.id: d for d in jax.devices()}
  _set_up([[devices[i] for i in g] for g in old.groups], old.spans_processes, old.axis_name,
          old.hidden_bytes, old.max_num_tokens, old.timeout_s, nbytes, check_reads=False)


def _check_in_place_reads(ext, group: Sequence[jax.Device]) -> None:
  """Refuse a one-process group whose GPUs cannot read each other's XLA buffers in place.

  Such a group publishes XLA's own input buffers to its peers (no staging), so
  every GPU of it must be able to load from memory XLA allocated on the others:
  device memory (not host memory), with peer access, and, for memory of a
  stream-ordered pool (XLA's ``cuda_async`` allocator), the pool's access grant
  to the peers.
  """
  if len(group) < 2:
    return
  for owner in group:
    probe = jax.device_put(np.ones((16,), np.float32), owner)
    pointer = probe.addressable_shards[0].data.unsafe_buffer_pointer()
    for reader in group:
      why = ext.check_peer_readable(int(reader.local_hardware_id), pointer,
                                    int(owner.local_hardware_id))
      if why:
        allocator = os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default")
        raise RuntimeError(
            f"jax_moe_dispatch: {reader} cannot read the buffers XLA allocates on {owner} in "
            f"place ({why}; XLA_PYTHON_CLIENT_ALLOCATOR={allocator}). The native backend's GPUs "
            "of one process read each other's inputs directly. Fix: unset "
            "XLA_PYTHON_CLIENT_ALLOCATOR (XLA's default BFC allocator) or set it to 'platform', "
            "or use implementation='reference'.")


def _join(ext, key: str, group: Sequence[jax.Device], axis_name: str, timeout_s: float,
          staging_bytes: int) -> None:
  """Set up this process's rank of a group spanning processes; all its processes call this.

  The rank is added to ``_spanning`` as soon as peers may map its memory, so that
  :func:`_release` frees it only once they have closed it, also after a failure.
  """
  position = next(i for i, d in enumerate(group) if d.process_index == jax.process_index())
  names = [f"process {d.process_index}" for d in group]
  ordinal = int(group[position].local_hardware_id)
  own = {"node": distributed.node_id(), "host": socket.gethostname()}
  try:
    own["blob"] = bytes(ext.create_exported(ordinal, position, len(group), timeout_s,
                                            staging_bytes)).hex()
    _spanning.append((key, position, names))
  except RuntimeError as e:  # Published, so that every rank fails now, not after the timeout.
    own["error"] = str(e)
  peers = [json.loads(v) for v in distributed.exchange(
      f"{key}/handles", position, json.dumps(own).encode(), names, timeout_s=timeout_s,
      what="get_buffer")]
  failed = [f"{name}: {p['error']}" for name, p in zip(names, peers) if "error" in p]
  if failed:
    raise RuntimeError("jax_moe_dispatch: get_buffer failed on " + "; ".join(failed))
  if len({p["node"] for p in peers}) > 1:
    hosts = {}
    for name, p in zip(names, peers):
      hosts.setdefault(f"{p['host']} ({p['node'][:8]})", []).append(name)
    raise RuntimeError(
        f"jax_moe_dispatch: the '{axis_name}' axis spans nodes ({hosts}); the native backend's "
        "groups spanning processes work within one node (CUDA IPC). Fix: use "
        "implementation='reference' for this axis (the multi-node path for now), or lay the "
        "mesh out so that each expert-parallel group lies within one node.")
  status = ""
  try:
    ext.open_peers(ordinal, [bytes.fromhex(p["blob"]) for p in peers], names)
  except RuntimeError as e:
    status = str(e)
  statuses = distributed.exchange(f"{key}/opened", position, status.encode(), names,
                                  timeout_s=timeout_s, what="get_buffer")
  failed = [f"{name}: {s.decode()}" for name, s in zip(names, statuses) if s]
  if failed:
    raise RuntimeError("jax_moe_dispatch: get_buffer failed on " + "; ".join(failed))


def _release(ext, timeout_s: float) -> None:
  """Free this process's native buffers (see :func:`free_buffer`)."""
  global _spanning, _exchanges
  if not _spanning:
    ext.free_all(True)
    return
  ext.close_peers()
  spanning, _spanning = _spanning, []
  _exchanges += 1
  try:
    for key, position, names in spanning:
      distributed.barrier(f"{key}/free{_exchanges}", position, names, timeout_s=timeout_s,
                          what="free_buffer")
  except TimeoutError as e:
    logger.warning("%s. This process keeps the buffers it shared with that process until it "
                   "exits (freeing memory a peer still maps is undefined behaviour in CUDA).", e)
    ext.free_all(False)
    return
  ext.free_all(True)


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
    topk: Optional[int] = None,
    pad_multiple: int = 1,
    timeout_s: Optional[float] = None,
) -> Buffer:
  """Set up the buffers the HybridEP ops need for tokens of this size (the seed's initialiser).

  As :func:`get_buffer`, with staging sized for one :func:`~jax_moe_dispatch.hybrid_ep_dispatch`
  + :func:`~jax_moe_dispatch.hybrid_ep_combine` of ``max_num_tokens`` tokens of
  ``hidden_dim`` values per rank and their backward passes. With ``R`` ranks,
  ``T = max_num_tokens``, ``L = num_local_experts``, ``H = hidden_dim``, ``M = R * T``
  receive rows and ``N = M * min(topk, L) + L * (pad_multiple - 1)`` permuted rows
  (the worst case of :func:`jax_moe_dispatch.core.permute.max_permuted_rows`),
  each rank's staging is the largest of what these ops copy there, each array
  rounded up to 256 bytes:

  * the dispatch: ``R * T`` int32 send lists, ``T * H`` bf16 rows (with
    ``fp8_dispatch``: ``T * H`` bytes and ``T * ceil(H / 128)`` float32 scales),
    and the ``T * R * L`` routing map (bool) and probabilities (float32);
  * the combine (and the dispatch's backward): ``N * H`` bf16 rows and the
    ``M * L`` int32 permutation;
  * the probabilities' gradient: ``M * L`` float32;
  * the combine's backward: ``R * T`` int32 send lists and ``T * H`` bf16 rows.

  Only groups spanning processes stage anything: when one process drives every
  GPU of a group, the kernels read XLA's buffers in place and the signal regions
  (:func:`get_buffer`) are all there is to allocate, whatever the sizes.

  Growth: an op traced later with sizes that need more staging (more tokens,
  wider or float32 rows, more permuted rows) grows the buffer while it is
  traced, before its program runs, logging one warning per growth
  (:func:`reserve_staging`); set it up large enough here to avoid that.

  Args:
    mesh: as for :func:`get_buffer` (the seed's process group).
    hidden_dim: ``H``, values per token row.
    max_num_tokens: ``T``, tokens per rank (the seed's ``seq_len``).
    num_local_experts: ``L``, experts per rank; required when a group spans
      processes.
    num_sms_dispatch_api, num_sms_combine_api: the HybridEP ops' SM budget:
      dispatch and combine share one, the larger of the two given, set as the
      default of :func:`set_hybridep_num_sms` (picked up by
      ``TokenDispatcherConfig.moe_hybridep_num_sms`` when a config is built and
      by ops called without ``num_sms``).
    fp8_dispatch: the dispatch moves FP8 rows with scales.
    axis_name: the expert-parallel axis of ``mesh``.
    topk: most experts one token goes to; default ``L`` (every received row
      on every local expert).
    pad_multiple: the ops' ``pad_multiple``.
    timeout_s: as for :func:`get_buffer`.

  Raises:
    as :func:`get_buffer`, and ``ValueError`` for a group spanning processes
    without ``num_local_experts``.
  """
  hidden_dim = _positive_int("hidden_dim", hidden_dim)
  max_num_tokens = _positive_int("max_num_tokens", max_num_tokens)
  pad_multiple = _positive_int("pad_multiple", pad_multiple)
  if num_local_experts is not None:
    num_local_experts = _positive_int("num_local_experts", num_local_experts)
  if topk is not None:
    topk = _positive_int("topk", topk)
  sms = [n for n in (num_sms_dispatch_api, num_sms_combine_api) if n is not None]
  if sms:
    set_hybridep_num_sms(max(sms))

  def staging_for(ranks: int) -> int:
    if num_local_experts is None:
      raise ValueError(
          "the expert axis spans processes, so init_hybrid_ep_buffer needs num_local_experts: the "
          "staging buffer holds the permuted rows of every local expert. Fix: "
          "init_hybrid_ep_buffer(mesh, hidden_dim, max_num_tokens, num_local_experts, ...).")
    return staging.hybrid_ep_buffer(
        _ext().staged_bytes, hidden_dim=hidden_dim, max_num_tokens=max_num_tokens,
        num_local=num_local_experts, num_ranks=ranks, fp8_dispatch=fp8_dispatch,
        topk=num_local_experts if topk is None else topk, pad_multiple=pad_multiple)

  return _get_buffer(mesh, axis_name, hidden_dim * (1 if fp8_dispatch else 2), max_num_tokens,
                     timeout_s, "init_hybrid_ep_buffer(mesh, hidden_dim, max_num_tokens, ...)",
                     staging_for)


def reset_hybrid_ep_buffer() -> None:
  """Bring the native buffers back to their state after set-up (waits for the GPUs to be idle).

  Zeroes every signal region, call counter and recorded failure and forgets
  the stream of the earlier calls; the memory stays allocated at its size (grown or not), so the
  next op, :func:`get_buffer` or :func:`init_hybrid_ep_buffer` of at most that
  size reuses it, and :func:`free_buffer` releases it. Use it after a failed
  call left ranks out of step; a fresh process needs nothing. With groups
  spanning processes every process of them must call it: no region is zeroed
  before every rank is idle, and it returns once all are.
  """
  global _exchanges
  if not has_buffer():
    return
  ext = _ext()
  if not _spanning:
    ext.reset()
    return
  _exchanges += 1
  ext.synchronize()
  for key, position, names in _spanning:
    distributed.barrier(f"{key}/reset{_exchanges}/idle", position, names,
                        timeout_s=_buffer.timeout_s, what="reset_hybrid_ep_buffer")
  ext.reset()
  for key, position, names in _spanning:
    distributed.barrier(f"{key}/reset{_exchanges}/zeroed", position, names,
                        timeout_s=_buffer.timeout_s, what="reset_hybrid_ep_buffer")


def free_buffer() -> None:
  """Release this process's native buffers; the native backend needs :func:`get_buffer` again.

  Waits for this process's GPUs to be idle, closes its mappings of the peers'
  memory, then frees its own. With groups spanning processes every process of
  them must call it: a rank frees its memory only once every peer has closed
  its mapping of it (a peer that does not arrive within ``timeout_s`` is named
  in a warning, and this process keeps that memory until it exits).
  """
  global _buffer
  if has_buffer():
    _release(_ext(), _buffer.timeout_s)
  _buffer = None


def has_buffer() -> bool:
  """Whether native buffers are set up in this process."""
  return _buffer is not None and _buffer.native


def last_error(device: Optional[jax.Device] = None) -> str:
  """What the last failed native call recorded on ``device`` (default: every GPU), or ``''``.

  A rank that waits longer than ``timeout_s`` for a peer gives up its call (the
  results are invalid) and its next call fails with this message as an XLA
  error; it says which peer and which call.
  """
  if not has_buffer():
    return ""
  ext = _ext()
  ordinals = ([int(device.local_hardware_id)] if device is not None
              else sorted(set(_buffer.local_devices)))
  return "\n".join(msg for msg in (ext.last_error(o) for o in ordinals) if msg)


def get_hidden_bytes(x) -> int:
  """Bytes of one token row as the buffers count them: ``H * max(itemsize, 2)``."""
  return int(x.shape[-1]) * max(np.dtype(x.dtype).itemsize, 2)


def get_uccl_ep_buffer(*args, **kwargs):
  """UCCL-EP is not available in this build."""
  raise NotImplementedError(
      "UCCL-EP is not available in this build of jax_moe_dispatch. Fix: "
      "moe_flex_dispatcher_backend='deepep' or 'hybridep'.")
