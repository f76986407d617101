// Kernels of the fused HybridEP ops (hybrid.cu): dispatch straight into the
// expert-major permuted buffer, and combine straight out of it.
//
// They run inside the native protocol of kernels.h: a call is the notify launch
// (LaunchNotify: send lists, handle, counts and addresses exchanged), the kernels
// below, and a done handshake (LaunchDispatch with no streams), so every wait and
// failure report is the plain ops' own. core/permute.py is the specification of
// the permutation these kernels compute.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"
#include "protocol.h"
#include "row_streams.h"

namespace jmd {

// Arrays a hybrid dispatch moves into permuted rows. Their sources on rank s are
// the addresses s published in slots 0..num_rows_streams-1 ([T, ...] rows), then
// the routing slices map ([T, R, L] bool) and probs ([T, R, L]), then the lists.
inline constexpr int kMaxRowStreams = 2;  // rows, FP8 scales.

struct HybridParams {
  RowStream rows[kMaxRowStreams];
  int32_t num_row_streams;
  int32_t prob_bytes;          // bytes of one probability (2 or 4).
  char* probs_out;             // [N] permuted probabilities (null: cached dispatch).
  int32_t* perm_row;           // [M, L]: fresh: computed here; cached: read.
  int32_t* src_row;            // [N]: fresh: computed here; cached: read.
  int32_t* tokens_per_expert;  // [L] (fresh only).
  int32_t* recv_token;         // [M] handle.recv_token (fresh only).
  int32_t* counts;             // [L] scratch: routed receive rows per expert (fresh only).
  int32_t num_tokens;          // T of every rank (the lists' row length).
  int32_t max_recv;            // M
  int32_t num_local;           // L
  int32_t num_rows;            // N
  int32_t pad_multiple;
};

// Fresh hybrid dispatch after notify: a scan per local expert over the received
// routing map, then a data kernel that reads each received row once from its
// source and writes it to each of its permuted rows (padding rows zeroed).
cudaError_t LaunchHybridDispatch(const GroupView& g, const HybridParams& p, int num_blocks, cudaStream_t stream);

// Cached hybrid dispatch (hybrid combine's backward) after a cached notify: the
// data kernel along a given permutation.
cudaError_t LaunchHybridDispatchCached(const GroupView& g, const HybridParams& p, int num_blocks,
                                       cudaStream_t stream);

// Every rank publishes its permuted rows (slot 0) and its perm_row (slot 1).
struct HybridCombineParams {
  const int32_t* send_pos;       // [T, R] kept positions (handle.send_pos), -1: none.
  const int32_t* dest_offset;    // [R] my first receive row at each destination.
  void* out;                     // [T, H] this rank's tokens.
  int32_t num_tokens;
  int32_t hidden;                // elements per row.
  int32_t num_local;             // L
  Dtype dtype;
};

// Hybrid combine after notify: per token, for each rank it went to in ascending
// rank order, the float32 sum of its expert rows there in ascending expert order,
// added to the token's float32 total, rounded once.
cudaError_t LaunchHybridCombine(const GroupView& g, const HybridCombineParams& p, int num_blocks,
                                cudaStream_t stream);

}  // namespace jmd
