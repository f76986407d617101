#!/usr/bin/env python
"""Train a small MoE model with expert parallelism: jit + shard_map over mesh axis "ep".

    python examples/train_moe.py                      # 8 emulated CPU devices
    python examples/train_moe.py --devices gpu        # every local GPU on the ep axis
    python examples/train_moe.py --backend hybridep --implementation reference

Model: embedding -> N x [x + MoE(RMSNorm(x))] -> RMSNorm -> linear head, on a
synthetic task with a learnable signal (each token must be mapped to its image
under a fixed random permutation of the vocabulary). Each rank draws its own
tokens; expert weights are sharded over "ep", everything else is replicated and
its gradient averaged over "ep" with ``jax.lax.pmean`` (so XLA's own
collectives run in the same step as the dispatcher's).
"""

from __future__ import annotations

import argparse
import os
import sys

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--backend", choices=("deepep", "hybridep"), default="deepep",
                 help="moe_flex_dispatcher_backend")
  p.add_argument("--implementation", choices=("auto", "native", "reference"), default="auto")
  p.add_argument("--devices", choices=("auto", "cpu", "gpu"), default="auto",
                 help="auto: all local GPUs if JAX sees any, else emulated CPU devices")
  p.add_argument("--ep", type=int, default=None,
                 help="devices on the ep axis (default: all GPUs, or 8 CPU devices)")
  p.add_argument("--tokens", type=int, default=64, help="tokens per rank per step")
  p.add_argument("--hidden", type=int, default=64)
  p.add_argument("--ffn", type=int, default=128)
  p.add_argument("--experts", type=int, default=16)
  p.add_argument("--topk", type=int, default=2)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--vocab", type=int, default=64)
  p.add_argument("--lr", type=float, default=1e-2)
  p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw")
  p.add_argument("--capacity-factor", type=float, default=None)
  p.add_argument("--aux-loss", type=float, default=1e-2, help="load-balancing loss weight")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  return p.parse_args(argv)


def _set_cpu_device_count(argv) -> None:
  """Emulate CPU devices (before JAX is imported) unless GPUs are asked for or flags are set."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--devices", default="auto")
  pre.add_argument("--ep", type=int, default=None)
  ns, _ = pre.parse_known_args(argv)
  flags = os.environ.get("XLA_FLAGS", "")
  if ns.devices != "gpu" and _DEVICE_FLAG not in flags and "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_FLAG}={max(ns.ep or 8, 1)}".strip()


if __name__ == "__main__":
  _set_cpu_device_count(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_moe_dispatch as jmd  # noqa: E402
from jax_moe_dispatch.nn.layers import MoELayer, partition_specs, reduce_gradients  # noqa: E402


class Block(nnx.Module):
  """Pre-norm residual block around an MoE layer."""

  def __init__(self, config, hidden, ffn, *, rngs, aux_loss_coeff):
    self.norm = nnx.RMSNorm(hidden, rngs=rngs)
    self.moe = MoELayer(config, hidden, ffn, rngs=rngs, aux_loss_coeff=aux_loss_coeff)

  def __call__(self, x):
    y, aux = self.moe(self.norm(x))
    return x + y, aux


class MoEModel(nnx.Module):
  """Embedding -> blocks -> RMSNorm -> head; returns ``(logits, aux_loss)``."""

  def __init__(self, config, *, vocab, hidden, ffn, layers, rngs, aux_loss_coeff=0.0):
    self.embed = nnx.Embed(vocab, hidden, rngs=rngs)
    self.blocks = nnx.List([Block(config, hidden, ffn, rngs=rngs, aux_loss_coeff=aux_loss_coeff)
                            for _ in range(layers)])
    self.norm = nnx.RMSNorm(hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    aux = jnp.zeros((), jnp.float32)
    for block in self.blocks:
      x, a = block(x)
      aux = aux + a
    return self.head(self.norm(x)), aux


def select_devices(kind: str, ep: int | None):
  """The devices of the ep axis: all local GPUs (or ``ep`` of them), else CPU devices."""
  if kind == "auto":
    kind = "gpu" if any(d.platform == "gpu" for d in jax.local_devices()) else "cpu"
  try:
    devices = jax.local_devices(backend=kind)
  except RuntimeError as e:
    raise SystemExit(f"--devices {kind}: JAX sees no {kind} devices ({e}).") from e
  ep = ep or (len(devices) if kind == "gpu" else min(8, len(devices)))
  if len(devices) < ep:
    raise SystemExit(
        f"--ep {ep} needs {ep} {kind} devices but JAX sees {len(devices)}. On CPU set "
        f"XLA_FLAGS={_DEVICE_FLAG}={ep} before starting Python (the script does it when run "
        "directly).")
  return kind, devices[:ep]


def setup_buffers(mesh, hidden_bytes: int, max_num_tokens: int) -> str:
  """Set up the native dispatch buffers on GPUs (if this build has them); returns a status line."""
  try:
    from jax_moe_dispatch.backends.buffer import get_buffer
  except (ImportError, AttributeError) as e:
    return f"no native buffers ({e})"
  get_buffer(mesh, hidden_bytes, axis_name="ep", max_num_tokens=max_num_tokens)
  return "native buffers ready"


def build(args, devices):
  """Model, sharded parameters, optimizer state and the jitted ``train_step``."""
  mesh = Mesh(np.array(devices), ("ep",))
  config = jmd.TokenDispatcherConfig(
      num_moe_experts=args.experts, moe_router_topk=args.topk,
      moe_flex_dispatcher_backend=args.backend, moe_expert_capacity_factor=args.capacity_factor,
      implementation=args.implementation)
  model = MoEModel(config, vocab=args.vocab, hidden=args.hidden, ffn=args.ffn,
                   layers=args.layers, rngs=nnx.Rngs(args.seed), aux_loss_coeff=args.aux_loss)
  graphdef, params = nnx.split(model)
  specs = partition_specs(params)
  params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  tx = optax.adamw(args.lr, weight_decay=1e-4) if args.optimizer == "adamw" else optax.sgd(args.lr)
  opt_state = jax.jit(tx.init)(params)  # Moments follow the params' shardings.
  replicated = NamedSharding(mesh, P())
  opt_state = jax.device_put(opt_state, jax.tree.map(
      lambda a: a.sharding if isinstance(a.sharding, NamedSharding) else replicated, opt_state))
  table = jnp.asarray(np.random.default_rng(args.seed).permutation(args.vocab), jnp.int32)

  def local_grads(params, step):
    """Per rank: draw tokens, loss on them, gradients (replicated ones averaged over ep)."""
    rank = jax.lax.axis_index("ep")
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(args.seed + 1), step), rank)
    tokens = jax.random.randint(key, (args.tokens,), 0, args.vocab)
    targets = table[tokens]

    def loss_fn(p):
      logits, aux = nnx.merge(graphdef, p)(tokens)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           targets).mean()
      return ce + aux, ce

    (_, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    # Minimise the mean over ranks of the per-rank loss: replicated params'
    # grads are averaged over "ep" (pmean, an XLA all-reduce in the same step
    # as the dispatcher's collectives); expert shards' grads already hold every
    # rank's contribution through the dispatcher's backward and are divided by ep.
    return reduce_gradients(grads, specs, "ep"), jax.lax.pmean(ce, "ep")

  sharded_grads = jax.shard_map(local_grads, mesh=mesh, in_specs=(specs, P()),
                                out_specs=(specs, P()), check_vma=False)

  def train_step(params, opt_state, step):
    grads, loss = sharded_grads(params, step)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  # Outputs keep the inputs' shardings, so step 2 reuses step 1's executable.
  shardings = jax.tree.map(lambda a: a.sharding, (params, opt_state))
  train_step = jax.jit(train_step, out_shardings=(*shardings, replicated),
                       donate_argnums=(0, 1))

  return mesh, model, params, opt_state, train_step


def main(argv=None) -> list[float]:
  """Run the training loop; returns the loss of every step."""
  args = parse_args(argv)
  kind, devices = select_devices(args.devices, args.ep)
  if kind == "cpu" and args.implementation == "auto":
    args.implementation = "reference"  # No native backend on CPU.
  status = "cpu: reference collectives"
  if kind == "gpu":
    status = setup_buffers(Mesh(np.array(devices), ("ep",)), args.hidden * 4, args.tokens)
  backend = jmd.backends.get_backend(args.implementation).name
  print(f"{len(devices)} x {devices[0].device_kind} on axis 'ep'; "
        f"dispatcher {args.backend}, implementation {args.implementation} -> {backend} "
        f"({status})", flush=True)
  _, _, params, opt_state, train_step = build(args, devices)

  from tqdm import tqdm

  losses = []
  bar = tqdm(range(args.steps), disable=args.quiet, desc="train", dynamic_ncols=True)
  for step in bar:
    params, opt_state, loss = train_step(params, opt_state, jnp.int32(step))
    losses.append(float(loss))
    bar.set_postfix(loss=f"{losses[-1]:.4f}")
  if losses:
    print(f"loss: first {losses[0]:.4f}  last {losses[-1]:.4f}  "
          f"(uniform guess {np.log(args.vocab):.4f})", flush=True)
  return losses


if __name__ == "__main__":
  main()
