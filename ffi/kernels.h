// Kernel launchers (kernels.cu). Each returns the launch's cudaError_t.
//
// One call of an op is two launches on the caller's stream:
//   notify:  one block; publishes this rank's counts and buffer addresses to every
//            peer, waits for theirs (bounded), and derives the layout.
//   data:    `num_blocks` blocks; moves the rows (dispatch: stores into the peers'
//            outputs; combine: loads from the peers' inputs and sums in float32),
//            then the last block to finish tells every peer "done" and waits until
//            every peer has said the same, so no buffer is released while a peer
//            still touches it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "protocol.h"

namespace jmd {

// One per-token array moved by dispatch.
struct Stream {
  const char* src;       // [T, ...] (whole rows) or [T, R, ...] (sliced per destination).
  int64_t tok_stride;    // bytes between consecutive tokens of src.
  int64_t dest_stride;   // bytes between destinations of one token (0: whole rows).
  int32_t bytes;         // bytes of one received row.
  int32_t width;         // vector width in bytes: 16, 8, 4, 2 or 1; divides `bytes`.
};

struct NotifyParams {
  const int32_t* axis_index;     // [1] this rank's index on the axis.
  const int32_t* counts;         // [R] rows for each destination; null for cached calls.
  const int32_t* cached_offset;  // [R] (cached calls) my first row at each destination.
  const int32_t* cached_recv;    // [R] (cached calls) rows kept from each source.
  int32_t* all_counts;           // [R, R] output, or null.
  uint64_t ptrs[kMaxStreams];    // addresses this rank publishes.
  int32_t max_recv;
};

struct DispatchParams {
  Stream streams[kMaxStreams - 1];
  int32_t num_streams;
  bool with_token;               // also write each row's source token (stream slot num_streams).
  const int32_t* send_pos;       // [T, R] position in each destination's list, -1: not sent.
  int32_t num_tokens;
  int32_t max_recv;
};

enum class Dtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct CombineParams {
  const int32_t* send_pos;       // [T, R] kept positions (handle.send_pos), -1: none.
  const int32_t* dest_offset;    // [R] my first row at each destination.
  void* out;                     // [T, H] this rank's tokens.
  int32_t num_tokens;
  int32_t hidden;                // elements per row.
  Dtype dtype;
};

cudaError_t LaunchNotify(const GroupView& g, const NotifyParams& p, cudaStream_t stream);
cudaError_t LaunchDispatch(const GroupView& g, const DispatchParams& p, int num_blocks,
                           cudaStream_t stream);
cudaError_t LaunchCombine(const GroupView& g, const CombineParams& p, int num_blocks,
                          cudaStream_t stream);

}  // namespace jmd
