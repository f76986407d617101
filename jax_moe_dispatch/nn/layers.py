"""Flax NNX MoE layers on top of :class:`~jax_moe_dispatch.MoEFlexTokenDispatcher`.

``MoELayer`` = :class:`TopKRouter` -> dispatcher -> :class:`GroupedExperts`
(output weighted by the permuted probabilities) -> dispatcher back. Run it per
rank inside ``jax.shard_map`` over the expert axis: expert weights are
:class:`ExpertParam` with the experts on their leading axis, sharded over the
axis (each rank sees its ``L`` local experts); every other parameter is
replicated. :func:`partition_specs` gives the ``in_specs`` for a module state.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_moe_dispatch.config import TokenDispatcherConfig
from jax_moe_dispatch.gemm import GemmImplementation, grouped_matmul
from jax_moe_dispatch.token_dispatcher import MoEFlexTokenDispatcher

__all__ = ["ExpertParam", "GroupedExperts", "MoELayer", "TopKRouter", "partition_specs",
           "reduce_gradients"]

_ROUTER_DTYPES = {"fp32": jnp.float32, "fp64": jnp.float64}


class ExpertParam(nnx.Param):
  """A parameter whose leading axis is the experts, sharded over the expert-parallel axis."""


def partition_specs(state, axis_name: str = "ep"):
  """``PartitionSpec`` tree for an NNX state: ``P(axis_name)`` for :class:`ExpertParam`, ``P()`` else.

  Use it as the ``in_specs``/``out_specs`` entry of the state in
  ``jax.shard_map`` and, with ``NamedSharding``, to place the state.
  """
  is_var = lambda x: isinstance(x, nnx.Variable)
  return jax.tree.map(lambda v: P(axis_name) if isinstance(v, ExpertParam) else P(), state,
                      is_leaf=is_var)


def reduce_gradients(grads, specs, axis_name: str = "ep"):
  """Turn per-rank gradients into those of the mean over ranks of the per-rank losses.

  For ``jax.shard_map(..., check_vma=False)``: there, the gradient a rank gets
  for its copy of a replicated parameter covers only its own use, so the
  copies' gradients are averaged (``jax.lax.pmean``); an expert shard's
  gradient already sums every rank's loss (the dispatcher's backward brings
  it home), so it is divided by the axis size. ``specs`` is
  :func:`partition_specs` of the state.
  """
  ep = jax.lax.axis_size(axis_name)
  replicated = lambda a: jax.lax.pmean(a, axis_name)
  sharded = lambda a: a / ep
  return jax.tree.map(lambda s, g: jax.tree.map(replicated if s == P() else sharded, g),
                      specs, grads, is_leaf=lambda s: isinstance(s, P))


def _router_dtype(router_dtype: Optional[str], x_dtype):
  if router_dtype is None:
    return x_dtype
  if router_dtype == "fp64" and not jax.config.jax_enable_x64:
    raise ValueError(
        "moe_router_dtype='fp64' needs 64-bit JAX. Fix: jax.config.update('jax_enable_x64', "
        "True) at start-up, or use moe_router_dtype='fp32'."
    )
  return _ROUTER_DTYPES[router_dtype]


class TopKRouter(nnx.Module):
  """Linear scores -> softmax over all experts -> top-k (in ``router_dtype``).

  Args:
    hidden_size: ``H``.
    num_experts: ``E`` (global).
    topk: ``K`` experts per token.
    router_dtype: ``"fp32"`` (default), ``"fp64"`` or ``None`` (input dtype).
    aux_loss_coeff: weight of the Switch-style load-balancing loss
      ``E * sum_e f_e * P_e`` (``f_e``: share of assignments to ``e``, ``P_e``:
      mean probability of ``e``), over this rank's tokens; 0 disables it.
    normalize: rescale the top-k probabilities to sum to one.
  """

  def __init__(self, hidden_size: int, num_experts: int, topk: int, *, rngs: nnx.Rngs,
               router_dtype: Optional[str] = "fp32", aux_loss_coeff: float = 0.0,
               normalize: bool = False, param_dtype=jnp.float32):
    if not 0 < topk <= num_experts:
      raise ValueError(f"topk={topk} must be in [1, num_experts={num_experts}].")
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal")
    self.weight = nnx.Param(init(rngs.params(), (hidden_size, num_experts), param_dtype))
    self.num_experts = num_experts
    self.topk = topk
    self.router_dtype = router_dtype
    self.aux_loss_coeff = float(aux_loss_coeff)
    self.normalize = normalize

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x [..., H]`` -> ``(topk_idx [T, K] int32, topk_probs [T, K], aux_loss scalar)``."""
    x = x.reshape(-1, x.shape[-1])
    dtype = _router_dtype(self.router_dtype, x.dtype)
    logits = x.astype(dtype) @ self.weight.get_value().astype(dtype)
    scores = jax.nn.softmax(logits, axis=-1)
    probs, idx = jax.lax.top_k(scores, self.topk)
    if self.normalize:
      probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
    aux = jnp.zeros((), jnp.float32)
    if self.aux_loss_coeff:
      counts = jnp.zeros((self.num_experts,), jnp.float32).at[idx.reshape(-1)].add(1.0)
      share = counts / idx.size
      aux = (self.aux_loss_coeff * self.num_experts
             * jnp.sum(share * scores.mean(axis=0))).astype(jnp.float32)
    return idx.astype(jnp.int32), probs, aux


class GroupedExperts(nnx.Module):
  """``E`` MLP experts over expert-major rows, as grouped GEMMs (:func:`~jax_moe_dispatch.grouped_matmul`).

  Weights are :class:`ExpertParam` with the experts on the leading axis,
  sharded over the expert axis (inside ``shard_map`` a rank holds its ``L``):
  SwiGLU keeps gate and up projections as one ``w_gate_up [E, H, 2F]`` (gate
  columns first) so that both are one GEMM of width ``2F``; GELU has
  ``w_up [E, H, F]``; both have ``w_down [E, F, H]``.

  Args:
    activation: ``"swiglu"`` (``silu(x W_gate) * x W_up``) or ``"gelu"``.
    dtype: compute dtype of the GEMMs (default: the input's); bf16 and fp16 run
      the Hopper kernels, products accumulate in float32 and the activation is
      computed in float32.
    gemm_implementation: ``implementation`` of :func:`~jax_moe_dispatch.grouped_matmul`
      (``"auto"``: the Hopper kernels where they apply, else
      :func:`jax.lax.ragged_dot`, logged once).
    fill_padding: ``fill_padding`` of :func:`~jax_moe_dispatch.grouped_matmul`:
      ``False`` leaves the rows past ``sum(tokens_per_expert)`` of the output
      (and of the input's gradient) unspecified instead of zero, so that the
      cost follows the real rows; for callers that never read them, like
      :class:`MoELayer`, whose dispatcher reads expert rows by index.
  """

  def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, *, rngs: nnx.Rngs,
               activation: str = "swiglu", dtype=None, param_dtype=jnp.float32,
               gemm_implementation: GemmImplementation = "auto", fill_padding: bool = True):
    if activation not in ("swiglu", "gelu"):
      raise ValueError(f"activation must be 'swiglu' or 'gelu', got {activation!r}.")
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=-2, out_axis=-1,
                                             batch_axis=(0,))
    if activation == "swiglu":
      self.w_gate_up = ExpertParam(
          init(rngs.params(), (num_experts, hidden_size, 2 * ffn_size), param_dtype))
    else:
      self.w_up = ExpertParam(init(rngs.params(), (num_experts, hidden_size, ffn_size), param_dtype))
    self.w_down = ExpertParam(init(rngs.params(), (num_experts, ffn_size, hidden_size), param_dtype))
    self.activation = activation
    self.ffn_size = ffn_size
    self.dtype = dtype
    self.gemm_implementation = gemm_implementation
    self.fill_padding = fill_padding

  def __call__(self, x: jax.Array, tokens_per_expert: jax.Array,
               probs: Optional[jax.Array] = None) -> jax.Array:
    """``x [N, H]`` expert-major rows, ``tokens_per_expert [L]`` -> ``[N, H]``.

    With ``probs [N]`` each row's output is multiplied by its probability
    (applied to the activation, in float32, before the down projection).
    Rows past ``sum(tokens_per_expert)`` come out zero (unspecified without
    ``fill_padding``).
    """
    num_local = self.w_down.get_value().shape[0]
    if tokens_per_expert.shape != (num_local,):
      raise ValueError(
          f"tokens_per_expert has shape {tokens_per_expert.shape} but this module holds "
          f"{num_local} experts. Fix: run it inside jax.shard_map with its ExpertParams "
          "sharded over the expert axis (in_specs=partition_specs(state)), so each rank "
          "holds only its local experts."
      )
    dtype = self.dtype or x.dtype
    gs = tokens_per_expert.astype(jnp.int32)

    def matmul(a, w):
      return grouped_matmul(a.astype(dtype), w.get_value().astype(dtype), gs,
                            implementation=self.gemm_implementation,
                            fill_padding=self.fill_padding)

    if self.activation == "swiglu":
      gate_up = matmul(x, self.w_gate_up).astype(jnp.float32)
      h = jax.nn.silu(gate_up[:, :self.ffn_size]) * gate_up[:, self.ffn_size:]
    else:
      h = jax.nn.gelu(matmul(x, self.w_up).astype(jnp.float32))
    if probs is not None:
      h = h * probs.astype(jnp.float32)[:, None]
    return matmul(h, self.w_down)


class MoELayer(nnx.Module):
  """Router -> dispatcher -> experts (weighted by probabilities) -> dispatcher back.

  Call per rank inside ``shard_map`` over ``config.ep_axis_name``.

  Args:
    config: dispatcher settings; ``num_moe_experts``, ``moe_router_topk``
      and ``moe_router_dtype`` size the router and experts.
    hidden_size, ffn_size: ``H`` and the experts' ``F``.
    activation: ``"swiglu"`` or ``"gelu"``.
    aux_loss_coeff: load-balancing loss weight (0: off).
    gemm_implementation: the experts' grouped GEMMs (:class:`GroupedExperts`).

  The experts run without ``fill_padding``: the rows of the dispatcher's static
  worst-case buffer past its real rows cost nothing, as the dispatcher reads
  each token's expert rows by index and never those.
  """

  def __init__(self, config: TokenDispatcherConfig, hidden_size: int, ffn_size: int, *,
               rngs: nnx.Rngs, activation: str = "swiglu", aux_loss_coeff: float = 0.0,
               normalize_topk: bool = False, dtype=None, param_dtype=jnp.float32,
               gemm_implementation: GemmImplementation = "auto"):
    self.router = TopKRouter(hidden_size, config.num_moe_experts, config.moe_router_topk,
                             rngs=rngs, router_dtype=config.moe_router_dtype,
                             aux_loss_coeff=aux_loss_coeff, normalize=normalize_topk,
                             param_dtype=param_dtype)
    self.dispatcher = MoEFlexTokenDispatcher(config)
    self.experts = GroupedExperts(config.num_moe_experts, hidden_size, ffn_size, rngs=rngs,
                                  activation=activation, dtype=dtype, param_dtype=param_dtype,
                                  gemm_implementation=gemm_implementation, fill_padding=False)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [T, H]`` or ``[B, S, H]`` -> ``(y of x's shape, aux_loss)``."""
    idx, probs, aux = self.router(x)
    permuted_x, tokens_per_expert, permuted_probs, state = self.dispatcher.token_permutation2(
        x, token_probs=probs, token_indices=idx)
    y = self.experts(permuted_x, tokens_per_expert, permuted_probs)
    return self.dispatcher.token_unpermutation(y, state), aux
