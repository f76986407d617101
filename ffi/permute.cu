// The local expert-major permutation on one GPU (permute.h). core/permute.py
// specifies every bit: group order, padding, drops past N, the K clamp, and the
// float32 sums of unpermute in ascending expert order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "permute.h"
#include "rows.cuh"
#include "vectors.h"

namespace jmd {
namespace {

constexpr int kPermuteThreads = 512;
constexpr int kPermuteWarps = kPermuteThreads / 32;
constexpr int kBlocksPerSm = 4;  // grid cap of the row kernels, per SM.
constexpr int kWarpDsts = 64;    // destinations a warp collects before it copies a row.

int RowGrid(int64_t rows, int num_sms) {
  const int64_t blocks = (rows + kPermuteWarps - 1) / kPermuteWarps;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, int64_t{num_sms} * kBlocksPerSm)));
}

// K clamp (K < L): a warp per row finds the local expert of its K-th routed expert;
// experts after it are dropped for that row.
__global__ void __launch_bounds__(kPermuteThreads) ClampKernel(const __grid_constant__ PermuteParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kPermuteWarps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kPermuteWarps + threadIdx.x / 32; i < p.num_recv; i += warps) {
    const uint8_t* map = p.map + i * p.num_local;
    int seen = 0, last = p.num_local - 1;
    for (int e0 = 0; e0 < p.num_local; e0 += 32) {
      unsigned hits = __ballot_sync(0xffffffffu, e0 + lane < p.num_local && map[e0 + lane] != 0);
      const int n = __popc(hits);
      if (seen + n >= p.max_experts) {  // The K-th routed expert is in this word.
        for (int k = seen + 1; k < p.max_experts; ++k) hits &= hits - 1;
        last = e0 + __ffs(hits) - 1;
        break;
      }
      seen += n;
    }
    if (lane == 0) p.last_expert[i] = last;
  }
}

// For each local expert (a block each): the rank of every kept row within the
// expert's group (row order) into perm_row (-1: not kept), and the group's count.
__global__ void __launch_bounds__(kPermuteThreads) ScanKernel(const __grid_constant__ PermuteParams p) {
  const int num_local = p.num_local;
  // Row i keeps e when it is routed there and e is not past its K-th expert.
  const auto kept = [&](int i, int e) {
    const int64_t r = i;
    return p.map[r * num_local + e] != 0 && (p.last_expert == nullptr || e <= p.last_expert[r]);
  };
  ScanGroups<kPermuteThreads>(p.num_recv, num_local, kept, p.perm_row, p.counts);
}

__device__ __forceinline__ void CopyValue(const char* in, char* out, int bytes) {
  switch (bytes) {
    case 8: *reinterpret_cast<int64_t*>(out) = *reinterpret_cast<const int64_t*>(in); break;
    case 4: *reinterpret_cast<int32_t*>(out) = *reinterpret_cast<const int32_t*>(in); break;
    case 2: *reinterpret_cast<int16_t*>(out) = *reinterpret_cast<const int16_t*>(in); break;
    default: *out = *in; break;
  }
}

// Every block derives the padded group starts from the counts; then a warp per
// row turns its ranks into permuted rows, writes src_row, the probabilities and
// expert_rows, and copies the row into each of its permuted rows; padding rows
// (and rows past every group) are zeroed.
__global__ void __launch_bounds__(kPermuteThreads) PermuteRowsKernel(const __grid_constant__ PermuteParams p) {
  __shared__ int dsts[kPermuteWarps][kWarpDsts];
  extern __shared__ int groups[];  // start[L + 1], count[L]
  const int num_local = p.num_local, num_rows = p.num_rows, max_experts = p.max_experts;
  int* start = groups;
  int* count = groups + num_local + 1;
  PadGroups<kPermuteThreads>(p.counts, num_local, p.pad_multiple, num_rows, start, count, p.tokens_per_expert);

  const int lane = threadIdx.x % 32, warp_in_block = threadIdx.x / 32;
  const int warp = blockIdx.x * kPermuteWarps + warp_in_block;
  const int total_warps = gridDim.x * kPermuteWarps;
  int* mine = dsts[warp_in_block];
  for (int i = warp; i < p.num_recv; i += total_warps) {
    int32_t* expert_rows = p.expert_rows + static_cast<int64_t>(i) * max_experts;
    int n = 0, kept = 0;
    for (int base = 0; base < num_local; base += 32) {
      const int e = base + lane;
      int dst = -1;
      if (e < num_local) {
        int32_t* slot = p.perm_row + static_cast<int64_t>(i) * num_local + e;
        const int rank = *slot;
        if (rank >= 0) {
          dst = start[e] + rank < num_rows ? start[e] + rank : -1;  // Past N: dropped.
          *slot = dst;
          if (dst >= 0) {
            p.src_row[dst] = i;
            const int64_t at = static_cast<int64_t>(i) * num_local + e;
            CopyValue(p.probs + at * p.prob_bytes, p.probs_out + static_cast<int64_t>(dst) * p.prob_bytes,
                      p.prob_bytes);
          }
        }
      }
      const unsigned hits = __ballot_sync(0xffffffffu, dst >= 0);
      const int before = __popc(hits & ((1u << lane) - 1));
      if (dst >= 0) {
        mine[n + before] = dst;
        if (kept + before < max_experts) expert_rows[kept + before] = dst;
      }
      n += __popc(hits);
      kept += __popc(hits);
      __syncwarp();
      if (n > kWarpDsts - 32 || (base + 32 >= num_local && n > 0)) {  // Flush: copy the row.
        for (int k = 0; k < p.num_streams; ++k) {
          const RowStream& st = p.rows[k];
          const char* in = st.src + static_cast<int64_t>(i) * st.bytes;
          JMD_SWITCH_WIDTH(st.width, CopyRow<W>(in, st.dst, st.bytes, mine, n, lane));
        }
        n = 0;
        __syncwarp();
      }
    }
    for (int j = kept + lane; j < max_experts; j += 32) expert_rows[j] = -1;
  }

  for (int j = warp; j < num_rows; j += total_warps) {
    const int e = GroupOf(start, num_local, j);
    if (j < start[num_local] && j - start[e] < count[e]) continue;  // A routed row.
    if (lane == 0) {
      p.src_row[j] = -1;
      char* out = p.probs_out + static_cast<int64_t>(j) * p.prob_bytes;
      for (int b = 0; b < p.prob_bytes; ++b) out[b] = 0;
    }
    for (int k = 0; k < p.num_streams; ++k) {
      const RowStream& st = p.rows[k];
      JMD_SWITCH_WIDTH(st.width, ZeroRow<W>(st.dst + static_cast<int64_t>(j) * st.bytes, st.bytes, lane));
    }
  }
}

// A warp per output row: its permuted rows are listed once (expert_rows order),
// then for each column chunk their float32 sum from zero, in that order, rounded
// once to TOut. With the list in shared memory, nothing but a shared load stands
// between a chunk's start and its row loads: a batch of up to kCombineBatch of them
// (16 bytes a lane, 4 KiB a warp) in flight before the first add.
template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kPermuteThreads) UnpermuteKernel(const __grid_constant__ UnpermuteParams p) {
  __shared__ int listed[kPermuteWarps][kCombineBatch];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int hidden = p.hidden, max_experts = p.max_experts, num_rows = p.num_rows;
  const TIn* rows = static_cast<const TIn*>(p.rows);
  const int chunk = ChunkCols<TIn>(p.vector_in);
  int* list = listed[warp];
  const auto in_rows = [num_rows](int row) { return row >= 0 && row < num_rows; };  // Else skipped.
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kPermuteWarps;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kPermuteWarps + warp; i < p.num_recv; i += warps) {
    const int32_t* mine = p.expert_rows + i * max_experts;
    const int n = ListRows(mine, max_experts, lane, in_rows, list);
    __syncwarp();
    TOut* out = static_cast<TOut*>(p.out) + i * hidden;
    for (int col0 = 0; col0 < hidden; col0 += chunk) {
      float acc[kChunkFloats<TIn>];
#pragma unroll
      for (int q = 0; q < kChunkFloats<TIn>; ++q) acc[q] = 0.0f;
      AddListed<TIn>(acc, rows, list, n, mine, max_experts, in_rows, hidden, col0, lane, p.vector_in);
      StoreChunk<TIn, TOut>(out, acc, hidden, col0, lane, p.vector_in, p.vector_out);
    }
    __syncwarp();  // The list is read by every lane before the next row overwrites it.
  }
}

template <typename TIn>
cudaError_t LaunchUnpermuteFrom(const UnpermuteParams& p, int grid, cudaStream_t stream) {
  switch (p.out_type) {
    case Dtype::kF32: UnpermuteKernel<TIn, float><<<grid, kPermuteThreads, 0, stream>>>(p); break;
    case Dtype::kBF16: UnpermuteKernel<TIn, __nv_bfloat16><<<grid, kPermuteThreads, 0, stream>>>(p); break;
    case Dtype::kF16: UnpermuteKernel<TIn, __half><<<grid, kPermuteThreads, 0, stream>>>(p); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchPermute(const PermuteParams& p, int num_sms, cudaStream_t stream) {
  const int row_grid = RowGrid(p.num_recv, num_sms);
  if (p.last_expert != nullptr) {
    ClampKernel<<<row_grid, kPermuteThreads, 0, stream>>>(p);
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  ScanKernel<<<p.num_local, kPermuteThreads, 0, stream>>>(p);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  const size_t smem = sizeof(int) * (2 * static_cast<size_t>(p.num_local) + 1);
  if (smem > 48 * 1024) {
    if (cudaError_t err =
            cudaFuncSetAttribute(PermuteRowsKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
        err != cudaSuccess) {
      return err;
    }
  }
  const int grid = RowGrid(std::max(p.num_recv, p.num_rows), num_sms);
  PermuteRowsKernel<<<grid, kPermuteThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t LaunchUnpermute(const UnpermuteParams& p, int num_sms, cudaStream_t stream) {
  if (p.num_recv == 0) return cudaSuccess;
  const int grid = RowGrid(p.num_recv, num_sms);
  switch (p.in_type) {
    case Dtype::kF32: return LaunchUnpermuteFrom<float>(p, grid, stream);
    case Dtype::kBF16: return LaunchUnpermuteFrom<__nv_bfloat16>(p, grid, stream);
    case Dtype::kF16: return LaunchUnpermuteFrom<__half>(p, grid, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace jmd
