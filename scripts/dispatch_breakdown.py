#!/usr/bin/env python
"""Where the native dispatch's time goes: the whole op, then smaller and smaller parts.

    python scripts/dispatch_breakdown.py [--tokens 4096 --hidden 7168 --experts 256 --topk 8]

Every GPU on one "ep" axis, the benchmark's routing (top-K of scores |randn| + 1).
Each line times one function per rank with the benchmark's harness
(jax_moe_dispatch.bench.timing.device_time: --iters calls chained in one jitted
fori_loop, median of 5 runs):

  fused_dispatch          the public op (routing preprocessing, kernels, layout, counts)
  backend.dispatch        NativeBackend.dispatch with the payloads prepared outside
  backend.dispatch (rows) the same without the per-destination metadata (kernels + mask)
  preprocessing only      the routing preprocessing alone (what fused_dispatch adds before)
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_moe_dispatch as jmd
from jax_moe_dispatch.backends import buffer, native
from jax_moe_dispatch.bench import timing


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--hidden", type=int, default=7168)
  ap.add_argument("--experts", type=int, default=256)
  ap.add_argument("--topk", type=int, default=8)
  ap.add_argument("--num-sms", type=int, default=24)
  ap.add_argument("--iters", type=int, default=20)
  a = ap.parse_args()
  devices = jax.devices("gpu")
  ep, T, H, E, K = len(devices), a.tokens, a.hidden, a.experts, a.topk
  mesh = Mesh(np.array(devices), ("ep",))
  buffer.get_buffer(mesh, H * 2)
  rng = np.random.default_rng(0)
  scores = np.abs(rng.standard_normal((ep * T, E), dtype=np.float32)) + 1
  idx = np.argpartition(-scores, K - 1, axis=1)[:, :K].astype(np.int32)
  probs = np.full(idx.shape, 1.0 / K, np.float32)
  shard = NamedSharding(mesh, P("ep"))
  x = jax.device_put(rng.standard_normal((ep * T, H)).astype(jnp.bfloat16), shard)
  idx_d, probs_d = jax.device_put(idx, shard), jax.device_put(probs, shard)
  L = E // ep
  backend = native.NativeBackend(a.num_sms)

  def prep(idx, probs):
    me = jax.lax.axis_index("ep")
    owner = jnp.where(idx >= 0, idx // L, -1)
    on_rank = owner[:, None, :] == jnp.arange(ep)[None, :, None]
    local_idx = jnp.where(on_rank, idx[:, None, :] - jnp.arange(ep)[None, :, None] * L + 1, 0)
    local_probs = jnp.where(on_rank, probs[:, None, :], 0.0)
    del me
    return on_rank.any(-1), local_idx.astype(jnp.int32), local_probs

  def f_public(x, idx, probs):
    return jmd.fused_dispatch(x, idx, probs, E, "ep", implementation="native", num_sms=a.num_sms)[0]

  def f_backend(x, idx, probs):
    mask, li, lp = prep(idx, probs)
    return backend.dispatch(mask, [x], [li, lp], axis_name="ep", max_recv=ep * T)[0][0]

  def f_rows(x, idx, probs):
    mask, _, _ = prep(idx, probs)
    return backend.dispatch(mask, [x], [], axis_name="ep", max_recv=ep * T)[0][0]

  def f_prep_only(x, idx, probs):
    mask, li, lp = prep(idx, probs)
    return (mask.sum() + li.sum() + lp.sum()).astype(x.dtype).reshape(1, 1)

  wrap = functools.partial(jax.shard_map, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"), check_vma=False)
  print(f"ep={ep} T={T} H={H} E={E} K={K} num_sms={a.num_sms}; us per call (median of 5)")
  for name, fn in [("fused_dispatch", f_public), ("backend.dispatch", f_backend),
                   ("backend.dispatch (rows)", f_rows), ("preprocessing only", f_prep_only)]:
    t = timing.device_time(fn, (x, idx_d, probs_d), iters=a.iters, reps=5, wrap=wrap)
    print(f"  {name:26s} {t.median_s * 1e6:8.1f}")


if __name__ == "__main__":
  main()
