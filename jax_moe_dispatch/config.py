"""Configuration of the flex token dispatcher.

The first twelve fields and their defaults are those of NeMo AutoModel's
``TokenDispatcherConfig`` (the PyTorch seed); the last ones exist only in JAX,
where shapes are static and the expert-parallel group is a mesh axis.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Literal, Optional

from jax_moe_dispatch.backends import IMPLEMENTATIONS, Implementation, default_num_sms
from jax_moe_dispatch.core import routing

DispatcherBackend = Literal["deepep", "hybridep", "uccl_ep"]
RouterDtype = Optional[Literal["fp32", "fp64"]]

_BACKENDS = typing.get_args(DispatcherBackend)
_ROUTER_DTYPES = (None, "fp32", "fp64")


@dataclasses.dataclass(frozen=True)
class TokenDispatcherConfig:
  """Settings of :class:`~jax_moe_dispatch.MoEFlexTokenDispatcher`.

  Attributes:
    moe_enable_deepep: use the fused (DeepEP-protocol) dispatch path.
    moe_permute_fusion: on the ``deepep`` path, when the native backend runs,
      ``dispatch_postprocess`` / ``combine_preprocess`` permute and unpermute
      with native CUDA kernels (one call each) instead of XLA's gathers; the
      same bits either way. No effect on the reference backend or on
      ``hybridep`` (whose native dispatch is already fused with the
      permutation). Which one runs is logged once.
    moe_expert_capacity_factor: if set, each expert keeps at most
      ``ceil(T * topk / num_experts * factor)`` of a rank's token assignments,
      the earliest tokens first (the "position" drop policy); the rest are
      masked out before dispatch, and receive buffers shrink to that bound.
    moe_router_topk: experts per token.
    moe_router_expert_pad_multiple: pad each local expert's group of rows to a
      multiple of this (e.g. for FP8 grouped GEMMs).
    num_moe_experts: experts in the layer, over all ranks.
    moe_router_dtype: dtype of the router's softmax: ``"fp32"``, ``"fp64"``
      or ``None`` (the input dtype).
    moe_flex_dispatcher_backend: ``"deepep"`` (top-k indices) or
      ``"hybridep"`` (multi-hot routing map); ``"uccl_ep"`` is not available in
      this build and raises when used.
    moe_deepep_num_sms: SMs the native DeepEP kernels use; default 20, or
      what :func:`jax_moe_dispatch.set_deepep_num_sms` set before the config
      was built. The dispatcher passes it to every op it calls.
    moe_hybridep_num_sms: the same for the HybridEP kernels (default 24,
      :func:`jax_moe_dispatch.set_hybridep_num_sms`).
    moe_share_token_dispatcher: accepted for parity with the seed.
    moe_deepep_async_dispatch: accepted for parity with the seed; XLA
      schedules communication, there is no separate communication stream.
    ep_axis_name: the mesh axis over which experts are sharded.
    max_recv_tokens: static row count of a rank's receive buffer. ``None``
      means the worst case (``ep_size * T``, or the capacity bound when
      ``moe_expert_capacity_factor`` is set). A smaller value must come with a
      capacity factor, so that dropping tokens is explicit.
    implementation: ``"auto"`` (native GPU kernels where present, else the
      reference), ``"native"`` (fail if the native backend is missing) or
      ``"reference"`` (pure JAX collectives).
  """

  moe_enable_deepep: bool = True
  moe_permute_fusion: bool = False
  moe_expert_capacity_factor: Optional[float] = None
  moe_router_topk: int = 2
  moe_router_expert_pad_multiple: Optional[int] = None
  num_moe_experts: int = 64
  moe_router_dtype: RouterDtype = "fp32"
  moe_flex_dispatcher_backend: DispatcherBackend = "deepep"
  moe_deepep_num_sms: int = dataclasses.field(default_factory=lambda: default_num_sms("deepep"))
  moe_hybridep_num_sms: int = dataclasses.field(default_factory=lambda: default_num_sms("hybridep"))
  moe_share_token_dispatcher: bool = True
  moe_deepep_async_dispatch: bool = False
  # JAX-only fields.
  ep_axis_name: str = "ep"
  max_recv_tokens: Optional[int] = None
  implementation: Implementation = "auto"

  def __post_init__(self) -> None:
    _check_choice("moe_flex_dispatcher_backend", self.moe_flex_dispatcher_backend, _BACKENDS)
    _check_choice("implementation", self.implementation, IMPLEMENTATIONS)
    _check_choice("moe_router_dtype", self.moe_router_dtype, _ROUTER_DTYPES)
    routing.check_positive_int("num_moe_experts", self.num_moe_experts)
    routing.check_positive_int("moe_router_topk", self.moe_router_topk)
    routing.check_positive_int("moe_deepep_num_sms", self.moe_deepep_num_sms)
    routing.check_positive_int("moe_hybridep_num_sms", self.moe_hybridep_num_sms)
    if self.moe_router_topk > self.num_moe_experts:
      raise ValueError(
          f"moe_router_topk={self.moe_router_topk} exceeds num_moe_experts="
          f"{self.num_moe_experts}; choose topk <= num_moe_experts."
      )
    if self.moe_router_expert_pad_multiple is not None:
      routing.check_positive_int("moe_router_expert_pad_multiple",
                                 self.moe_router_expert_pad_multiple)
    if self.moe_expert_capacity_factor is not None and not (
        isinstance(self.moe_expert_capacity_factor, (int, float))
        and math.isfinite(self.moe_expert_capacity_factor)
        and self.moe_expert_capacity_factor > 0
    ):
      raise ValueError(
          "moe_expert_capacity_factor must be None or a finite positive number, got "
          f"{self.moe_expert_capacity_factor!r}."
      )
    if self.max_recv_tokens is not None:
      routing.check_positive_int("max_recv_tokens", self.max_recv_tokens)
    if not isinstance(self.ep_axis_name, str) or not self.ep_axis_name:
      raise ValueError(f"ep_axis_name must be a non-empty str, got {self.ep_axis_name!r}.")
    for name in ("moe_enable_deepep", "moe_permute_fusion", "moe_share_token_dispatcher",
                 "moe_deepep_async_dispatch"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")

  def expert_capacity(self, num_tokens: int) -> Optional[int]:
    """Per-expert capacity for ``num_tokens`` tokens per rank, or ``None``."""
    if self.moe_expert_capacity_factor is None:
      return None
    return math.ceil(
        num_tokens * self.moe_router_topk / self.num_moe_experts
        * self.moe_expert_capacity_factor
    )

  def recv_bound(self, num_tokens: int, ep_size: int) -> int:
    """The smallest receive buffer that can never drop a token.

    ``ep_size * T`` without a capacity factor; with one, a rank can send
    another at most ``min(T, local_experts * capacity)`` tokens.
    """
    capacity = self.expert_capacity(num_tokens)
    per_source = num_tokens
    if capacity is not None:
      per_source = min(num_tokens, (self.num_moe_experts // ep_size) * capacity)
    return routing.max_recv_rows(None, per_source, ep_size)

  def resolve_max_recv_tokens(self, num_tokens: int, ep_size: int) -> int:
    """The receive-buffer rows to use; raises if the setting would drop silently."""
    bound = self.recv_bound(num_tokens, ep_size)
    if self.max_recv_tokens is None:
      return bound
    if self.max_recv_tokens < bound and self.moe_expert_capacity_factor is None:
      raise ValueError(
          f"max_recv_tokens={self.max_recv_tokens} is below the no-drop bound "
          f"{bound} (= ep_size {ep_size} x {num_tokens} tokens) and no "
          "moe_expert_capacity_factor is set, so tokens would be dropped "
          f"silently. Fix: set max_recv_tokens >= {bound} (or None), or set "
          "moe_expert_capacity_factor to drop tokens explicitly."
      )
    return self.max_recv_tokens


def _check_choice(name: str, value: object, allowed: tuple) -> None:
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not one of {allowed}.")
