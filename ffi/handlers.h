// XLA FFI handlers of the native backend (handlers.cc). Registered from Python via
// jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="CUDA").
#pragma once

#include <cstddef>

#include "xla/ffi/api/ffi.h"

// jmd_dispatch: fresh dispatch; exchanges counts, returns them [R, R] and the
// source token of each received row [M].
XLA_FFI_DECLARE_HANDLER_SYMBOL(JmdDispatch);
// jmd_dispatch_cached: dispatch along a handle's layout (combine's backward).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JmdDispatchCached);
// jmd_combine: rows back to their sources, summed in float32.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JmdCombine);

namespace jmd {

// Staging bytes a call needs to copy arrays of `sizes[0..n)` bytes (each at a
// 256-byte aligned offset): what every handler reserves when its group spans
// processes. jax_moe_dispatch/backends/staging.py lists each op's arrays; the
// module exports this as staged_bytes, so Python sizes buffers by this rule.
size_t StagedBytes(const size_t* sizes, size_t n);

}  // namespace jmd
