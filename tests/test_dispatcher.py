"""MoEFlexTokenDispatcher: both backends agree, a float64 oracle, capacity, padding, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh
from flax import nnx
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

from jax_moe_dispatch import TokenDispatcherConfig
from jax_moe_dispatch.token_dispatcher import DispatchState, MoEFlexTokenDispatcher, apply_capacity
from jax_moe_dispatch.nn.layers import MoELayer, partition_specs

EP = 4


def _config(**kw):
  base = dict(num_moe_experts=8, moe_router_topk=2, implementation="reference")
  base.update(kw)
  return TokenDispatcherConfig(**base)


def _routing(key, num_tokens, num_experts, topk):
  """Distinct random experts per token, positive random probabilities."""
  k1, k2 = jax.random.split(key)
  scores = jax.random.uniform(k1, (num_tokens, num_experts))
  idx = jnp.argsort(scores, axis=1)[:, :topk].astype(jnp.int32)
  probs = jax.random.uniform(k2, (num_tokens, topk), minval=0.1, maxval=1.0)
  return idx, probs


def _expert_fn(x, tokens_per_expert, probs):
  """A row-wise stand-in for experts that depends on the expert id (via the group)."""
  group = jnp.searchsorted(jnp.cumsum(tokens_per_expert), jnp.arange(x.shape[0]), side="right")
  return jnp.tanh(x) * (1.0 + group[:, None].astype(x.dtype)) * probs[:, None]


def _pipeline(cfg, dense=False):
  def body(x, idx, probs):
    d = MoEFlexTokenDispatcher(cfg)
    if dense:  # Megatron-style [T, E] probabilities with a routing map.
      rows = jnp.arange(x.shape[0])[:, None]
      dense_probs = jnp.zeros((x.shape[0], cfg.num_moe_experts)).at[rows, idx].set(probs)
      px, tpe, pp, state = d.token_permutation(x, x.shape[0], dense_probs)
    else:
      px, tpe, pp, state = d.token_permutation2(x, token_probs=probs, token_indices=idx)
    y = d.token_unpermutation(_expert_fn(px, tpe, pp), state)
    # Row order of the indices is not part of the result (dense routing sorts by probability).
    return px, tpe[None], pp, y, jnp.sort(state.token_indices, axis=1)

  return jax.jit(jax.shard_map(body, mesh=mesh(EP), in_specs=P("ep"), out_specs=P("ep")))


def _data(seed, num_tokens=12, hidden=16, num_experts=8, topk=2):
  kx, kr = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (EP * num_tokens, hidden))
  idx, probs = _routing(kr, EP * num_tokens, num_experts, topk)
  return x, idx, probs


@pytest.mark.parametrize("pad,capacity,dense", [(None, None, True), (3, 0.7, False)])
def test_backends_identical(pad, capacity, dense):
  x, idx, probs = _data(seed=11 + (pad or 0))
  outs = {}
  for backend in ("deepep", "hybridep"):
    cfg = _config(moe_flex_dispatcher_backend=backend, moe_router_expert_pad_multiple=pad,
                  moe_expert_capacity_factor=capacity)
    outs[backend] = _pipeline(cfg)(x, idx, probs)
    if dense:  # Dense [T, E] routing through token_permutation gives the same.
      outs[backend + "-dense"] = _pipeline(cfg, dense=True)(x, idx, probs)
  ref = outs["deepep"]
  assert float(jnp.abs(ref[0]).sum()) > 0 and int(ref[1].sum()) > 0
  for name, out in outs.items():
    for a, b in zip(ref, out):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _np_layer(x, idx, probs, w, activation):
  """float64 forward of experts for given routing: y_t = sum_k p_tk * expert_{e_tk}(x_t)."""
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(idx.shape[1]):
      e = idx[t, k]
      if e < 0:
        continue
      up = x[t] @ w["w_up"][e]
      if activation == "swiglu":
        g = x[t] @ w["w_gate"][e]
        h = g / (1 + np.exp(-g)) * up
      else:
        h = 0.5 * up * (1 + np.tanh(np.sqrt(2 / np.pi) * (up + 0.044715 * up**3)))
      out[t] += probs[t, k] * (h @ w["w_down"][e])
  return out


def _np_capacity(idx, num_experts, capacity):
  kept = idx.copy()
  if capacity is None:
    return kept
  seen = np.zeros(num_experts, np.int64)
  for t in range(idx.shape[0]):
    for k in range(idx.shape[1]):
      if idx[t, k] >= 0 and seen[idx[t, k]] >= capacity:
        kept[t, k] = -1
    for e in set(idx[t][idx[t] >= 0].tolist()):
      seen[e] += 1
  return kept


def _np_router(x, w, topk):
  logits = x @ w
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  order = np.argsort(-p, axis=1, kind="stable")
  srt = np.take_along_axis(p, order, 1)
  assert (srt[:, topk - 1] - srt[:, topk]).min() > 1e-5, "near tie: pick another seed"
  idx = order[:, :topk]
  return idx, np.take_along_axis(p, idx, 1)


def _layer_fn(layer):
  graphdef, state = nnx.split(layer)
  specs = partition_specs(state)

  def body(state, x):
    y, _ = nnx.merge(graphdef, state)(x)
    return y

  return jax.jit(jax.shard_map(body, mesh=mesh(EP), in_specs=(specs, P("ep")),
                               out_specs=P("ep"))), state


@pytest.mark.parametrize("backend", ["deepep", "hybridep"])
@pytest.mark.parametrize("activation,capacity,pad", [("swiglu", None, None), ("gelu", 0.75, 2)])
def test_layer_matches_float64_oracle(backend, activation, capacity, pad):
  num_tokens, hidden, ffn = 10, 8, 12
  cfg = _config(moe_flex_dispatcher_backend=backend, moe_expert_capacity_factor=capacity,
                moe_router_expert_pad_multiple=pad)
  layer = MoELayer(cfg, hidden, ffn, rngs=nnx.Rngs(3), activation=activation)
  fn, state = _layer_fn(layer)
  x = jax.random.normal(jax.random.key(4), (EP * num_tokens, hidden))
  y = np.asarray(fn(state, x))

  x64 = np.asarray(x, np.float64)
  w = {k: np.asarray(getattr(layer.experts, k).get_value(), np.float64)
       for k in ("w_up", "w_gate_up", "w_down") if hasattr(layer.experts, k)}
  if "w_gate_up" in w:  # SwiGLU: gate columns first, then up.
    w["w_gate"], w["w_up"] = np.split(w.pop("w_gate_up"), 2, axis=-1)
  want = np.zeros_like(x64)
  for r in range(EP):
    xr = x64[r * num_tokens:(r + 1) * num_tokens]
    idx, p = _np_router(xr, np.asarray(layer.router.weight.get_value(), np.float64), cfg.moe_router_topk)
    idx = _np_capacity(idx, cfg.num_moe_experts, cfg.expert_capacity(num_tokens))
    want[r * num_tokens:(r + 1) * num_tokens] = _np_layer(xr, idx, p, w, activation)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_capacity_drops_exactly_the_documented_assignments():
  num_tokens, num_experts = 16, 8  # top-2
  cfg = _config(moe_expert_capacity_factor=0.5)  # capacity = ceil(16 * 2 / 8 * 0.5) = 2
  capacity = cfg.expert_capacity(num_tokens)
  assert capacity == 2
  x, idx, probs = _data(seed=5, num_tokens=num_tokens)
  px, tpe, pp, y, kept = _pipeline(cfg)(x, idx, probs)
  want = np.concatenate([
      _np_capacity(np.asarray(idx[r * num_tokens:(r + 1) * num_tokens]), num_experts, capacity)
      for r in range(EP)])
  assert (want == -1).sum() > 0, "test data should overflow some expert"
  np.testing.assert_array_equal(np.asarray(kept), np.sort(want, axis=1))
  # Each local expert gets at most capacity rows from each source rank.
  assert int(tpe.max()) <= capacity * EP
  # Output equals the pipeline run on the pre-masked routing without capacity.
  masked_probs = jnp.where(want >= 0, probs, 0.0)
  _, _, _, y_ref, _ = _pipeline(_config())(x, jnp.asarray(want), masked_probs)
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)
  # The permuted buffer shrinks to L * capacity * ep.
  assert px.shape[0] == EP * (num_experts // EP) * capacity * EP


def test_apply_capacity_matches_numpy():
  idx, probs = _routing(jax.random.key(8), 40, 6, 3)
  idx = idx.at[3, 1].set(-1)
  got_idx, got_probs = jax.jit(apply_capacity, static_argnums=(2, 3))(idx, probs, 6, 4)
  want = _np_capacity(np.asarray(idx), 6, 4)
  np.testing.assert_array_equal(np.asarray(got_idx), want)
  np.testing.assert_array_equal(np.asarray(got_probs), np.where(want >= 0, probs, 0))


@pytest.mark.parametrize("backend", ["hybridep"])  # deepep is identical (test_backends_identical)
def test_pad_multiple(backend):
  x, idx, probs = _data(seed=21)
  pad = 4
  px, tpe, pp, y, _ = _pipeline(_config(moe_flex_dispatcher_backend=backend,
                                        moe_router_expert_pad_multiple=pad))(x, idx, probs)
  px0, tpe0, pp0, y0, _ = _pipeline(_config(moe_flex_dispatcher_backend=backend))(x, idx, probs)
  tpe, tpe0 = np.asarray(tpe), np.asarray(tpe0)
  assert (tpe % pad == 0).all() and (tpe >= tpe0).all() and (tpe - tpe0 < pad).all()
  rows = px.shape[0] // EP
  for r in range(EP):  # Real rows keep their order; padding rows are zero with prob 0.
    px_r, pp_r, px0_r = (np.asarray(a)[r * n:(r + 1) * n]
                         for a, n in ((px, rows), (pp, rows), (px0, px0.shape[0] // EP)))
    start = start0 = 0
    for e in range(tpe.shape[1]):
      n, n0 = tpe[r, e], tpe0[r, e]
      np.testing.assert_array_equal(px_r[start:start + n0], px0_r[start0:start0 + n0])
      assert not px_r[start + n0:start + n].any() and not pp_r[start + n0:start + n].any()
      assert (pp_r[start:start + n0] > 0).all()
      start, start0 = start + n, start0 + n0
    assert not px_r[start:].any()
  np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=1e-6, atol=1e-6)


def test_hidden_3d_roundtrip_and_stages():
  cfg = _config(moe_flex_dispatcher_backend="deepep")

  def body(x, idx, probs):
    d = MoEFlexTokenDispatcher(cfg)
    h, tp, state = d.dispatch_preprocess2(x, None, probs, idx)
    assert isinstance(state, DispatchState) and h.shape == (x.shape[0] * x.shape[1], x.shape[2])
    h, dp, state = d.dispatch_all_to_all(h, state, tp)
    assert dp.shape == (state.max_recv_tokens, cfg.moe_router_topk)
    px, tpe, pp, state = d.dispatch_postprocess(h, state)
    h = d.combine_preprocess(px * pp[:, None], state)
    h = d.combine_all_to_all(h, state)
    return d.combine_postprocess(h, state)

  x, idx, probs = _data(seed=2)
  x3 = x.reshape(EP * 3, 4, -1)
  y = jax.jit(jax.shard_map(body, mesh=mesh(EP), in_specs=P("ep"), out_specs=P("ep")))(
      x3, idx, probs)
  assert y.shape == x3.shape
  # Identity experts: every token comes back times the sum of its probabilities.
  np.testing.assert_allclose(np.asarray(y).reshape(x.shape),
                             np.asarray(x * probs.sum(1, keepdims=True)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["deepep", "hybridep"])
def test_check_grads_through_layer(backend):
  num_tokens, hidden, ffn = 6, 8, 8
  cfg = _config(moe_flex_dispatcher_backend=backend, moe_router_expert_pad_multiple=2)
  layer = MoELayer(cfg, hidden, ffn, rngs=nnx.Rngs(7))
  graphdef, state = nnx.split(layer)
  specs = partition_specs(state)
  x = jax.random.normal(jax.random.key(9), (EP * num_tokens, hidden))
  target = jax.random.normal(jax.random.key(10), x.shape)

  def body(state, x, target):
    y, _ = nnx.merge(graphdef, state)(x)
    return jnp.sum(y * target, keepdims=True)

  sharded = jax.jit(jax.shard_map(body, mesh=mesh(EP), in_specs=(specs, P("ep"), P("ep")),
                                  out_specs=P("ep")))
  names = ("router", "w_gate_up", "w_down")
  leaves = (state["router"]["weight"].get_value(), state["experts"]["w_gate_up"].get_value(),
            state["experts"]["w_down"].get_value())

  def f(x, *ws):
    st = jax.tree.map(lambda a: a, state)
    st["router"]["weight"].set_value(ws[0])
    for name, w in zip(names[1:], ws[1:]):
      st["experts"][name].set_value(w)
    return sharded(st, x, target).sum()

  check_grads(f, (x, *leaves), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)
  grads = jax.grad(f, argnums=tuple(range(1 + len(leaves))))(x, *leaves)
  assert all(float(jnp.abs(g).sum()) > 0 for g in grads)


def test_uccl_ep_raises():
  with pytest.raises(NotImplementedError, match="deepep"):
    MoEFlexTokenDispatcher(_config(moe_flex_dispatcher_backend="uccl_ep"))


def test_unbound_axis_and_bad_expert_count():
  d = MoEFlexTokenDispatcher(_config())
  x, idx, probs = _data(seed=1)
  with pytest.raises(ValueError, match="shard_map"):
    d.token_permutation2(x, token_probs=probs, token_indices=idx)
  d = MoEFlexTokenDispatcher(_config(num_moe_experts=6))
  f = jax.shard_map(lambda x, i, p: d.token_permutation2(x, None, p, i)[0], mesh=mesh(EP),
                    in_specs=P("ep"), out_specs=P("ep"))
  with pytest.raises(ValueError, match="divisible"):
    f(x, idx % 6, probs)
  with pytest.raises(TypeError, match="DispatchState"):
    d.combine_all_to_all(x, None)
