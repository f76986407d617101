"""jax_moe_dispatch: fused MoE token dispatch and combine for JAX (DeepEP and HybridEP protocols).

The seed's modules map one to one: :mod:`jax_moe_dispatch.fused_a2a` (ops and
buffer lifecycle) and :mod:`jax_moe_dispatch.token_dispatcher` (the flex token
dispatcher and its config); their main names are exported here too.
"""

from jax_moe_dispatch.core.fp8 import dequantize_fp8, quantize_fp8
from jax_moe_dispatch.fused_a2a import (
    HAVE_DEEP_EP,
    HAVE_HYBRIDEP,
    HAVE_UCCL_EP,
    DispatchHandle,
    HybridEPHandle,
    free_buffer,
    fused_combine,
    fused_dispatch,
    get_buffer,
    get_hidden_bytes,
    get_uccl_buffer,
    hybrid_ep_combine,
    hybrid_ep_dispatch,
    init_hybrid_ep_buffer,
    reset_hybrid_ep_buffer,
    set_deepep_num_sms,
    set_hybridep_num_sms,
)
from jax_moe_dispatch.gemm import grouped_matmul
from jax_moe_dispatch.token_dispatcher import MoEFlexTokenDispatcher, TokenDispatcherConfig

__version__ = "0.1.0"
