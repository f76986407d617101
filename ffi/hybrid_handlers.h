// XLA FFI handlers of the fused HybridEP ops (hybrid_handlers.cc), registered like
// those of handlers.h.
#pragma once

#include "xla/ffi/api/ffi.h"

// jmd_hybrid_dispatch: fresh dispatch straight into the expert-major permuted rows.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JmdHybridDispatch);
// jmd_hybrid_dispatch_cached: the same along a handle and permutation (hybrid combine's backward).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JmdHybridDispatchCached);
// jmd_hybrid_combine: permuted rows back to their source tokens, summed in float32.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JmdHybridCombine);
