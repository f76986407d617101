// Kernels of the local expert-major permutation (permute.cu): one GPU's rows
// grouped by local expert, and the float32 sum back. No protocol and no peers:
// these are the native form of core/permute.py (group_by_expert and unpermute),
// which is the specification of every bit they write.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"
#include "row_streams.h"

namespace jmd {

// Arrays a permute moves into permuted rows (rows, FP8 scales, ...), each [M, ...].
inline constexpr int kMaxPermuteStreams = 4;

struct PermuteParams {
  RowStream rows[kMaxPermuteStreams];
  int32_t num_streams;
  const uint8_t* map;          // [M, L] bool: row i routed to local expert e.
  const char* probs;           // [M, L] probability of (row, expert).
  int32_t prob_bytes;          // bytes of one probability (1, 2, 4 or 8).
  char* probs_out;             // [N] permuted probabilities.
  int32_t* perm_row;           // [M, L] out: permuted row of (row, expert), -1: none.
  int32_t* src_row;            // [N] out: the row each permuted row comes from, -1: padding.
  int32_t* tokens_per_expert;  // [L] out: padded group sizes, clipped at N.
  int32_t* expert_rows;        // [M, K] out: a row's permuted rows, ascending expert, then -1.
  int32_t* counts;             // [L] scratch: kept rows per expert.
  int32_t* last_expert;        // [M] scratch: the last expert a row keeps (K clamp), or null.
  int32_t num_recv;            // M
  int32_t num_local;           // L
  int32_t num_rows;            // N
  int32_t max_experts;         // K, in [1, L]
  int32_t pad_multiple;
};

// The permutation and the permuted rows and probabilities: a row routed to more
// than K experts keeps its K smallest (a warp per row, when K < L), then a scan per
// local expert (the rank of each kept row in its group), then a warp per row that
// turns ranks into permuted rows (at or past N: dropped) and copies the row, read
// once, into each of them; padding rows are zeroed. `num_sms` sizes the grids.
cudaError_t LaunchPermute(const PermuteParams& p, int num_sms, cudaStream_t stream);

struct UnpermuteParams {
  const void* rows;            // [N, H] permuted rows.
  const int32_t* expert_rows;  // [M, K] rows to sum per output row (outside [0, N): skipped).
  void* out;                   // [M, H]
  int32_t num_recv;            // M
  int32_t num_rows;            // N
  int32_t max_experts;         // K
  int32_t hidden;              // H, elements per row.
  Dtype in_type, out_type;
  bool vector_in;              // rows are read in 16-byte vectors (alignment and H allow it).
  bool vector_out;             // out is written in 16-byte vectors (same type as rows).
};

// out[i] = the float32 sum, from zero, of rows[expert_rows[i, j]] for j ascending,
// rounded once to the output type (zero for rows with none). A warp per row.
cudaError_t LaunchUnpermute(const UnpermuteParams& p, int num_sms, cudaStream_t stream);

}  // namespace jmd
