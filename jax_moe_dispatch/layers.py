"""Compatibility alias of :mod:`jax_moe_dispatch.nn.layers`, where the MoE layers live."""

from jax_moe_dispatch.nn.layers import *  # noqa: F401,F403
from jax_moe_dispatch.nn.layers import __all__  # noqa: F401
