"""Exchanging small values between processes through ``jax.distributed``'s key-value store.

When an expert-parallel group spans processes (one process per GPU, started
with :func:`jax.distributed.initialize`), the native backend's ranks swap their
CUDA IPC handles and wait for each other through the coordination service
that ``jax.distributed`` already runs: no other dependency, no shared files.
Every wait is bounded and a rank that does not arrive is named.

The store is reached through ``jax._src.distributed.global_state.client``
(what :mod:`jax.experimental.multihost_utils` uses too); its
``key_value_set_bytes`` / ``blocking_key_value_get_bytes`` exist in every jax
this package supports.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Sequence

import jax

__all__ = ["barrier", "exchange", "initialize_from_launcher", "node_id"]


def initialize_from_launcher(**kwargs) -> None:
  """:func:`jax.distributed.initialize` for a process started by ``scripts/launch_ranks.py``.

  Reads ``JMD_NUM_PROCESSES``, ``JMD_PROCESS_ID`` and, if set,
  ``JAX_LOCAL_DEVICE_IDS`` (jax reads ``JAX_COORDINATOR_ADDRESS`` itself);
  ``kwargs`` go to :func:`jax.distributed.initialize`. Under SLURM, Open MPI
  and the other launchers jax detects, call :func:`jax.distributed.initialize`
  directly instead.
  """
  try:
    num_processes = int(os.environ["JMD_NUM_PROCESSES"])
    process_id = int(os.environ["JMD_PROCESS_ID"])
  except KeyError as e:
    raise RuntimeError(
        f"jax_moe_dispatch: {e.args[0]} is not set: this process was not started by "
        "scripts/launch_ranks.py. Fix: start it with the launcher, or call "
        "jax.distributed.initialize(...) yourself.") from None
  if os.environ.get("JAX_LOCAL_DEVICE_IDS") and "local_device_ids" not in kwargs:
    kwargs["local_device_ids"] = [int(i) for i in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
  jax.distributed.initialize(num_processes=num_processes, process_id=process_id, **kwargs)


def _client():
  from jax._src import distributed

  client = distributed.global_state.client
  if client is None:
    raise RuntimeError(
        "jax_moe_dispatch: the expert axis spans processes but jax.distributed is not "
        "initialized in this one. Fix: call jax.distributed.initialize(...) in every process "
        "before building the mesh.")
  return client


def exchange(
    key: str,
    index: int,
    value: bytes,
    names: Sequence[str],
    *,
    timeout_s: float,
    what: str,
) -> list[bytes]:
  """Publish ``value`` as participant ``index`` of ``key`` and return everyone's values.

  Every participant of ``key`` (``len(names)`` of them, indices ``0..n-1``)
  calls this once with its own index; a key is used for one exchange only.

  Args:
    key: a key-value store prefix, unique to this exchange.
    index: this participant's index.
    value: what it publishes.
    names: each participant's name, for errors (e.g. ``"process 3"``).
    timeout_s: how long to wait for all of them, in total.
    what: the step, for errors (e.g. ``"get_buffer"``).

  Returns:
    The values by index (``value`` itself at ``index``).

  Raises:
    TimeoutError: a participant did not publish in time; the message names it.
  """
  client = _client()
  client.key_value_set_bytes(f"{key}/{index}", bytes(value))
  deadline = time.monotonic() + timeout_s
  out = []
  for i, name in enumerate(names):
    if i == index:
      out.append(bytes(value))
      continue
    left_ms = max(1, int((deadline - time.monotonic()) * 1000))
    try:
      out.append(bytes(client.blocking_key_value_get_bytes(f"{key}/{i}", left_ms)))
    except jax.errors.JaxRuntimeError as e:
      raise TimeoutError(
          f"jax_moe_dispatch: {name} did not reach {what} within {timeout_s:g} s (key {key!r}): "
          "every process of the expert axis must make the same jax_moe_dispatch buffer calls; "
          f"that process may have died or be stuck ({str(e).splitlines()[0]})") from e
  return out


def barrier(key: str, index: int, names: Sequence[str], *, timeout_s: float, what: str) -> None:
  """Return once every participant of ``key`` has called it (see :func:`exchange`)."""
  exchange(key, index, b"", names, timeout_s=timeout_s, what=what)


def node_id() -> str:
  """What identifies this machine: the kernel's boot id (one per host), else the host name."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return socket.gethostname()
