"""TokenDispatcherConfig: the seed's defaults, JAX fields, validation, receive-buffer sizing."""

from __future__ import annotations

import dataclasses
import math

import pytest

from jax_moe_dispatch import TokenDispatcherConfig

SEED_DEFAULTS = dict(
    moe_enable_deepep=True,
    moe_permute_fusion=False,
    moe_expert_capacity_factor=None,
    moe_router_topk=2,
    moe_router_expert_pad_multiple=None,
    num_moe_experts=64,
    moe_router_dtype="fp32",
    moe_flex_dispatcher_backend="deepep",
    moe_deepep_num_sms=20,
    moe_hybridep_num_sms=24,
    moe_share_token_dispatcher=True,
    moe_deepep_async_dispatch=False,
)
JAX_DEFAULTS = dict(ep_axis_name="ep", max_recv_tokens=None, implementation="auto")


def test_defaults_equal_the_seed():
  cfg = TokenDispatcherConfig()
  for name, value in {**SEED_DEFAULTS, **JAX_DEFAULTS}.items():
    got = getattr(cfg, name)
    assert got == value and type(got) is type(value), f"{name}: {got!r} != {value!r}"
  names = [f.name for f in dataclasses.fields(TokenDispatcherConfig)]
  assert names[:12] == list(SEED_DEFAULTS), "the seed's twelve fields come first, in order"
  assert set(JAX_DEFAULTS) <= set(names)


def test_frozen_and_hashable():
  cfg = TokenDispatcherConfig()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.moe_router_topk = 4  # type: ignore[misc]
  assert hash(cfg) == hash(TokenDispatcherConfig())  # Usable as a static jit argument.


@pytest.mark.parametrize("kwargs", [
    dict(moe_flex_dispatcher_backend="hybridep"),
    dict(moe_flex_dispatcher_backend="uccl_ep"),
    dict(moe_router_dtype="fp64"),
    dict(moe_router_dtype=None),
    dict(implementation="reference"),
    dict(implementation="native"),
    dict(moe_expert_capacity_factor=1.5, max_recv_tokens=8),
    dict(moe_expert_capacity_factor=2),
    dict(moe_router_expert_pad_multiple=16),
    dict(moe_router_topk=64),
    dict(num_moe_experts=1, moe_router_topk=1),
    dict(ep_axis_name="expert"),
    dict(moe_enable_deepep=False, moe_permute_fusion=True),
])
def test_valid_values_accepted(kwargs):
  cfg = TokenDispatcherConfig(**kwargs)
  for name, value in kwargs.items():
    assert getattr(cfg, name) == value


INVALID = [
    ("moe_flex_dispatcher_backend", "nccl"),
    ("moe_flex_dispatcher_backend", "DeepEP"),
    ("implementation", "cuda"),
    ("moe_router_dtype", "bf16"),
    ("moe_router_dtype", "float32"),
    ("num_moe_experts", 0),
    ("num_moe_experts", -8),
    ("num_moe_experts", 8.0),
    ("num_moe_experts", True),
    ("moe_router_topk", 0),
    ("moe_router_topk", 2.5),
    ("moe_router_topk", True),
    ("moe_deepep_num_sms", 0),
    ("moe_deepep_num_sms", "20"),
    ("moe_hybridep_num_sms", -1),
    ("moe_router_expert_pad_multiple", 0),
    ("moe_router_expert_pad_multiple", 16.0),
    ("moe_expert_capacity_factor", 0.0),
    ("moe_expert_capacity_factor", -1.0),
    ("moe_expert_capacity_factor", "1.0"),
    ("moe_expert_capacity_factor", float("nan")),
    ("max_recv_tokens", 0),
    ("max_recv_tokens", 128.0),
    ("ep_axis_name", ""),
    ("ep_axis_name", 3),
    ("moe_enable_deepep", 1),
    ("moe_permute_fusion", "yes"),
    ("moe_share_token_dispatcher", None),
    ("moe_deepep_async_dispatch", 0),
]


@pytest.mark.parametrize("name,value", INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_value_raises_naming_the_field(name, value):
  with pytest.raises(ValueError, match=name):
    TokenDispatcherConfig(**{name: value})


def test_capacity_factor_inf_rejected_on_construction():
  with pytest.raises(ValueError, match="moe_expert_capacity_factor"):
    TokenDispatcherConfig(moe_expert_capacity_factor=float("inf"))


def test_topk_above_num_experts_raises():
  with pytest.raises(ValueError, match="moe_router_topk=9.*num_moe_experts=8"):
    TokenDispatcherConfig(num_moe_experts=8, moe_router_topk=9)


@pytest.mark.parametrize("T,topk,E,factor,ep", [
    (13, 2, 8, 1.0, 4), (64, 8, 256, 1.25, 8), (7, 1, 4, 0.5, 2), (1000, 2, 64, 3.0, 8),
])
def test_expert_capacity_and_recv_bound(T, topk, E, factor, ep):
  cfg = TokenDispatcherConfig(num_moe_experts=E, moe_router_topk=topk,
                              moe_expert_capacity_factor=factor)
  cap = math.ceil(T * topk / E * factor)
  assert cfg.expert_capacity(T) == cap
  assert cfg.recv_bound(T, ep) == ep * min(T, (E // ep) * cap)
  assert cfg.resolve_max_recv_tokens(T, ep) == ep * min(T, (E // ep) * cap)
  plain = TokenDispatcherConfig(num_moe_experts=E, moe_router_topk=topk)
  assert plain.expert_capacity(T) is None
  assert plain.recv_bound(T, ep) == ep * T
  assert plain.resolve_max_recv_tokens(T, ep) == ep * T


def test_resolve_max_recv_tokens():
  T, ep = 13, 4
  # At or above the bound: used as given.
  assert TokenDispatcherConfig(max_recv_tokens=52).resolve_max_recv_tokens(T, ep) == 52
  assert TokenDispatcherConfig(max_recv_tokens=100).resolve_max_recv_tokens(T, ep) == 100
  # Below the bound without a capacity factor: refused, naming the fix.
  cfg = TokenDispatcherConfig(max_recv_tokens=51)
  with pytest.raises(ValueError, match=r"max_recv_tokens=51.*52") as info:
    cfg.resolve_max_recv_tokens(T, ep)
  msg = str(info.value)
  assert "Fix" in msg and "moe_expert_capacity_factor" in msg and "max_recv_tokens >= 52" in msg
  # Below the bound with a capacity factor: explicit drops, allowed.
  cfg = TokenDispatcherConfig(max_recv_tokens=10, moe_expert_capacity_factor=1.0)
  assert cfg.resolve_max_recv_tokens(T, ep) == 10
