"""What shapes a trace reaches the ops as arguments; process state is only looked up.

The SM budget and the implementation come from ``TokenDispatcherConfig`` (or
an op's arguments) into a static :class:`~jax_moe_dispatch.core.transport.Transport`;
``set_*_num_sms`` only set defaults read when a config is built or an op is
called; ``"auto"`` is decided by platform and build, and a missing buffer is an
error naming ``get_buffer``. The hybrid backward pass has no dense ``[M, E]``.
"""

from __future__ import annotations

import logging

import _harness as H  # Sets XLA_FLAGS before jax is imported.
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe_dispatch as jmd
from jax_moe_dispatch import backends
from jax_moe_dispatch.backends import buffer, native
from jax_moe_dispatch.core import transport
from jax_moe_dispatch.token_dispatcher import MoEFlexTokenDispatcher

EP, T, HID, K, E = 2, 5, 4, 2, 8


@pytest.fixture
def sm_defaults():
  """Restore the process SM defaults after a test changes them."""
  saved = dict(backends._NUM_SMS)
  yield
  backends._NUM_SMS.update(saved)


@pytest.fixture
def seen_transports(monkeypatch):
  """Every Transport whose backend is looked up while tracing."""
  seen = []
  lookup = transport.Transport.backend

  def record(self):
    seen.append(self)
    return lookup(self)

  monkeypatch.setattr(transport.Transport, "backend", record)
  return seen


def routing_inputs(seed=0):
  rng = np.random.default_rng(seed)
  idx = np.stack([np.stack([rng.permutation(E)[:K] for _ in range(T)]) for _ in range(EP)])
  probs = rng.uniform(0.1, 1, size=idx.shape).astype(np.float32)
  x = H.rand(rng, (EP, T, HID), np.float32)
  return x, idx.astype(np.int32), probs


def trace_dispatcher(config):
  def body(x, idx, probs):
    d = MoEFlexTokenDispatcher(config)
    px, tpe, pp, state = d.token_permutation2(x, token_probs=probs, token_indices=idx)
    return d.token_unpermutation(px * pp[:, None], state)

  fn = H.ep_map(body, EP)
  args = routing_inputs()
  jax.eval_shape(lambda *a: jax.grad(lambda x: fn(x, *a[1:]).sum())(a[0]), *args)


@pytest.mark.parametrize("backend,field", [("deepep", "moe_deepep_num_sms"),
                                           ("hybridep", "moe_hybridep_num_sms")])
def test_dispatcher_passes_its_config_to_every_op(seen_transports, sm_defaults, backend, field):
  config = jmd.TokenDispatcherConfig(num_moe_experts=E, moe_router_topk=K,
                                     moe_flex_dispatcher_backend=backend,
                                     implementation="reference", **{field: 7})
  jmd.set_deepep_num_sms(31)  # Process defaults set later do not reach this config.
  jmd.set_hybridep_num_sms(33)
  trace_dispatcher(config)
  # Forward dispatch and combine, and both backward passes.
  assert len(seen_transports) >= 4
  assert set(seen_transports) == {transport.Transport("ep", "reference", 7)}


def test_set_num_sms_sets_the_defaults_configs_and_ops_pick_up(seen_transports, sm_defaults):
  jmd.set_deepep_num_sms(12)
  jmd.set_hybridep_num_sms(14)
  config = jmd.TokenDispatcherConfig()
  assert (config.moe_deepep_num_sms, config.moe_hybridep_num_sms) == (12, 14)

  def ops(x, idx, probs):
    recv_x, *_, handle = jmd.fused_dispatch(x, idx, probs, E, "ep", implementation="reference")
    return jmd.fused_combine(recv_x, handle, "ep", implementation="reference", num_sms=5)

  jax.eval_shape(H.ep_map(ops, EP), *routing_inputs())
  assert [t.num_sms for t in seen_transports] == [12, 5]


def test_changing_a_default_after_it_was_read_warns(sm_defaults, caplog):
  jmd.TokenDispatcherConfig()  # Reads both defaults.
  with caplog.at_level(logging.WARNING, logger="jax_moe_dispatch"):
    jmd.set_deepep_num_sms(backends.default_num_sms("deepep"))  # Same value: nothing to say.
    assert not caplog.records
    jmd.set_deepep_num_sms(backends.default_num_sms("deepep") + 1)
  assert "keep" in caplog.text and "num_sms=" in caplog.text


@pytest.mark.parametrize("kw,match", [
    (dict(num_sms=0), r"num_sms must be a positive int"),
    (dict(num_sms=True), r"num_sms must be a positive int"),
    (dict(implementation="cuda"), r"implementation='cuda' is not one of"),
])
def test_op_arguments_checked(kw, match):
  def f(x, idx, probs):
    return jmd.fused_dispatch(x, idx, probs, E, "ep", **kw)[0]

  with pytest.raises(ValueError, match=match):
    jax.eval_shape(H.ep_map(f, EP), *routing_inputs())


def test_auto_is_reference_on_cpu():
  assert jax.default_backend() == "cpu"
  assert backends.get_backend("auto").name == "reference"
  assert backends.get_backend(None).name == "reference"


def test_native_on_cpu_fails_naming_the_reason():
  def f(x, idx, probs):
    return jmd.fused_dispatch(x, idx, probs, E, "ep", implementation="native")[0]

  with pytest.raises(RuntimeError, match=r"implementation='native'.*unavailable.*Fix"):
    jax.eval_shape(H.ep_map(f, EP), *routing_inputs())


def test_auto_with_native_kernels_but_no_buffer_is_an_error(monkeypatch):
  """The buffer never switches backends: where auto means native, a missing buffer is an error."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(native, "native_available", lambda: True)
  assert backends.get_backend("auto", num_sms=9).name == "native"
  assert not buffer.has_buffer()
  with pytest.raises(RuntimeError, match=r"no native buffers.*Fix: call .*get_buffer"):
    transport.Transport("ep", "auto", 9).backend()


def test_auto_on_gpu_without_extension_is_reference(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(native, "native_available", lambda: False)
  assert backends.get_backend("auto").name == "reference"


def all_shapes(closed_jaxpr) -> set[tuple[int, ...]]:
  """Shapes of every value a jaxpr computes, sub-jaxprs (shard_map, custom_vjp, ...) included."""
  shapes = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(getattr(sub, "jaxpr", None), "eqns"):
            walk(sub.jaxpr)

  walk(closed_jaxpr.jaxpr)
  return shapes


def test_hybrid_backward_has_no_dense_expert_columns():
  """Probability gradients go back as [M, L] rows, never as [M, E] (or [M, R, L]) blocks."""
  L, M = 3, 11
  num_experts = EP * L

  def loss(x, routing_map, probs):
    px, pp, _, _, handle = jmd.hybrid_ep_dispatch(x, routing_map, probs, L, "ep", topk=K,
                                                  max_recv_tokens=M, implementation="reference")
    return jmd.hybrid_ep_combine(px * pp[:, None], handle, "ep", implementation="reference")

  fn = H.ep_map(loss, EP)
  rng = np.random.default_rng(3)
  routing_map = rng.random((EP, T, num_experts)) < 0.3
  probs = rng.uniform(0.1, 1, size=routing_map.shape).astype(np.float32)
  x = H.rand(rng, (EP, T, HID), np.float32)
  grad = jax.grad(lambda x, p: fn(x, routing_map, p).sum(), argnums=(0, 1))
  shapes = all_shapes(jax.make_jaxpr(grad)(x, probs))
  assert (M, L) in shapes  # The per-rank probability gradients...
  assert (M, num_experts) not in shapes and (M, EP, L) not in shapes  # ...never expanded.
  gx, gp = grad(x, probs)
  assert np.isfinite(np.asarray(gp)).all() and (np.asarray(gp)[~routing_map] == 0).all()
  assert jnp.abs(gx).sum() > 0
