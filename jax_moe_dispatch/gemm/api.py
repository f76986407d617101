"""``grouped_matmul``: :func:`jax.lax.ragged_dot` semantics, grouped-GEMM speed on Hopper.

``grouped_matmul(x [N, K], w [G, K, M], group_sizes [G]) -> [N, M]`` multiplies
each consecutive run of rows by its group's matrix; rows past
``sum(group_sizes)`` give zeros. It is a :func:`jax.custom_vjp` whose backward
is two more grouped GEMMs (dgrad ``dy @ w[g].T``, wgrad ``x_g.T @ dy_g``), so
nothing is ever materialised per group: scratch memory stays O(N·(K+M)).

Where it runs (``implementation``):

* ``"auto"`` (default): the Pallas Mosaic-GPU kernels of
  :mod:`jax_moe_dispatch.gemm.mosaic` on Hopper GPUs (compute capability 9.x)
  for bfloat16/float16 operands whose sizes fit the tiles; everywhere else
  :func:`jax.lax.ragged_dot` (a dense, zero-padded matmul on NVIDIA GPUs), with
  the reason logged once on the ``jax_moe_dispatch`` logger — never silently.
* ``"mosaic"``: the kernels or a ``ValueError`` saying why not.
* ``"xla"``: :func:`jax.lax.ragged_dot` and its autodiff.
* ``"interpret"``: the kernels under Pallas's GPU interpreter, on CPU (slow;
  for tests of the kernels' indexing on machines without a GPU).

The kernels' cost follows the real rows: row blocks past ``sum(group_sizes)``
only store zeros, and the wgrad visits each group's own rows only.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Literal, Optional

import jax
import jax.numpy as jnp

from jax_moe_dispatch.gemm import mosaic
from jax_moe_dispatch.gemm.plan import WorkPlan, work_plan
from jax_moe_dispatch.gemm.tiles import tile_config

__all__ = ["GemmImplementation", "grouped_matmul"]

GemmImplementation = Literal["auto", "mosaic", "xla", "interpret"]
_IMPLEMENTATIONS = ("auto", "mosaic", "xla", "interpret")

logger = logging.getLogger("jax_moe_dispatch")


@functools.cache
def _log_once(level: int, message: str) -> None:
  logger.log(level, message)


def _hopper() -> Optional[str]:
  """``None`` when JAX's default devices are Hopper GPUs, else why not."""
  if jax.default_backend() != "gpu":
    return f"the default JAX backend is {jax.default_backend()!r}, not a GPU"
  device = jax.devices()[0]
  cc = str(getattr(device, "compute_capability", ""))
  if not cc.startswith("9."):
    return f"{device.device_kind} has compute capability {cc or 'unknown'}, not Hopper (9.x)"
  return None


def _interpret_params():
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # Tests only.

  return InterpretGPUParams()


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
  extra = -a.shape[0] % multiple
  return a if not extra else jnp.pad(a, ((0, extra), (0, 0)))


class _Route:
  """Which kernel (or XLA) runs each of the three products, decided at trace time."""

  def __init__(self, x, w, implementation: str):
    self.interpret = _interpret_params() if implementation == "interpret" else None
    self.num_sms = 4 if implementation == "interpret" else None
    num_rows, k = x.shape
    _, _, m = w.shape
    self.fwd_cfg = tile_config("fwd", k, m, x.dtype)
    self.dgrad_cfg = tile_config("dgrad", k, m, x.dtype)
    self.wgrad_cfg = tile_config("wgrad", k, m, x.dtype)
    if implementation == "interpret" and self.wgrad_cfg.consumers == 2:
      # The two-consumer wgrad does not run under the interpreter (mosaic._tgmm_ws).
      self.wgrad_cfg = dataclasses.replace(self.wgrad_cfg, consumers=1)
    self.row_multiple = 128  # Inputs are padded to it: a multiple of every config's block_m, block_k.
    self.rows = rows = num_rows + (-num_rows % self.row_multiple)  # The kernels' row count.
    if implementation == "xla":
      self.why_not = "implementation='xla'"
    elif implementation == "interpret":
      self.why_not = None
    else:
      self.why_not = _hopper()
    if self.why_not is None:
      self.why_not = mosaic.gmm_unsupported((rows, k), w.shape, x.dtype, w.dtype, False, self.fwd_cfg)
    self.why_not_dgrad = self.why_not or mosaic.gmm_unsupported(
        (rows, m), w.shape, x.dtype, w.dtype, True, self.dgrad_cfg)
    self.why_not_wgrad = self.why_not or mosaic.tgmm_unsupported(
        (rows, k), (rows, m), x.dtype, x.dtype, self.wgrad_cfg)
    if implementation == "mosaic":
      for what, why in (("forward", self.why_not), ("dgrad", self.why_not_dgrad),
                        ("wgrad", self.why_not_wgrad)):
        if why:
          raise ValueError(
              f"grouped_matmul(implementation='mosaic'): the {what} kernel cannot run: {why}. "
              "Fix: use implementation='auto' (falls back to jax.lax.ragged_dot) or change the "
              "shapes/dtypes.")
    shape = f"x {x.dtype}{tuple(x.shape)}, w {w.dtype}{tuple(w.shape)}"
    if self.why_not:
      _log_once(logging.WARNING if implementation == "auto" and jax.default_backend() == "gpu"
                else logging.INFO,
                f"jax_moe_dispatch.grouped_matmul: jax.lax.ragged_dot for {shape} ({self.why_not}).")
    else:
      _log_once(logging.INFO, f"jax_moe_dispatch.grouped_matmul: Mosaic-GPU kernels for {shape}.")
      for what, why in (("dgrad", self.why_not_dgrad), ("wgrad", self.why_not_wgrad)):
        if why:
          _log_once(logging.WARNING,
                    f"jax_moe_dispatch.grouped_matmul: the {what} of {shape} runs on "
                    f"jax.lax.ragged_dot ({why}).")


def _work_plan(route: _Route, group_sizes) -> Optional[WorkPlan]:
  """The kernels' work plan, made once by the forward and reused by the backward; ``None``
  where no kernel runs."""
  if route.why_not and route.why_not_dgrad and route.why_not_wgrad:
    return None
  return work_plan(group_sizes, route.rows, block_m=route.fwd_cfg.block_m,
                   block_k=route.wgrad_cfg.block_k, interpret=route.interpret is not None)


def _same_block_m(plan: Optional[WorkPlan], cfg: mosaic.TileConfig) -> Optional[WorkPlan]:
  return plan if plan is not None and plan.block_m == cfg.block_m else None


def _ragged(x, w, group_sizes, out_dtype):
  return jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=out_dtype)


def _forward(route: _Route, plan, x, w, group_sizes, out_dtype, fill_padding):
  if route.why_not:
    return _ragged(x, w, group_sizes, out_dtype)
  num_rows = x.shape[0]
  out = mosaic.gmm(_pad_rows(x, route.row_multiple), w, group_sizes, out_dtype=out_dtype,
                   cfg=route.fwd_cfg, num_sms=route.num_sms, interpret=route.interpret,
                   plan=_same_block_m(plan, route.fwd_cfg), fill_padding=fill_padding)
  return out[:num_rows]


def _dgrad(route: _Route, plan, dy, w, group_sizes, x_dtype, fill_padding):
  if route.why_not_dgrad:
    return _ragged(dy, jnp.swapaxes(w, 1, 2), group_sizes, x_dtype)
  num_rows = dy.shape[0]
  out = mosaic.gmm(_pad_rows(dy, route.row_multiple), w, group_sizes, transpose_rhs=True,
                   out_dtype=x_dtype, cfg=route.dgrad_cfg, num_sms=route.num_sms,
                   interpret=route.interpret, plan=_same_block_m(plan, route.dgrad_cfg),
                   fill_padding=fill_padding)
  return out[:num_rows]


def _wgrad(route: _Route, plan, x, dy, group_sizes, w):
  if route.why_not_wgrad:
    _, pullback = jax.vjp(lambda w: _ragged(x, w, group_sizes, dy.dtype), w)
    return pullback(dy)[0]
  return mosaic.tgmm(_pad_rows(x, route.row_multiple), _pad_rows(dy, route.row_multiple),
                     group_sizes, out_dtype=w.dtype, cfg=route.wgrad_cfg, num_sms=route.num_sms,
                     interpret=route.interpret, plan=plan)


def _like(value: jax.Array, *primals: jax.Array) -> jax.Array:
  """``value`` typed as varying over every mesh axis some of ``primals`` vary over.

  Inside ``shard_map`` (with its varying-axes check), a kernel's result carries
  no varying axes, but a cotangent must vary where its primal does and an output
  where its inputs do.
  """
  want = frozenset().union(*(getattr(jax.typeof(p), "vma", frozenset()) for p in primals))
  missing = tuple(sorted(want - getattr(jax.typeof(value), "vma", frozenset())))
  return jax.lax.pcast(value, missing, to="varying") if missing else value


def _apply(x, w, group_sizes, out_dtype, implementation, fill_padding):
  route = _Route(x, w, implementation)
  plan = _work_plan(route, group_sizes)
  out = _forward(route, plan, x, w, group_sizes, out_dtype, fill_padding)
  return _like(out, x, w, group_sizes), plan


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _grouped_matmul(x, w, group_sizes, out_dtype, implementation, fill_padding):
  return _apply(x, w, group_sizes, out_dtype, implementation, fill_padding)[0]


def _grouped_matmul_fwd(x, w, group_sizes, out_dtype, implementation, fill_padding):
  out, plan = _apply(x, w, group_sizes, out_dtype, implementation, fill_padding)
  return out, (x, w, group_sizes, plan)


def _grouped_matmul_bwd(out_dtype, implementation, fill_padding, res, dy):
  x, w, group_sizes, plan = res
  route = _Route(x, w, implementation)
  dy = dy.astype(x.dtype)
  dx = _like(_dgrad(route, plan, dy, w, group_sizes, x.dtype, fill_padding), x)
  dw = _like(_wgrad(route, plan, x, dy, group_sizes, w), w)
  return dx, dw, None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def grouped_matmul(
    x: jax.Array,
    w: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    implementation: GemmImplementation = "auto",
    fill_padding: bool = True,
) -> jax.Array:
  """Grouped matrix product with :func:`jax.lax.ragged_dot` semantics.

  Args:
    x: ``[N, K]``; rows are grouped consecutively from row 0.
    w: ``[G, K, M]``, one matrix per group, the dtype of ``x``.
    group_sizes: ``[G]`` integer rows per group (``sum <= N``); traced values
      are fine, nothing synchronises with the host.
    preferred_element_type: dtype of the result (default ``x.dtype``);
      products accumulate in float32 either way.
    implementation: ``"auto"``, ``"mosaic"``, ``"xla"`` or ``"interpret"``
      (module docstring).
    fill_padding: ``True`` (default): rows past ``sum(group_sizes)`` of the
      result, and of the gradient with respect to ``x``, are zero, as
      :func:`jax.lax.ragged_dot` gives them. ``False``: the Hopper kernels
      leave them unwritten, so they hold arbitrary values (NaN too; the
      fallback still gives zeros), and the cost follows the real rows only.
      For callers that never read those rows: the MoE layer's dispatcher
      reads each token's expert rows by index, never the padding of its
      static worst-case buffer. Those zeros are most of what a padded buffer
      costs over a tight one (BENCHMARKS.md).

  Returns:
    ``[N, M]``: row ``r`` of group ``g`` is ``x[r] @ w[g]``; rows past
    ``sum(group_sizes)`` are zero (or unspecified: ``fill_padding``).
    Differentiable in ``x`` and ``w``.

  Rows past ``sum(group_sizes)`` may hold anything (NaN too): they reach no
  output or gradient. On the Hopper kernels an inf or NaN inside a group's
  rows of ``x`` can also reach the weight gradient of a group whose rows share
  its 64-row block (as ``0 * inf``), where ``jax.lax.ragged_dot`` would keep it
  out; the forward output of those rows is non-finite either way.
  """
  if implementation not in _IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of {_IMPLEMENTATIONS}.")
  if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
    raise ValueError(f"grouped_matmul takes x [N, K] and w [G, K, M]; got x {x.shape}, w {w.shape}.")
  if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(
        f"group_sizes must be an integer array [G={w.shape[0]}], got "
        f"{group_sizes.dtype}{group_sizes.shape}.")
  if x.dtype != w.dtype:
    raise TypeError(f"x and w must share a dtype, got {x.dtype} and {w.dtype}. Fix: cast one.")
  out_dtype = jnp.dtype(preferred_element_type or x.dtype)
  return _grouped_matmul(x, w, group_sizes.astype(jnp.int32), out_dtype, implementation,
                         bool(fill_padding))
