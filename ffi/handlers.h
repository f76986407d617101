// XLA FFI handlers of the native backend (handlers.cc). Registered from Python via
// jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="CUDA").
#pragma once

#include "xla/ffi/api/ffi.h"

// jmd_dispatch: fresh dispatch; exchanges counts, returns them [R, R] and the
// source token of each received row [M].
XLA_FFI_DECLARE_HANDLER_SYMBOL(JmdDispatch);
// jmd_dispatch_cached: dispatch along a handle's layout (combine's backward).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JmdDispatchCached);
// jmd_combine: rows back to their sources, summed in float32.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JmdCombine);
