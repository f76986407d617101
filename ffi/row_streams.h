// One array that a kernel moves row by row into the expert-major permuted buffer
// (the rows, their FP8 scales): hybrid dispatch (hybrid.h) and permute (permute.h).
// Plain data, shared by host and device code; row_stream_setup.h fills it from a
// handler's buffers.
#pragma once

#include <cstdint>

namespace jmd {

struct RowStream {
  const char* src;  // [M, ...] this GPU's input rows (a hybrid dispatch reads each source's published copy).
  char* dst;        // [N, ...] permuted rows.
  int32_t bytes;    // bytes of one row.
  int32_t width;    // vector width in bytes (16, 8, 4, 2, 1); divides `bytes`.
};

}  // namespace jmd
