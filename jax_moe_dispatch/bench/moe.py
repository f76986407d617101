"""The moe suite: an MoE layer's training step (router, dispatch, experts, combine; fwd+bwd).

For each ep size (``--ep``), one :class:`~jax_moe_dispatch.nn.layers.MoELayer`
(bf16 parameters and activations, SwiGLU experts) runs forward and backward
(gradients of every parameter and of the input) per rank under ``jax.jit`` +
``jax.shard_map``, with the dispatcher's ``implementation="auto"`` (native
kernels on GPUs once :func:`jax_moe_dispatch.get_buffer` has run; the
reference backend on CPU). Rows:

* ``layer``: the layer with ``grouped_matmul`` experts (``--gemm-impl``);
* ``layer_ragged``: the same layer with ``jax.lax.ragged_dot`` experts, skipped
  (with a note) where its scratch memory would not fit on the device;
* ``gemms``: the experts' grouped GEMMs alone, forward and backward (gate/up
  ``[N, H] @ [L, H, 2F]`` and down ``[N, F] @ [L, F, H]``), on rank 0's
  static row count and its real group sizes from the same routing;

``vs gemms x`` = layer time / time of its GEMMs alone (what dispatch, router,
activation and combine add). TFLOP/s count the experts' real rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import traceback
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jax_moe_dispatch import grouped_matmul
from jax_moe_dispatch.bench import report, timing
from jax_moe_dispatch.bench.session import Session, Suite
from jax_moe_dispatch.config import TokenDispatcherConfig
from jax_moe_dispatch.nn.layers import MoELayer, partition_specs


@dataclasses.dataclass
class Row:
  """One timed training step of one ep size (a CSV row)."""

  impl: str
  ep: int
  tokens: int
  hidden: int
  ffn: int
  experts: int
  topk: int
  rows: int
  real_rows: int
  time_ms: float = math.nan
  expert_tflops: float = math.nan
  vs_gemms: float = math.nan
  scratch_gib: float = math.nan
  iters: int = 0
  reps: int = 0
  loop_copy_bytes: int = 0
  clock: str = ""
  note: str = ""


COLUMNS = (
    report.Column("impl", "impl", 12), report.Column("ep", "ep", 2, "d"),
    report.Column("tokens", "T", 5, "d"), report.Column("hidden", "H", 5, "d"),
    report.Column("ffn", "F", 5, "d"), report.Column("experts", "E", 4, "d"),
    report.Column("topk", "K", 2, "d"), report.Column("rows", "N", 7, "d"),
    report.Column("time_ms", "time ms", 8, ".3f"), report.Column("expert_tflops", "TFLOP/s", 7, ".0f"),
    report.Column("vs_gemms", "vs gemms x", 10, ".2f"), report.Column("scratch_gib", "scratch GiB", 11, ".2f"),
    report.Column("note", "note", 30),
)


def add_arguments(group) -> None:
  group.add_argument("--moe-tokens", type=int, default=8192, help="tokens per rank (moe suite)")
  group.add_argument("--moe-hidden", type=int, default=4096, help="hidden size (moe suite)")
  group.add_argument("--moe-ffn", type=int, default=1408, help="expert FFN size (moe suite)")
  group.add_argument("--moe-experts", type=int, default=64, help="experts (moe suite)")
  group.add_argument("--moe-topk", type=int, default=6, help="experts per token (moe suite)")
  group.add_argument("--moe-iters", type=int, default=5, help="steps per timed loop (moe suite)")


def setting(args: argparse.Namespace) -> str:
  return (f"setting: MoELayer fwd+bwd, bf16, SwiGLU; T={args.moe_tokens}/rank, H={args.moe_hidden}, "
          f"F={args.moe_ffn}, E={args.moe_experts}, top-{args.moe_topk}; ep {args.ep}; "
          f"experts: grouped_matmul(implementation={getattr(args, 'gemm_impl', 'auto')!r})")


def _setup_native(mesh: Mesh, hidden: int, tokens: int, session: Session) -> None:
  from jax_moe_dispatch.backends import native

  if session.on_cpu or not native.native_available():
    return
  from jax_moe_dispatch import get_buffer

  get_buffer(mesh, hidden * 2, axis_name="ep", max_num_tokens=tokens)


def _layer_step(args, mesh, gemm_impl: str):
  """The jitted-able per-device step ``(params, x, dy) -> (grads, dx)`` and its inputs."""
  config = TokenDispatcherConfig(num_moe_experts=args.moe_experts, moe_router_topk=args.moe_topk)
  layer = MoELayer(config, args.moe_hidden, args.moe_ffn, rngs=nnx.Rngs(args.seed),
                   dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, gemm_implementation=gemm_impl)
  graphdef, params = nnx.split(layer)
  specs = partition_specs(params)

  def per_rank(params, x, dy):
    def loss(params, x):
      y, aux = nnx.merge(graphdef, params)(x)
      return jnp.sum(y.astype(jnp.float32) * dy.astype(jnp.float32)) + aux

    return jax.grad(loss, argnums=(0, 1))(params, x)

  step = jax.shard_map(per_rank, mesh=mesh, in_specs=(specs, P("ep"), P("ep")),
                       out_specs=(specs, P("ep")), check_vma=False)

  def counts(params, x):  # Rank-local static rows and real group sizes of the same routing.
    def per(params, x):
      model = nnx.merge(graphdef, params)
      idx, probs, _ = model.router(x)
      px, tpe, _, _ = model.dispatcher.token_permutation2(x, token_probs=probs, token_indices=idx)
      return tpe[None], jnp.zeros((1, px.shape[0]), jnp.int8)
    return jax.shard_map(per, mesh=mesh, in_specs=(specs, P("ep")), out_specs=P("ep"),
                         check_vma=False)(params, x)

  return step, counts, params


def _gemms(n: int, h: int, f: int, sizes: np.ndarray, gemm_impl: str, rng):
  """The experts' grouped GEMMs alone (fwd+bwd) on ``n`` static rows with ``sizes`` per expert.

  Every operand and output cotangent is fresh random data, as in the layer's
  step (a GEMM's speed on a GPU depends on its data, e.g. through power).
  """
  l = len(sizes)
  x = jnp.asarray(rng.normal(size=(n, h)), jnp.bfloat16)
  a = jnp.asarray(rng.normal(size=(n, f)), jnp.bfloat16)
  w1 = jnp.asarray(rng.normal(size=(l, h, 2 * f)) / math.sqrt(h), jnp.bfloat16)
  w2 = jnp.asarray(rng.normal(size=(l, f, h)) / math.sqrt(f), jnp.bfloat16)
  dy1 = jnp.asarray(rng.normal(size=(n, 2 * f)), jnp.bfloat16)
  dy2 = jnp.asarray(rng.normal(size=(n, h)), jnp.bfloat16)
  gs = jnp.asarray(sizes, jnp.int32)

  def fn(x, a, w1, w2, dy1, dy2, gs):
    mm = functools.partial(grouped_matmul, group_sizes=gs, implementation=gemm_impl)
    y1, back1 = jax.vjp(mm, x, w1)
    y2, back2 = jax.vjp(mm, a, w2)
    return y1, y2, back1(dy1), back2(dy2)

  return fn, (x, a, w1, w2, dy1, dy2, gs)


def run(session: Session) -> None:
  args = session.args
  gemm_impl = getattr(args, "gemm_impl", "auto")
  rng = np.random.default_rng(args.seed)
  t, h, f, e, k = args.moe_tokens, args.moe_hidden, args.moe_ffn, args.moe_experts, args.moe_topk
  for ep in args.ep:
    if session.over_budget():
      session.note(f"time budget spent: moe ep={ep} and later skipped")
      break
    if ep > len(session.devices) or e % ep:
      session.note(f"moe ep={ep} skipped: needs {ep} devices and E % ep == 0")
      continue
    mesh = Mesh(np.array(session.devices[:ep]), ("ep",))
    _setup_native(mesh, h, t, session)
    x = jnp.asarray(rng.normal(size=(ep * t, h)), jnp.bfloat16)
    dy = jnp.asarray(rng.normal(size=(ep * t, h)), jnp.bfloat16)
    gemm_ms = math.nan
    real_rows = n_rows = 0
    flops = math.nan
    for impl in ("gemms", "layer", "layer_ragged"):
      row = Row(impl, ep, t, h, f, e, k, 0, 0)
      try:
        if impl == "gemms":
          step, counts, params = _layer_step(args, mesh, gemm_impl)
          tpe, rows = jax.jit(counts)(params, x)
          sizes = np.asarray(tpe).reshape(ep, -1)[0]
          n_rows, real_rows = rows.shape[1], int(sizes.sum())
          flops = 2.0 * real_rows * h * 3 * f * 3  # gate/up (2F) + down (F), fwd + 2 bwd.
          fn, fargs = _gemms(n_rows, h, f, sizes, gemm_impl, rng)
        else:
          step, _, params = _layer_step(args, mesh, gemm_impl if impl == "layer" else "xla")
          fn, fargs = step, (params, x, dy)
        row.rows, row.real_rows = n_rows, real_rows
        scratch = timing.scratch_bytes(fn, fargs)
        row.scratch_gib = scratch / 2**30
        if not session.fits(scratch, f"moe {impl} ep={ep}"):
          row.note = f"not run: needs {row.scratch_gib:.0f} GiB scratch"
        else:
          lt = timing.device_time(fn, fargs, iters=args.moe_iters, reps=args.reps, clock=args.clock)
          row.time_ms = lt.median_s * 1e3
          row.iters, row.reps, row.loop_copy_bytes = args.moe_iters, args.reps, lt.copy_bytes
          row.clock = lt.clock
          row.expert_tflops = flops / lt.median_s / 1e12
          if impl == "gemms":
            gemm_ms = row.time_ms
          row.vs_gemms = row.time_ms / gemm_ms
      except Exception as ex:
        traceback.print_exc()
        row.note = f"{type(ex).__name__}: {str(ex)[:160]}"
        session.fail(f"moe {impl} ep={ep}: {row.note}")
      session.add(row, f"moe ep={ep}")


def plot(path: str, rows: Sequence[Row], title: str) -> None:
  report.bar_chart(path, rows, value="time_ms", label=lambda r: f"ep={r.ep}", panel="tokens",
                   series="impl", ylabel="ms per fwd+bwd step", title=title)


SUITE = Suite(name="moe", description="MoE layer fwd+bwd vs the same layer on ragged_dot vs its GEMMs",
              row=Row, columns=COLUMNS, add_arguments=add_arguments, setting=setting, run=run, plot=plot)
