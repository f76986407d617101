// Kernel launchers (kernels.cu). Each returns the launch's cudaError_t.
//
// One call of an op is two launches on the caller's stream (after the copies of
// the inputs into the staging buffer when the group spans processes):
//   notify:  one block; publishes this rank's counts and input addresses to every
//            peer, waits for theirs (bounded), and derives the layout.
//   data:    `num_blocks` blocks; pulls rows from the peers' inputs into this rank's
//            outputs (dispatch: copies; combine: float32 sums), then the last block
//            to finish tells every peer "done reading you" and waits until every
//            peer has said the same, so no input is released while a peer reads it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "protocol.h"

namespace jmd {

// One per-token array moved by dispatch. Its source on rank s is the address s
// published for it: [T, ...] (whole rows) or [T, R, ...] (sliced per destination).
struct Stream {
  char* dst;             // [M, ...] this rank's output.
  int64_t tok_stride;    // bytes between consecutive tokens of a source.
  int64_t dest_stride;   // bytes between destinations of one token (0: whole rows).
  int32_t bytes;         // bytes of one received row.
  int32_t width;         // vector width in bytes: 16, 8, 4, 2 or 1; divides `bytes`.
};

struct NotifyParams {
  const int32_t* axis_index;     // [1] this rank's index on the axis.
  // The local half of a dispatch's layout, built before publishing (null: combine).
  const uint8_t* dest_mask;      // [T, R] fresh dispatch: the ranks each token goes to.
  const int32_t* kept_pos;       // [T, R] cached dispatch: handle.send_pos.
  const int32_t* cached_recv;    // [R] cached dispatch: handle.recv_count.
  int32_t* lists;                // [R, T] out: list[d][i] = token at position i for rank d.
  int32_t num_tokens;
  // Fresh dispatch: the handle (backends/base.py), written once the counts are known.
  int32_t* send_pos;             // [T, R]
  int32_t* dest_offset;          // [R]
  int32_t* recv_count;           // [R]
  uint64_t ptrs[kMaxStreams];    // addresses this rank publishes.
  int32_t max_recv;
};

// Every rank publishes its stream sources (slots 0..num_streams-1) and its send
// lists (slot num_streams): [R, T] int32, list[d][i] = the token at position i of
// the list this rank sends to rank d.
struct DispatchParams {
  Stream streams[kMaxStreams - 1];
  int32_t num_streams;
  int32_t* recv_token;           // [M] source token of each row, or null.
  int32_t num_tokens;            // T of every rank (the lists' row length).
  int32_t max_recv;
};

enum class Dtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

struct CombineParams {
  const int32_t* send_pos;       // [T, R] kept positions (handle.send_pos), -1: none.
  const int32_t* dest_offset;    // [R] my first row at each destination.
  void* out;                     // [T, H] this rank's tokens.
  int32_t num_tokens;
  int32_t hidden;                // elements per row.
  int32_t max_recv;              // M: rows of every rank's input.
  Dtype dtype;
};

cudaError_t LaunchNotify(const GroupView& g, const NotifyParams& p, cudaStream_t stream);
cudaError_t LaunchDispatch(const GroupView& g, const DispatchParams& p, int num_blocks,
                           cudaStream_t stream);
cudaError_t LaunchCombine(const GroupView& g, const CombineParams& p, int num_blocks,
                          cudaStream_t stream);
// The last step of a data kernel alone (tell every peer "done", wait for theirs),
// for ops whose data kernels are elsewhere (hybrid.h); launched after them.
cudaError_t LaunchFinish(const GroupView& g, cudaStream_t stream);

}  // namespace jmd
