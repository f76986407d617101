"""TopKRouter, GroupedExperts, MoELayer: numpy references and training gradients vs a dense model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mesh
from flax import nnx
from jax.sharding import PartitionSpec as P

from jax_moe_dispatch import TokenDispatcherConfig
from jax_moe_dispatch.nn.layers import (ExpertParam, GroupedExperts, MoELayer, TopKRouter,
                                        partition_specs, reduce_gradients)

EP = 4


def test_router_topk_and_aux_loss():
  router = TopKRouter(16, 8, 3, rngs=nnx.Rngs(0), aux_loss_coeff=0.1)
  x = jax.random.normal(jax.random.key(1), (2, 10, 16))
  idx, probs, aux = router(x)
  assert idx.shape == (20, 3) and idx.dtype == jnp.int32 and probs.dtype == jnp.float32
  x64 = np.asarray(x, np.float64).reshape(20, 16)
  logits = x64 @ np.asarray(router.weight.get_value(), np.float64)
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  want_idx = np.argsort(-p, axis=1)[:, :3]
  np.testing.assert_array_equal(np.sort(np.asarray(idx), 1), np.sort(want_idx, 1))
  np.testing.assert_allclose(np.asarray(probs), np.take_along_axis(p, np.asarray(idx), 1),
                             rtol=1e-5)
  share = np.bincount(want_idx.ravel(), minlength=8) / want_idx.size
  np.testing.assert_allclose(float(aux), 0.1 * 8 * np.sum(share * p.mean(0)), rtol=1e-5)


def test_router_fp64_needs_x64():
  router = TopKRouter(4, 4, 2, rngs=nnx.Rngs(0), router_dtype="fp64")
  if not jax.config.jax_enable_x64:
    with pytest.raises(ValueError, match="jax_enable_x64"):
      router(jnp.ones((3, 4)))


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_experts_groups_and_padding_rows(activation):
  experts = GroupedExperts(3, 8, 16, rngs=nnx.Rngs(2), activation=activation)
  tpe = jnp.array([4, 0, 5], jnp.int32)
  x = jax.random.normal(jax.random.key(3), (12, 8))  # Rows 9..11 are past the groups: garbage.
  probs = jax.random.uniform(jax.random.key(4), (12,), minval=0.5)
  y = np.asarray(experts(x, tpe, probs))
  assert not y[9:].any()
  group = np.repeat(np.arange(3), np.asarray(tpe))
  w = {k: np.asarray(getattr(experts, k).get_value(), np.float64)
       for k in ("w_up", "w_gate_up", "w_down") if hasattr(experts, k)}
  if activation == "swiglu":  # Gate columns first, then up.
    w["w_gate"], w["w_up"] = np.split(w.pop("w_gate_up"), 2, axis=-1)
  for r in range(9):
    e, xr = group[r], np.asarray(x[r], np.float64)
    up = xr @ w["w_up"][e]
    if activation == "swiglu":
      g = xr @ w["w_gate"][e]
      h = g / (1 + np.exp(-g)) * up
    else:
      h = 0.5 * up * (1 + np.tanh(np.sqrt(2 / np.pi) * (up + 0.044715 * up**3)))
    np.testing.assert_allclose(y[r], float(probs[r]) * (h @ w["w_down"][e]), rtol=1e-4,
                               atol=1e-5)


def test_grouped_experts_unsharded_error():
  experts = GroupedExperts(8, 4, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="shard_map"):
    experts(jnp.ones((4, 4)), jnp.array([2, 2], jnp.int32))


def test_partition_specs():
  cfg = TokenDispatcherConfig(num_moe_experts=8, implementation="reference")
  _, state = nnx.split(MoELayer(cfg, 8, 8, rngs=nnx.Rngs(0)))
  specs = partition_specs(state)
  assert specs["router"]["weight"] == P()
  assert all(specs["experts"][k] == P("ep") for k in ("w_gate_up", "w_down"))
  assert isinstance(state["experts"]["w_gate_up"], ExpertParam)


def test_old_import_path_gives_the_same_layers():
  import jax_moe_dispatch.layers as old_path
  from jax_moe_dispatch.nn import layers
  assert old_path.__all__ == layers.__all__
  for name in layers.__all__:
    assert getattr(old_path, name) is getattr(layers, name), name


def _dense_layer(state, x, topk):
  """The same MoE layer without dispatch: every token computes its experts directly."""
  probs_all = jax.nn.softmax(x @ state["router"]["weight"].get_value(), axis=-1)
  probs, idx = jax.lax.top_k(probs_all, topk)
  e = state["experts"]
  gate, up = jnp.split(jnp.einsum("nh,nkhf->nkf", x, e["w_gate_up"].get_value()[idx]), 2, axis=-1)
  out = jnp.einsum("nkf,nkfh->nkh", jax.nn.silu(gate) * up, e["w_down"].get_value()[idx])
  return jnp.sum(out * probs[..., None], axis=1)


@pytest.mark.parametrize("backend", ["deepep", "hybridep"])
def test_training_gradients_match_dense_model(backend):
  """shard_map grads (check_vma=False) + reduce_gradients == grads of the global mean loss."""
  num_tokens, hidden = 8, 8
  cfg = TokenDispatcherConfig(num_moe_experts=8, moe_router_topk=2, implementation="reference",
                              moe_flex_dispatcher_backend=backend)
  graphdef, state = nnx.split(MoELayer(cfg, hidden, 16, rngs=nnx.Rngs(5)))
  specs = partition_specs(state)
  x = jax.random.normal(jax.random.key(6), (EP * num_tokens, hidden))
  target = jax.random.normal(jax.random.key(7), x.shape)

  def local(state, x, target):
    def loss(st):
      y, _ = nnx.merge(graphdef, st)(x)
      return jnp.mean((y - target) ** 2)
    value, grads = jax.value_and_grad(loss)(state)
    return reduce_gradients(grads, specs), jax.lax.pmean(value, "ep")

  grads, value = jax.jit(jax.shard_map(local, mesh=mesh(EP), in_specs=(specs, P("ep"), P("ep")),
                                       out_specs=(specs, P()), check_vma=False))(state, x, target)
  dense_loss = lambda st: jnp.mean((_dense_layer(st, x, 2) - target) ** 2)
  want_value, want = jax.value_and_grad(dense_loss)(state)
  np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want)):
    assert float(jnp.abs(w).max()) > 0
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6,
                               err_msg=jax.tree_util.keystr(path))


def test_moe_layer_3d_input_and_aux():
  cfg = TokenDispatcherConfig(num_moe_experts=8, moe_router_topk=2, implementation="reference")
  graphdef, state = nnx.split(MoELayer(cfg, 8, 8, rngs=nnx.Rngs(1), aux_loss_coeff=0.01))
  specs = partition_specs(state)

  def body(state, x):
    y, aux = nnx.merge(graphdef, state)(x)
    return y, aux[None]

  x = jax.random.normal(jax.random.key(2), (EP * 2, 5, 8))
  y, aux = jax.jit(jax.shard_map(body, mesh=mesh(EP), in_specs=(specs, P("ep")),
                                 out_specs=P("ep")))(state, x)
  assert y.shape == x.shape and float(jnp.abs(y).sum()) > 0
  assert aux.shape == (EP,) and (np.asarray(aux) > 0).all()


@pytest.mark.parametrize("backend", ["deepep", "hybridep"])
def test_moe_layer_padding_rows_never_reach_outputs_or_gradients(backend):
  """MoELayer's experts skip the rows of the dispatcher's worst-case buffer past its real
  rows (fill_padding=False). Under the Pallas interpreter, which fills memory a kernel never
  writes with NaN, those rows hold NaN; the layer's output and gradients must still be
  finite and equal those of the same layer with zero-filled padding. One rank (the
  interpreter does not run on several devices at once); groups padded to 16 rows leave
  rows past the last group."""
  num_tokens, hidden, ffn = 16, 128, 64  # The kernels' tiles: multiples of 64 and 128.
  cfg = TokenDispatcherConfig(num_moe_experts=8, moe_router_topk=2, implementation="reference",
                              moe_flex_dispatcher_backend=backend,
                              moe_router_expert_pad_multiple=16)
  layer = MoELayer(cfg, hidden, ffn, rngs=nnx.Rngs(5), dtype=jnp.bfloat16,
                   gemm_implementation="interpret")
  assert layer.experts.fill_padding is False
  graphdef, state = nnx.split(layer)
  specs = partition_specs(state)
  x = jax.random.normal(jax.random.key(6), (num_tokens, hidden))
  target = jax.random.normal(jax.random.key(7), x.shape)

  def run(fill_padding):
    def local(state, x, target):
      def loss(st):
        model = nnx.merge(graphdef, st)
        model.experts.fill_padding = fill_padding
        y, _ = model(x)
        return jnp.mean((y.astype(jnp.float32) - target) ** 2), y

      (_, y), grads = jax.value_and_grad(loss, has_aux=True)(state)
      return grads, y

    return jax.jit(jax.shard_map(local, mesh=mesh(1), in_specs=(specs, P("ep"), P("ep")),
                                 out_specs=(specs, P("ep")), check_vma=False))(state, x, target)

  (grads, y), (want_grads, want_y) = run(False), run(True)
  y32 = np.asarray(y.astype(jnp.float32))
  assert np.isfinite(y32).all() and np.abs(y32).max() > 0
  np.testing.assert_array_equal(y32, np.asarray(want_y.astype(jnp.float32)))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
    assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)
    assert float(jnp.abs(w).max()) > 0, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))
