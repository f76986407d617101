// How the row kernels (hybrid dispatch, permute) copy rows: the environment
// variable JMD_ROW_COPY, read by their handlers at every call (so one process can
// time both): "bulk" (the default, also when unset or empty) copies rows with
// Hopper bulk copies where they apply (rows.cuh), "vector" always in vectors.
#pragma once

#include <cstdlib>
#include <string>

#include "handlers_internal.h"
#include "xla/ffi/api/ffi.h"

namespace jmd {

// Whether this call copies rows with bulk copies (where they apply), from JMD_ROW_COPY.
inline xla::ffi::ErrorOr<bool> BulkRowCopies() {
  const char* mode = std::getenv("JMD_ROW_COPY");
  const std::string value = mode == nullptr ? "" : mode;
  if (value.empty() || value == "bulk") return true;
  if (value == "vector") return false;
  return xla::ffi::Unexpected(
      Invalid("JMD_ROW_COPY must be 'bulk' (the default) or 'vector', or unset; it is '" + value + "'"));
}

}  // namespace jmd
