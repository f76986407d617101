// Fused HybridEP kernels: dispatch into the expert-major permuted buffer and
// combine out of it. core/permute.py specifies the permutation and
// backends/reference.py the bits; hybrid.h says where these kernels sit in a call.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "hybrid.h"
#include "rows.cuh"
#include "vectors.h"

namespace jmd {
namespace {

// Published slots of a hybrid dispatch, per source rank: the send lists first, then
// the row streams, then (fresh) the routing map and probability slices.
constexpr int kListSlot = 0;
constexpr int kRowSlot = 1;

// Dispatch destinations a warp collects before it copies a row (more are copied
// in further rounds, reading the row again).
constexpr int kWarpDsts = 64;
constexpr int kWarps = kThreads / 32;

// Where this rank's receive rows come from (from notify's layout).
struct Sources {
  const char* rows[kMaxRowStreams][kMaxRanks];  // [stream][source axis index]
  const uint8_t* map[kMaxRanks];                // [T, R, L] routing slices (fresh)
  const char* probs[kMaxRanks];                 // [T, R, L] probabilities (fresh)
  const int32_t* list[kMaxRanks];               // source s's list for me
  int start[kMaxRanks + 1];
};

// Fills `src` from the layout (all threads of the block; ends with a barrier).
template <bool kFresh>
__device__ void LoadSources(Sources& src, const Layout& layout, const HybridParams& p, int size, int me) {
  if (threadIdx.x < kMaxRanks) {
    const int s = threadIdx.x;
    const bool in = s < size;
    for (int k = 0; k < kMaxRowStreams; ++k) {
      src.rows[k][s] = in && k < p.num_row_streams ? reinterpret_cast<const char*>(layout.ptrs[s][kRowSlot + k])
                                                   : nullptr;
    }
    const int extra = kRowSlot + p.num_row_streams;
    src.map[s] = in && kFresh ? reinterpret_cast<const uint8_t*>(layout.ptrs[s][extra]) : nullptr;
    src.probs[s] = in && kFresh ? reinterpret_cast<const char*>(layout.ptrs[s][extra + 1]) : nullptr;
    src.list[s] = in ? reinterpret_cast<const int32_t*>(layout.ptrs[s][kListSlot]) +
                           static_cast<int64_t>(me) * p.num_tokens
                     : nullptr;
  }
  if (threadIdx.x <= kMaxRanks) src.start[threadIdx.x] = layout.recv_start[min(static_cast<int>(threadIdx.x), size)];
  __syncthreads();
}

__device__ __forceinline__ int SourceOf(const Sources& src, int size, int row) {
  int s = 0;
  while (s + 1 < size && row >= src.start[s + 1]) ++s;
  return s;
}

// ---------------------------------------------------------------------------
// Fresh dispatch, step 1: for each local expert (a block each), the rank of every
// routed receive row within the expert's group (receive order), written to
// perm_row, and the group's row count. perm_row of unrouted rows is -1.

__global__ void __launch_bounds__(kThreads) HybridScanKernel(GroupView g, const __grid_constant__ HybridParams p) {
  __shared__ Sources src;
  const Layout& layout = g.regions[g.position]->layout;
  if (layout.aborted) return;  // The notify step failed (recorded); nothing is valid.
  const int size = g.size, me = layout.my_axis_index, num_local = p.num_local;
  LoadSources<true>(src, layout, p, size, me);
  const int num_recv = src.start[size];
  // Receive row i is routed to e when its token's slice of the map says so.
  const auto routed = [&](int i, int e) {
    const int s = SourceOf(src, size, i);
    const int64_t t = src.list[s][i - src.start[s]];
    return src.map[s][(t * size + me) * num_local + e] != 0;
  };
  ScanGroups<kThreads>(num_recv, num_local, routed, p.perm_row, p.counts);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t pad_begin = static_cast<int64_t>(num_recv) * num_local;
  const int64_t pad_end = static_cast<int64_t>(p.max_recv) * num_local;
  for (int64_t i = pad_begin + tid; i < pad_end; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p.perm_row[i] = -1;
  }
}

// ---------------------------------------------------------------------------
// Step 2 (fresh and cached): a warp per receive row reads the row once from its
// source and stores it into each of its permuted rows; then padding rows are zeroed.

template <bool kFresh>
__global__ void __launch_bounds__(kThreads) HybridPermuteKernel(GroupView g, const __grid_constant__ HybridParams p) {
  __shared__ Sources src;
  __shared__ int dsts[kWarps][kWarpDsts];
  extern __shared__ int groups[];  // fresh: start[L + 1], count[L]
  const Layout& layout = g.regions[g.position]->layout;
  if (layout.aborted) return;  // The notify step failed (recorded); nothing is valid.
  const int size = g.size, me = layout.my_axis_index, num_local = p.num_local, num_rows = p.num_rows;
  LoadSources<kFresh>(src, layout, p, size, me);
  int* start = groups;
  int* count = groups + num_local + 1;
  if (kFresh) {
    PadGroups<kThreads>(p.counts, num_local, p.pad_multiple, num_rows, start, count, p.tokens_per_expert);
  }
  const int lane = threadIdx.x % 32, warp_in_block = threadIdx.x / 32;
  const int warp = blockIdx.x * kWarps + warp_in_block;
  const int total_warps = gridDim.x * kWarps;
  const int num_recv = src.start[size];
  int* mine = dsts[warp_in_block];

  for (int i = warp; i < num_recv; i += total_warps) {
    const int s = SourceOf(src, size, i);
    const int64_t t = src.list[s][i - src.start[s]];
    if (kFresh && lane == 0) p.recv_token[i] = static_cast<int32_t>(t);
    int n = 0;
    for (int base = 0; base < num_local; base += 32) {
      const int e = base + lane;
      int dst = -1;
      if (e < num_local) {
        int32_t* slot = p.perm_row + static_cast<int64_t>(i) * num_local + e;
        if (kFresh) {
          const int rank = *slot;
          if (rank >= 0) {
            dst = start[e] + rank < num_rows ? start[e] + rank : -1;  // Past N: dropped.
            *slot = dst;
            if (dst >= 0) {
              p.src_row[dst] = i;
              const char* prob = src.probs[s] + ((t * size + me) * num_local + e) * p.prob_bytes;
              char* out = p.probs_out + static_cast<int64_t>(dst) * p.prob_bytes;
              if (p.prob_bytes == 4) {
                *reinterpret_cast<int*>(out) = *reinterpret_cast<const int*>(prob);
              } else {
                *reinterpret_cast<short*>(out) = *reinterpret_cast<const short*>(prob);
              }
            }
          }
        } else {
          dst = *slot;
        }
      }
      const unsigned hits = __ballot_sync(0xffffffffu, dst >= 0);
      if (dst >= 0) mine[n + __popc(hits & ((1u << lane) - 1))] = dst;
      n += __popc(hits);
      __syncwarp();
      if (n > kWarpDsts - 32 || (base + 32 >= num_local && n > 0)) {  // Flush: copy the row.
        for (int k = 0; k < p.num_row_streams; ++k) {
          const RowStream& st = p.rows[k];
          const char* in = src.rows[k][s] + t * st.bytes;
          JMD_SWITCH_WIDTH(st.width, CopyRow<W>(in, st.dst, st.bytes, mine, n, lane));
        }
        n = 0;
        __syncwarp();
      }
    }
  }

  if (kFresh) {  // Receive rows past the received ones: no source token.
    const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    for (int64_t i = num_recv + tid; i < p.max_recv; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      p.recv_token[i] = -1;
    }
  }
  // Padding rows of the permuted buffer (and rows past every group): zero.
  for (int j = warp; j < num_rows; j += total_warps) {
    bool pad;
    if (kFresh) {
      const int e = GroupOf(start, num_local, j);
      pad = j >= start[num_local] || j - start[e] >= count[e];
    } else {
      pad = p.src_row[j] < 0;
    }
    if (!pad) continue;
    if (kFresh && lane == 0) {
      p.src_row[j] = -1;
      char* out = p.probs_out + static_cast<int64_t>(j) * p.prob_bytes;
      for (int b = 0; b < p.prob_bytes; ++b) out[b] = 0;
    }
    for (int k = 0; k < p.num_row_streams; ++k) {
      const RowStream& st = p.rows[k];
      JMD_SWITCH_WIDTH(st.width, ZeroRow<W>(st.dst + static_cast<int64_t>(j) * st.bytes, st.bytes, lane));
    }
  }
}

// ---------------------------------------------------------------------------
// Combine: a warp per token. For each rank d it went to (ascending), the float32
// sum over its permuted rows there (ascending local expert, read through d's
// perm_row), added to the token's float32 total; one rounding at the end. The
// token's rows are listed once; each chunk of columns then loads up to
// kCombineBatch rows at a time, all loads in flight before the first add.

constexpr int kNotSent = -2;  // listed count: the token did not go to that rank.

template <typename T>
__global__ void __launch_bounds__(kThreads) HybridCombineKernel(GroupView g,
                                                                const __grid_constant__ HybridCombineParams p) {
  __shared__ const T* rows_of[kMaxRanks];
  __shared__ const int32_t* perm_of[kMaxRanks];
  __shared__ int offset[kMaxRanks];
  // Per warp and rank, the current token's rows there (when they fit in a batch).
  __shared__ int listed[kWarps][kMaxRanks][kCombineBatch];
  __shared__ int listed_n[kWarps][kMaxRanks];
  const Layout& layout = g.regions[g.position]->layout;
  if (layout.aborted) return;  // The notify step failed (recorded); nothing is valid.
  const int size = g.size, num_local = p.num_local, hidden = p.hidden;
  if (threadIdx.x < size) {
    const int d = threadIdx.x;
    rows_of[d] = reinterpret_cast<const T*>(layout.ptrs[d][0]);
    perm_of[d] = reinterpret_cast<const int32_t*>(layout.ptrs[d][1]);
    offset[d] = p.dest_offset[d];
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int total_warps = gridDim.x * kWarps;
  const bool vectorized = (static_cast<int64_t>(hidden) * sizeof(T)) % 16 == 0;
  const int chunk = ChunkCols<T>(vectorized);
  int(&list)[kMaxRanks][kCombineBatch] = listed[warp];
  int(&list_n)[kMaxRanks] = listed_n[warp];
  const auto is_row = [](int row) { return row >= 0; };  // A perm_row entry: -1 is none.

  for (int t = blockIdx.x * kWarps + warp; t < p.num_tokens; t += total_warps) {
    int recv_row = -1;
    if (lane < size) {
      const int pos = p.send_pos[static_cast<int64_t>(t) * size + lane];
      if (pos >= 0) recv_row = offset[lane] + pos;
    }
    // The token's rows, once (each chunk below reads them from the list).
    for (int d = 0; d < size; ++d) {
      const int r = __shfl_sync(0xffffffffu, recv_row, d);
      int n = kNotSent;
      if (r >= 0) n = ListRows(perm_of[d] + static_cast<int64_t>(r) * num_local, num_local, lane, is_row, list[d]);
      if (lane == 0) list_n[d] = n;
    }
    __syncwarp();
    T* out = reinterpret_cast<T*>(p.out) + static_cast<int64_t>(t) * hidden;
    for (int col0 = 0; col0 < hidden; col0 += chunk) {
      float acc[kChunkFloats<T>];
#pragma unroll
      for (int i = 0; i < kChunkFloats<T>; ++i) acc[i] = 0.0f;
      for (int d = 0; d < size; ++d) {
        const int n = list_n[d];
        if (n == kNotSent) continue;
        float part[kChunkFloats<T>];
#pragma unroll
        for (int i = 0; i < kChunkFloats<T>; ++i) part[i] = 0.0f;
        const int r = __shfl_sync(0xffffffffu, recv_row, d);  // kTooMany: perm_row is read again.
        AddListed<T>(part, rows_of[d], list[d], n, perm_of[d] + static_cast<int64_t>(r) * num_local, num_local, is_row,
                     hidden, col0, lane, vectorized);
#pragma unroll
        for (int i = 0; i < kChunkFloats<T>; ++i) acc[i] += part[i];
      }
      StoreChunk<T, T>(out, acc, hidden, col0, lane, vectorized, vectorized);
    }
    __syncwarp();  // The list is read by every lane before the next token overwrites it.
  }
}

size_t GroupBytes(const HybridParams& p) { return sizeof(int) * (2 * static_cast<size_t>(p.num_local) + 1); }

}  // namespace

cudaError_t LaunchHybridDispatch(const GroupView& g, const HybridParams& p, int num_blocks, cudaStream_t stream) {
  // A block per local expert: the scan is short and latency-bound, so its blocks are
  // not held to the op's SM budget (the permute kernel is).
  HybridScanKernel<<<p.num_local, kThreads, 0, stream>>>(g, p);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  const size_t smem = GroupBytes(p);
  if (smem > 48 * 1024) {
    if (cudaError_t err = cudaFuncSetAttribute(HybridPermuteKernel<true>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
        err != cudaSuccess) {
      return err;
    }
  }
  HybridPermuteKernel<true><<<num_blocks, kThreads, smem, stream>>>(g, p);
  return cudaGetLastError();
}

cudaError_t LaunchHybridDispatchCached(const GroupView& g, const HybridParams& p, int num_blocks,
                                       cudaStream_t stream) {
  HybridPermuteKernel<false><<<num_blocks, kThreads, 0, stream>>>(g, p);
  return cudaGetLastError();
}

cudaError_t LaunchHybridCombine(const GroupView& g, const HybridCombineParams& p, int num_blocks,
                                cudaStream_t stream) {
  switch (p.dtype) {
    case Dtype::kF32: HybridCombineKernel<float><<<num_blocks, kThreads, 0, stream>>>(g, p); break;
    case Dtype::kBF16: HybridCombineKernel<__nv_bfloat16><<<num_blocks, kThreads, 0, stream>>>(g, p); break;
    case Dtype::kF16: HybridCombineKernel<__half><<<num_blocks, kThreads, 0, stream>>>(g, p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace jmd
