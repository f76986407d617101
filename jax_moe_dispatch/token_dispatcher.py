"""The flex token dispatcher: Megatron's ``MoEFlexTokenDispatcher`` for Flax NNX.

This module has the public names of NeMo AutoModel's ``token_dispatcher`` (the
PyTorch seed): :class:`MoEFlexTokenDispatcher` and :class:`TokenDispatcherConfig`.

Call it per rank inside :func:`jax.shard_map` (or :func:`jax.pmap`) with
``config.ep_axis_name`` bound::

    dispatcher = MoEFlexTokenDispatcher(config)
    x_e, tokens_per_expert, probs_e, state = dispatcher.token_permutation2(
        x, token_probs=topk_probs, token_indices=topk_idx)
    y_e = experts(x_e, tokens_per_expert) * probs_e[:, None]   # experts weight by probs
    y = dispatcher.token_unpermutation(y_e, state)              # combine only sums

The stages keep the seed's names and return values; the PyTorch seed keeps the
communication handle in ``self``, here it is data: every stage after the
preprocessing returns a :class:`DispatchState` (last) and the later stages take
it back as their second argument. The module holds no arrays, so it can be
used from inside jit, grad, scan and ``flax.linen`` modules alike.

Both backends give identical results (rows, probabilities, group sizes and
combined output), because they share one receive layout
(:mod:`jax_moe_dispatch.backends.base`) and one permutation
(:func:`jax_moe_dispatch.core.permute.group_by_expert`):

* ``deepep``: :func:`~jax_moe_dispatch.fused_dispatch` with top-k indices, then
  ``dispatch_postprocess`` permutes the received rows into expert-major groups.
* ``hybridep``: :func:`~jax_moe_dispatch.hybrid_ep_dispatch` with the multi-hot
  routing map, which returns rows already permuted.

Everything that shapes a trace comes from the config: the SM budget
(``moe_deepep_num_sms`` / ``moe_hybridep_num_sms``), the implementation and
the static row counts are passed to every op as arguments.

Row counts are static: the receive buffer has
``config.resolve_max_recv_tokens(T, ep)`` rows, the permuted buffer
:func:`permuted_rows` rows; ``tokens_per_expert`` says how many are real
(padded to ``moe_router_expert_pad_multiple``), ready for
:func:`jax.lax.ragged_dot`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jax_moe_dispatch.config import TokenDispatcherConfig
from jax_moe_dispatch.core import native_permute as _native_perm
from jax_moe_dispatch.core import permute as _perm
from jax_moe_dispatch.core import routing
from jax_moe_dispatch.fused_a2a import (
    fused_combine,
    fused_dispatch,
    hybrid_ep_combine,
    hybrid_ep_dispatch,
)

__all__ = ["DispatchState", "MoEFlexTokenDispatcher", "TokenDispatcherConfig", "apply_capacity",
           "permuted_rows"]


def _static(**kw):
  return dataclasses.field(metadata=dict(static=True), **kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchState:
  """What later stages of one dispatch need; returned by a stage, passed to the next.

  A pytree (array fields are children; shapes and sizes are static metadata),
  so it can cross ``jit``, ``checkpoint`` and ``scan`` boundaries. Fields a
  stage has not filled yet are ``None``.

  Attributes:
    hidden_shape: shape of the hidden states given to preprocessing.
    backend: ``"deepep"`` or ``"hybridep"``.
    num_local_experts: ``L``, experts per rank.
    max_recv_tokens: ``M``, rows of the receive buffer.
    num_permuted_rows: ``N``, rows of the expert-major buffer.
    pad_multiple: each expert's group is padded to a multiple of this.
    token_indices: ``[T, K]`` int32 global expert ids after the capacity
      factor, -1 for dropped or absent assignments.
    token_probs: ``[T, K]`` float32 weights (deepep) or ``[T, E]`` multi-hot
      weights (hybridep), 0 where ``token_indices`` is -1.
    routing_map: ``[T, E]`` bool (hybridep).
    handle: :class:`~jax_moe_dispatch.DispatchHandle` (deepep) or
      :class:`~jax_moe_dispatch.HybridEPHandle` (hybridep).
    dispatched_indices: ``[M, K]`` local expert ids of received rows (deepep).
    dispatched_probs: ``[M, K]`` (deepep, before postprocessing) or ``[N]``
      per permuted row.
    tokens_per_expert: ``[L]`` int32; the padded group sizes once permuted.
    permutation: the expert-major permutation of the received rows.
  """

  hidden_shape: tuple = _static()
  backend: str = _static()
  num_local_experts: int = _static()
  max_recv_tokens: int = _static()
  num_permuted_rows: int = _static()
  pad_multiple: int = _static()
  token_indices: Optional[jax.Array] = None
  token_probs: Optional[jax.Array] = None
  routing_map: Optional[jax.Array] = None
  handle: Any = None
  dispatched_indices: Optional[jax.Array] = None
  dispatched_probs: Optional[jax.Array] = None
  tokens_per_expert: Optional[jax.Array] = None
  permutation: Optional[_perm.Permutation] = None


def apply_capacity(token_indices: jax.Array, token_probs: jax.Array, num_experts: int,
                   capacity: Optional[int]) -> tuple[jax.Array, jax.Array]:
  """Keep at most ``capacity`` assignments per expert: the earliest tokens' ("position" policy).

  Assignment ``(t, k)`` to expert ``e`` survives iff fewer than ``capacity``
  tokens ``t' < t`` of this rank are routed to ``e``. Dropped assignments get
  index -1 and probability 0. ``capacity=None`` only masks probabilities of
  ``-1`` indices to 0.
  """
  valid = token_indices >= 0
  if capacity is not None:
    routed, _ = routing.topk_to_multihot(token_indices, token_probs, num_experts)
    routed = routed.astype(jnp.int32)
    before = jnp.cumsum(routed, axis=0) - routed  # [T, E]: earlier tokens on each expert.
    rank = jnp.take_along_axis(before, jnp.clip(token_indices, 0, num_experts - 1), axis=1)
    valid = valid & (rank < capacity)
  indices = jnp.where(valid, token_indices, -1).astype(jnp.int32)
  probs = jnp.where(valid, token_probs, jnp.zeros((), token_probs.dtype))
  return indices, probs


def permuted_rows(config: TokenDispatcherConfig, num_tokens: int, ep_size: int) -> int:
  """Static rows ``N`` of the expert-major buffer for ``num_tokens`` tokens per rank.

  The worst case :func:`jax_moe_dispatch.core.permute.max_permuted_rows` of the
  receive buffer; with a capacity factor at most
  ``L * capacity * ep_size`` real rows plus ``L * (pad - 1)`` padding, the
  smaller bound wins.
  """
  num_local = config.num_moe_experts // ep_size
  pad = config.moe_router_expert_pad_multiple or 1
  max_recv = config.resolve_max_recv_tokens(num_tokens, ep_size)
  rows = _perm.max_permuted_rows(max_recv, num_local, config.moe_router_topk, pad)
  capacity = config.expert_capacity(num_tokens)
  if capacity is not None:
    rows = min(rows, num_local * capacity * ep_size + num_local * (pad - 1))
  return rows


class MoEFlexTokenDispatcher(nnx.Module):
  """Flex token dispatcher (DeepEP / HybridEP protocols) with the seed's stages.

  Args:
    config: the dispatcher settings; ``moe_flex_dispatcher_backend`` picks the
      protocol, ``implementation`` the backend that runs it (logged once when
      first traced, see :func:`jax_moe_dispatch.backends.get_backend`), and
      ``moe_deepep_num_sms`` / ``moe_hybridep_num_sms`` its SM budget.

  The number of local experts is ``config.num_moe_experts`` divided by the
  size of the axis ``config.ep_axis_name``, read when a stage is traced.
  """

  def __init__(self, config: TokenDispatcherConfig):
    if not isinstance(config, TokenDispatcherConfig):
      raise TypeError(f"config must be a TokenDispatcherConfig, got {type(config).__name__}.")
    if config.moe_flex_dispatcher_backend == "uccl_ep":
      raise NotImplementedError(
          "moe_flex_dispatcher_backend='uccl_ep' is not available in this build of "
          "jax_moe_dispatch (UCCL-EP has no JAX port). Fix: set "
          "moe_flex_dispatcher_backend='deepep' (top-k indices) or 'hybridep' "
          "(multi-hot routing map); both run on every platform."
      )
    self.config = config
    self.backend = config.moe_flex_dispatcher_backend

  # -------------------------------------------------------------- helpers

  def _op_args(self) -> dict:
    """What every op this dispatcher calls gets besides arrays and sizes: from the config."""
    cfg = self.config
    num_sms = cfg.moe_deepep_num_sms if self.backend == "deepep" else cfg.moe_hybridep_num_sms
    return dict(implementation=cfg.implementation, num_sms=num_sms)

  def _flatten(self, hidden_states, num_local_tokens):
    if hidden_states.ndim < 2:
      raise ValueError(f"hidden_states must be [T, H] or [B, S, H], got {hidden_states.shape}.")
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    if num_local_tokens is not None and int(num_local_tokens) != flat.shape[0]:
      raise ValueError(
          f"num_local_tokens={num_local_tokens} but hidden_states has {flat.shape[0]} tokens."
      )
    return flat

  def _make_state(self, hidden_shape, num_tokens, indices, probs) -> tuple[jax.Array, DispatchState]:
    cfg = self.config
    ep = routing.axis_size(cfg.ep_axis_name)
    num_local = routing.num_local_experts(cfg.num_moe_experts, ep)
    indices, probs = apply_capacity(indices, probs, cfg.num_moe_experts,
                                    cfg.expert_capacity(num_tokens))
    probs = probs.astype(jnp.float32)  # Dispatch moves float32 probabilities (as DeepEP).
    routing_map = None
    if self.backend == "hybridep":
      routing_map, probs = routing.topk_to_multihot(indices, probs, cfg.num_moe_experts)
    state = DispatchState(
        hidden_shape=tuple(hidden_shape),
        backend=self.backend,
        num_local_experts=num_local,
        max_recv_tokens=cfg.resolve_max_recv_tokens(num_tokens, ep),
        num_permuted_rows=permuted_rows(cfg, num_tokens, ep),
        pad_multiple=cfg.moe_router_expert_pad_multiple or 1,
        token_indices=indices,
        token_probs=probs,
        routing_map=routing_map,
    )
    return probs, state

  def _native_permute(self) -> bool:
    """Whether deepep's permute/unpermute run the native kernels (``moe_permute_fusion``)."""
    return _native_perm.runs_native(self.config.moe_permute_fusion, **self._op_args())

  def _out_probs(self, probs):
    if self.config.moe_router_dtype == "fp64" and jax.config.jax_enable_x64:
      return probs.astype(jnp.float64)
    return probs

  # -------------------------------------------------------------- dispatch

  def dispatch_preprocess(
      self,
      hidden_states: jax.Array,
      num_local_tokens: Optional[int] = None,
      probs: Optional[jax.Array] = None,
      routing_map: Optional[jax.Array] = None,
  ) -> tuple[jax.Array, jax.Array, DispatchState]:
    """Flatten the tokens and take routing as a dense ``[T, E]`` map (Megatron's router output).

    Args:
      hidden_states: ``[T, H]`` or ``[B, S, H]``.
      num_local_tokens: optional, checked against the flattened token count.
      probs: ``[T, E]`` routing weights.
      routing_map: ``[T, E]`` bool; default ``probs != 0`` (as the seed, which
        routes to the experts with non-zero probability). A token keeps at most
        ``moe_router_topk`` experts, those of highest probability.

    Returns:
      ``(hidden [T, H], token_probs, state)``; ``token_probs`` is ``[T, K]``
      (deepep) or ``[T, E]`` (hybridep), after the capacity factor.
    """
    if probs is None:
      raise ValueError("dispatch_preprocess needs probs [T, E] (and optionally routing_map).")
    x = self._flatten(hidden_states, num_local_tokens)
    num_tokens, num_experts = x.shape[0], self.config.num_moe_experts
    if probs.shape != (num_tokens, num_experts):
      raise ValueError(f"probs must be [T={num_tokens}, E={num_experts}], got {probs.shape}.")
    if routing_map is None:
      routing_map = probs != 0
    elif routing_map.shape != probs.shape:
      raise ValueError(f"routing_map must be {probs.shape}, got {routing_map.shape}.")
    scores = jnp.where(routing_map, jax.lax.stop_gradient(probs).astype(jnp.float32), -jnp.inf)
    top, indices = jax.lax.top_k(scores, self.config.moe_router_topk)
    indices = jnp.where(jnp.isfinite(top), indices, -1).astype(jnp.int32)
    token_probs = jnp.take_along_axis(probs, jnp.clip(indices, 0), axis=1)
    token_probs, state = self._make_state(hidden_states.shape, num_tokens, indices, token_probs)
    return x, token_probs, state

  def dispatch_preprocess2(
      self,
      hidden_states: jax.Array,
      num_local_tokens: Optional[int] = None,
      token_probs: Optional[jax.Array] = None,
      token_indices: Optional[jax.Array] = None,
  ) -> tuple[jax.Array, jax.Array, DispatchState]:
    """Flatten the tokens and take routing in top-k form.

    Args:
      hidden_states: ``[T, H]`` or ``[B, S, H]``.
      num_local_tokens: optional, checked against the flattened token count.
      token_probs: ``[T, K]`` routing weights.
      token_indices: ``[T, K]`` int global expert ids (distinct per token),
        -1 for none.

    Returns:
      ``(hidden [T, H], token_probs, state)`` as :meth:`dispatch_preprocess`.
    """
    if token_probs is None or token_indices is None:
      raise ValueError("dispatch_preprocess2 needs token_probs [T, K] and token_indices [T, K].")
    x = self._flatten(hidden_states, num_local_tokens)
    num_tokens = x.shape[0]
    routing.check_topk_routing(token_indices, token_probs, num_tokens)
    token_probs, state = self._make_state(hidden_states.shape, num_tokens,
                                          token_indices.astype(jnp.int32), token_probs)
    return x, token_probs, state

  def dispatch_all_to_all(
      self,
      hidden_states: jax.Array,
      state: DispatchState,
      probs: Optional[jax.Array] = None,
      async_finish: bool = False,
      allocate_on_comm_stream: bool = False,
  ) -> tuple[jax.Array, jax.Array, DispatchState]:
    """Send the tokens to the ranks owning their experts.

    ``probs`` defaults to ``state.token_probs`` (pass the preprocessed
    ``token_probs`` to make the data flow explicit). ``async_finish`` and
    ``allocate_on_comm_stream`` are accepted for parity; XLA schedules the
    communication.

    Returns:
      ``(hidden, dispatched_probs, state)``: deepep: received rows ``[M, H]``
      and probs ``[M, K]``; hybridep: permuted rows ``[N, H]`` and probs ``[N]``.
    """
    del async_finish, allocate_on_comm_stream
    _check_state(state, "dispatch_all_to_all", needs="token_probs")
    cfg = self.config
    probs = state.token_probs if probs is None else probs.astype(jnp.float32)
    if state.backend == "deepep":
      recv_x, recv_idx, recv_probs, tpe, handle = fused_dispatch(
          hidden_states, state.token_indices, probs, cfg.num_moe_experts, cfg.ep_axis_name,
          max_recv_tokens=state.max_recv_tokens, **self._op_args(),
      )
      state = dataclasses.replace(state, handle=handle, dispatched_indices=recv_idx,
                                  dispatched_probs=recv_probs, tokens_per_expert=tpe)
      return recv_x, recv_probs, state
    permuted_x, permuted_probs, _, tpe, handle = hybrid_ep_dispatch(
        hidden_states, state.routing_map, probs, state.num_local_experts, cfg.ep_axis_name,
        num_permuted_tokens=state.num_permuted_rows, pad_multiple=state.pad_multiple,
        topk=cfg.moe_router_topk, max_recv_tokens=state.max_recv_tokens, **self._op_args(),
    )
    state = dataclasses.replace(state, handle=handle, dispatched_probs=permuted_probs,
                                tokens_per_expert=tpe, permutation=handle.permutation)
    return permuted_x, permuted_probs, state

  def dispatch_postprocess(
      self, hidden_states: jax.Array, state: DispatchState
  ) -> tuple[jax.Array, jax.Array, jax.Array, DispatchState]:
    """Group received rows by local expert (deepep; hybridep rows already are).

    With ``config.moe_permute_fusion`` and the native backend, the native
    kernels do it (:mod:`jax_moe_dispatch.core.native_permute`); the same bits.

    Returns:
      ``(permuted_x [N, H], tokens_per_expert [L], permuted_probs [N],
      state)``: groups expert-major, each padded to the pad multiple (zero
      rows, probability 0), ordered within by (source rank, source token);
      rows past ``sum(tokens_per_expert)`` are zero.
    """
    _check_state(state, "dispatch_postprocess", needs="handle")
    if state.backend == "hybridep":
      return hidden_states, state.tokens_per_expert, self._out_probs(state.dispatched_probs), state
    local_map, local_probs = routing.topk_to_multihot(
        state.dispatched_indices, state.dispatched_probs, state.num_local_experts)
    args = (hidden_states, local_map, local_probs, state.num_permuted_rows, state.pad_multiple,
            state.dispatched_indices.shape[1])
    if self._native_permute():
      permuted_x, permuted_probs, perm = _native_perm.group_by_expert(
          *args, axis_name=self.config.ep_axis_name)
    else:
      permuted_x, permuted_probs, perm = _perm.group_by_expert(*args)
    state = dataclasses.replace(state, permutation=perm, dispatched_probs=permuted_probs,
                                tokens_per_expert=perm.tokens_per_expert)
    return permuted_x, perm.tokens_per_expert, self._out_probs(permuted_probs), state

  def token_permutation(
      self,
      hidden_states: jax.Array,
      num_local_tokens: Optional[int] = None,
      probs: Optional[jax.Array] = None,
      routing_map: Optional[jax.Array] = None,
  ) -> tuple[jax.Array, jax.Array, jax.Array, DispatchState]:
    """Preprocess (dense ``[T, E]`` routing), dispatch, postprocess.

    Returns ``(permuted_x, tokens_per_expert, permuted_probs, state)``.
    """
    x, token_probs, state = self.dispatch_preprocess(hidden_states, num_local_tokens, probs,
                                                     routing_map)
    x, _, state = self.dispatch_all_to_all(x, state, token_probs)
    return self.dispatch_postprocess(x, state)

  def token_permutation2(
      self,
      hidden_states: jax.Array,
      num_local_tokens: Optional[int] = None,
      token_probs: Optional[jax.Array] = None,
      token_indices: Optional[jax.Array] = None,
  ) -> tuple[jax.Array, jax.Array, jax.Array, DispatchState]:
    """Preprocess (top-k routing), dispatch, postprocess.

    Returns ``(permuted_x, tokens_per_expert, permuted_probs, state)``.
    """
    x, token_probs, state = self.dispatch_preprocess2(hidden_states, num_local_tokens,
                                                      token_probs, token_indices)
    x, _, state = self.dispatch_all_to_all(x, state, token_probs)
    return self.dispatch_postprocess(x, state)

  # -------------------------------------------------------------- combine

  def combine_preprocess(self, hidden_states: jax.Array, state: DispatchState) -> jax.Array:
    """Expert-major rows ``[N, H]`` -> receive layout ``[M, H]`` (deepep; hybridep: unchanged).

    Each received row is the float32 sum of its rows over local experts (a native
    kernel with ``config.moe_permute_fusion`` and the native backend; the same bits).
    """
    _check_state(state, "combine_preprocess", needs="permutation")
    routing.check_combine_rows(hidden_states, state.num_permuted_rows, "N", "hidden_states")
    if state.backend == "hybridep":
      return hidden_states
    if self._native_permute():
      return _native_perm.unpermute(hidden_states, state.permutation, state.max_recv_tokens,
                                    axis_name=self.config.ep_axis_name)
    return _perm.unpermute(hidden_states, state.permutation, state.max_recv_tokens)

  def combine_all_to_all(
      self,
      hidden_states: jax.Array,
      state: DispatchState,
      async_finish: bool = False,
      allocate_on_comm_stream: bool = False,
  ) -> jax.Array:
    """Return rows to their source ranks, summed per token: ``[T, H]``."""
    del async_finish, allocate_on_comm_stream
    _check_state(state, "combine_all_to_all", needs="handle")
    cfg = self.config
    if state.backend == "deepep":
      return fused_combine(hidden_states, state.handle, cfg.ep_axis_name, **self._op_args())
    return hybrid_ep_combine(hidden_states, state.handle, cfg.ep_axis_name, **self._op_args())

  def combine_postprocess(self, hidden_states: jax.Array, state: DispatchState) -> jax.Array:
    """Restore the shape the hidden states had before preprocessing."""
    return hidden_states.reshape(state.hidden_shape)

  def token_unpermutation(self, hidden_states: jax.Array, state: DispatchState) -> jax.Array:
    """Combine preprocess, all-to-all and postprocess: ``[N, H]`` -> input shape."""
    hidden_states = self.combine_preprocess(hidden_states, state)
    hidden_states = self.combine_all_to_all(hidden_states, state)
    return self.combine_postprocess(hidden_states, state)


def _check_state(state, stage: str, needs: str) -> None:
  if not isinstance(state, DispatchState):
    raise TypeError(
        f"{stage} takes the DispatchState returned by the previous stage as its second "
        f"argument, got {type(state).__name__}."
    )
  if getattr(state, needs) is None:
    raise ValueError(
        f"{stage}: the state has no {needs!r} yet; run the earlier stages first "
        "(preprocess -> dispatch_all_to_all -> dispatch_postprocess -> combine_*)."
    )
