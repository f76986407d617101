// XLA FFI handlers of the local permutation (permute_handlers.cc), registered like
// those of handlers.h. They need no group: no get_buffer, no peers.
#pragma once

#include "xla/ffi/api/ffi.h"

// jmd_permute: received rows grouped by local expert (core/permute.py group_by_expert).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JmdPermute);
// jmd_unpermute: permuted rows summed back per row in float32 (core/permute.py unpermute).
XLA_FFI_DECLARE_HANDLER_SYMBOL(JmdUnpermute);
