"""jax_moe_dispatch: fused MoE token dispatch and combine for JAX (DeepEP and HybridEP protocols)."""

from jax_moe_dispatch.buffer import (
    free_buffer,
    get_buffer,
    get_hidden_bytes,
    get_uccl_ep_buffer,
    init_hybrid_ep_buffer,
    reset_hybrid_ep_buffer,
    set_deepep_num_sms,
    set_hybridep_num_sms,
)
from jax_moe_dispatch.config import TokenDispatcherConfig
from jax_moe_dispatch.fp8 import dequantize_fp8, quantize_fp8
from jax_moe_dispatch.fused_a2a import (
    DispatchHandle,
    HybridEPHandle,
    fused_combine,
    fused_dispatch,
    hybrid_ep_combine,
    hybrid_ep_dispatch,
)

__version__ = "0.1.0"
