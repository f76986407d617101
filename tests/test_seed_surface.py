"""The seeds' module surfaces, name for name: imports from NeMo AutoModel map one to one."""

from __future__ import annotations

import pytest

import jax_moe_dispatch
from jax_moe_dispatch import fused_a2a, token_dispatcher

# The public names of NeMo AutoModel's modules (the PyTorch seeds):
# nemo_automodel.components.moe.megatron.fused_a2a and .token_dispatcher.
SEED_FUSED_A2A = {
    # Classes (torch.autograd.Function subclasses there).
    "FusedCombine", "FusedDispatch", "HybridEPCombine", "HybridEPDispatch", "UCCLFusedCombine",
    "UCCLFusedDispatch",
    # Functions.
    "free_buffer", "fused_combine", "fused_dispatch", "get_buffer", "get_hidden_bytes",
    "get_uccl_buffer", "hybrid_ep_combine", "hybrid_ep_dispatch", "init_hybrid_ep_buffer",
    "reset_hybrid_ep_buffer", "set_deepep_num_sms", "set_uccl_num_sms", "uccl_fused_combine",
    "uccl_fused_dispatch",
    # Data.
    "HAVE_DEEP_EP", "HAVE_HYBRIDEP", "HAVE_UCCL_EP",
}
SEED_TOKEN_DISPATCHER = {"MoEFlexTokenDispatcher", "TokenDispatcherConfig"}

# What the JAX modules add: the handles are data here (returned and passed back),
# and the HybridEP SM default has a setter of its own.
JAX_FUSED_A2A = {"DispatchHandle", "HybridEPHandle", "set_hybridep_num_sms"}
JAX_TOKEN_DISPATCHER = {"DispatchState", "apply_capacity", "permuted_rows"}


@pytest.mark.parametrize("module,seed,extra", [
    (fused_a2a, SEED_FUSED_A2A, JAX_FUSED_A2A),
    (token_dispatcher, SEED_TOKEN_DISPATCHER, JAX_TOKEN_DISPATCHER),
], ids=["fused_a2a", "token_dispatcher"])
def test_module_surface_is_the_seeds(module, seed, extra):
  exported = set(module.__all__)
  assert not seed - exported, f"seed names missing: {sorted(seed - exported)}"
  assert exported - seed == extra, f"names beyond the seed's: {sorted(exported - seed)}"
  for name in exported:
    assert hasattr(module, name), name
  # Every public class and function the module defines is part of its surface.
  defined = {n for n, v in vars(module).items()
             if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__}
  assert defined <= exported, f"defined but not exported: {sorted(defined - exported)}"

def test_top_level_exports_the_seed_names():
  for name in SEED_TOKEN_DISPATCHER:
    assert getattr(jax_moe_dispatch, name) is getattr(token_dispatcher, name)
  for name in ("fused_dispatch", "fused_combine", "hybrid_ep_dispatch", "hybrid_ep_combine",
               "get_buffer", "free_buffer", "init_hybrid_ep_buffer", "reset_hybrid_ep_buffer",
               "get_hidden_bytes", "get_uccl_buffer", "set_deepep_num_sms", "HAVE_DEEP_EP",
               "HAVE_HYBRIDEP", "HAVE_UCCL_EP"):
    assert getattr(jax_moe_dispatch, name) is getattr(fused_a2a, name), name


def test_function_classes_apply_the_ops():
  pairs = {"FusedDispatch": "fused_dispatch", "FusedCombine": "fused_combine",
           "HybridEPDispatch": "hybrid_ep_dispatch", "HybridEPCombine": "hybrid_ep_combine",
           "UCCLFusedDispatch": "uccl_fused_dispatch", "UCCLFusedCombine": "uccl_fused_combine"}
  for cls, fn in pairs.items():
    assert getattr(fused_a2a, cls).apply is getattr(fused_a2a, fn), cls


def test_have_flags_say_what_runs():
  # Both protocols run everywhere (the reference backend needs nothing); UCCL-EP does not exist.
  assert fused_a2a.HAVE_DEEP_EP is True and fused_a2a.HAVE_HYBRIDEP is True
  assert fused_a2a.HAVE_UCCL_EP is False


@pytest.mark.parametrize("name,args", [
    ("get_uccl_buffer", (None, 1024)),
    ("set_uccl_num_sms", (20,)),
    ("uccl_fused_dispatch", (None, None, None, 8, None)),
    ("uccl_fused_combine", (None, None, None)),
])
def test_uccl_names_raise_naming_the_fix(name, args):
  msg = rf"{name}: UCCL-EP is not available in this build.*Fix"
  with pytest.raises(NotImplementedError, match=msg):
    getattr(fused_a2a, name)(*args)
  if name.startswith("uccl_fused_"):
    cls = "UCCLFusedDispatch" if name.endswith("dispatch") else "UCCLFusedCombine"
    with pytest.raises(NotImplementedError, match="not available in this build"):
      getattr(fused_a2a, cls).apply(*args)
