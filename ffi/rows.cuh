// Device helpers shared by the kernels that move rows into and out of the
// expert-major permuted buffer (hybrid.cu, permute.cu): a block scan, the scan of
// each expert's group, row copies and zeroing in vectors, the group of a permuted
// row, and float32 sums of rows of float32 / bfloat16 / float16 elements: a warp
// lists the rows to sum once, then sums them a column chunk at a time, the loads
// of a batch in flight together.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "vectors.h"

namespace jmd {

// Exclusive prefix sum over the block (blockDim.x == kBlockThreads); `total` gets
// the block's sum. Every thread must call it.
template <int kBlockThreads>
__device__ int BlockExclusiveSum(int v, int* total) {
  constexpr int kWarps = kBlockThreads / 32;
  __shared__ int warp_sums[kWarps];
  __shared__ int block_total;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int n = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += n;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int own = lane < kWarps ? warp_sums[lane] : 0;
    int w = own;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int n = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += n;
    }
    if (lane < kWarps) warp_sums[lane] = w - own;
    if (lane == 31) block_total = w;
  }
  __syncthreads();
  const int out = warp_sums[warp] + incl - v;
  *total = block_total;
  __syncthreads();  // warp_sums and block_total may be reused by the next call.
  return out;
}

// Rows per thread and round of ScanGroups: a round is one block scan.
inline constexpr int kScanRows = 32;

// For each local expert e (a block each; blockDim.x == kBlockThreads): the rank,
// in row order, of every row i in [0, num_rows) that hit(i, e) accepts within e's
// group, written to rank[i * num_local + e] (-1 for the rows it rejects), and the
// group's size to count[e]. Each thread takes kScanRows consecutive rows a round.
template <int kBlockThreads, typename Hit>
__device__ void ScanGroups(int num_rows, int num_local, Hit hit, int32_t* rank, int32_t* count) {
  for (int e = blockIdx.x; e < num_local; e += gridDim.x) {
    int carry = 0;
    for (int round = 0; round < num_rows; round += blockDim.x * kScanRows) {
      const int first = round + threadIdx.x * kScanRows;
      uint32_t hits = 0;
#pragma unroll 8
      for (int k = 0; k < kScanRows; ++k) {
        const int i = first + k;
        if (i < num_rows) hits |= static_cast<uint32_t>(hit(i, e)) << k;
      }
      int total;
      int r = carry + BlockExclusiveSum<kBlockThreads>(__popc(hits), &total);
      for (int k = 0; k < kScanRows && first + k < num_rows; ++k) {
        const bool h = (hits >> k) & 1u;
        rank[static_cast<int64_t>(first + k) * num_local + e] = h ? r : -1;
        r += h;
      }
      carry += total;
    }
    if (threadIdx.x == 0) count[e] = carry;
  }
}

// The padded expert-major layout from the groups' sizes (every block computes it;
// blockDim.x == kBlockThreads): start[e] = first permuted row of group e, each group
// padded to a multiple of pad_multiple, start[num_local] = the padded total, and
// count[e] = counts[e] (start and count in shared memory). Block 0 also writes
// tokens_per_expert[e], the group's padded rows that fall inside [0, num_rows).
// Ends with a barrier.
template <int kBlockThreads>
__device__ void PadGroups(const int32_t* counts, int num_local, int pad_multiple, int num_rows, int* start,
                          int* count, int32_t* tokens_per_expert) {
  int carry = 0;
  for (int base = 0; base < num_local; base += blockDim.x) {
    const int e = base + threadIdx.x;
    const int c = e < num_local ? counts[e] : 0;
    const int padded = (c + pad_multiple - 1) / pad_multiple * pad_multiple;
    int total;
    const int s = carry + BlockExclusiveSum<kBlockThreads>(padded, &total);
    if (e < num_local) {
      start[e] = s;
      count[e] = c;
      if (blockIdx.x == 0) tokens_per_expert[e] = min(max(s + padded, 0), num_rows) - min(max(s, 0), num_rows);
    }
    carry += total;
  }
  if (threadIdx.x == 0) start[num_local] = carry;
  __syncthreads();
}

// Stores one row (read once, in vectors of W bytes) into `n` rows of `dst`.
template <int W>
__device__ void CopyRow(const char* in, char* dst, int bytes, const int* rows, int n, int lane) {
  using V = typename VecOf<W>::T;
  constexpr int kUnroll = W == 16 ? 8 : 4;
  const int nvec = bytes / W;
  const V* src = reinterpret_cast<const V*>(in);
  for (int base = 0; base < nvec; base += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = base + u * 32 + lane;
      if (i < nvec) v[u] = __ldg(src + i);
    }
    for (int j = 0; j < n; ++j) {
      V* out = reinterpret_cast<V*>(dst + static_cast<int64_t>(rows[j]) * bytes);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int i = base + u * 32 + lane;
        if (i < nvec) out[i] = v[u];
      }
    }
  }
}

template <int W>
__device__ void ZeroRow(char* dst, int bytes, int lane) {
  using V = typename VecOf<W>::T;
  V* out = reinterpret_cast<V*>(dst);
  for (int i = lane; i < bytes / W; i += 32) out[i] = V{};
}

// Group e of the permuted buffer is [start[e], start[e + 1]) (start[L]: the total,
// unclipped); its first count[e] rows are routed rows, the rest padding.
__device__ inline int GroupOf(const int* start, int num_local, int row) {
  int lo = 0, hi = num_local - 1;  // The last e with start[e] <= row.
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (start[mid] <= row) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T> struct Num;
template <> struct Num<float> {
  __device__ static float ToF(float v) { return v; }
  __device__ static float FromF(float v) { return v; }
};
template <> struct Num<__nv_bfloat16> {
  __device__ static float ToF(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 FromF(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Num<__half> {
  __device__ static float ToF(__half v) { return __half2float(v); }
  __device__ static __half FromF(float v) { return __float2half_rn(v); }
};

// Elements per 16-byte vector, unpacked to / packed from float32.
template <typename T>
struct Pack16 {
  static constexpr int kN = 16 / sizeof(T);
  __device__ static void Add(float* acc, const int4& v) {
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < kN; ++i) acc[i] += Num<T>::ToF(e[i]);
  }
  __device__ static int4 Pack(const float* acc) {
    int4 v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int i = 0; i < kN; ++i) e[i] = Num<T>::FromF(acc[i]);
    return v;
  }
};

inline constexpr int kCombineUnroll = 1;  // 16-byte vectors per lane per column chunk.
inline constexpr int kCombineBatch = 8;   // expert rows whose loads are in flight together.
inline constexpr int kScalarCols = 8;     // single elements per lane per column chunk.

// Columns of one chunk: 16-byte vectors, or single elements (kScalarCols per lane).
template <typename T>
__device__ __forceinline__ int ChunkCols(bool vectorized) {
  return vectorized ? 32 * kCombineUnroll * Pack16<T>::kN : 32 * kScalarCols;
}

// Float32 partial sums one lane keeps for a chunk of T's (either kind of chunk).
template <typename T>
inline constexpr int kChunkFloats =
    kCombineUnroll * Pack16<T>::kN > kScalarCols ? kCombineUnroll * Pack16<T>::kN : kScalarCols;

// Adds rows rows[0..n) (of `hidden` T's each, from `base`) to `part` (kChunkFloats<T>),
// columns of the chunk at col0, in order: every load of the batch is issued before
// the first add.
template <typename T>
__device__ __forceinline__ void AddRows(float* part, const T* base, const int (&rows)[kCombineBatch], int n,
                                        int hidden, int col0, int lane, bool vectorized) {
  constexpr int kN = Pack16<T>::kN;
  if (vectorized) {
    int4 v[kCombineBatch][kCombineUnroll];
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b) {
      const T* src = base + static_cast<int64_t>(rows[b]) * hidden;
#pragma unroll
      for (int u = 0; u < kCombineUnroll; ++u) {
        const int col = col0 + (u * 32 + lane) * kN;
        if (b < n && col < hidden) v[b][u] = __ldg(reinterpret_cast<const int4*>(src + col));
      }
    }
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b) {
#pragma unroll
      for (int u = 0; u < kCombineUnroll; ++u) {
        const int col = col0 + (u * 32 + lane) * kN;
        if (b < n && col < hidden) Pack16<T>::Add(part + u * kN, v[b][u]);
      }
    }
  } else {
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b) {
      if (b >= n) continue;
      const T* src = base + static_cast<int64_t>(rows[b]) * hidden;
#pragma unroll
      for (int u = 0; u < kScalarCols; ++u) {
        const int col = col0 + u * 32 + lane;
        if (col < hidden) part[u] += Num<T>::ToF(src[col]);
      }
    }
  }
}

// Calls visit(row), in order, for each entry `row` of list[0, len) that keep(row)
// accepts; `row` is the same in every lane (every lane must call).
template <typename Keep, typename Visit>
__device__ __forceinline__ void ForEachListed(const int32_t* list, int len, int lane, Keep keep, Visit visit) {
  for (int j0 = 0; j0 < len; j0 += 32) {
    const int row = j0 + lane < len ? __ldg(list + j0 + lane) : -1;
    unsigned hits = __ballot_sync(0xffffffffu, keep(row));
    while (hits != 0) {
      visit(__shfl_sync(0xffffffffu, row, __ffs(hits) - 1));
      hits &= hits - 1;
    }
  }
}

// ListRows' count when the rows do not fit a batch (AddListed reads the list again).
inline constexpr int kTooMany = -1;

// Lists, in order, the rows of list[0, len) that keep accepts into listed[0, n)
// (kCombineBatch ints; lane 0 writes, so the warp syncs before reading them) and
// returns n, or kTooMany when there are more than kCombineBatch.
template <typename Keep>
__device__ __forceinline__ int ListRows(const int32_t* list, int len, int lane, Keep keep, int* listed) {
  int n = 0;
  ForEachListed(list, len, lane, keep, [&](int row) {
    if (lane == 0 && n < kCombineBatch) listed[n] = row;
    ++n;
  });
  return n > kCombineBatch ? kTooMany : n;
}

// Adds to `part`, for the chunk of columns at col0, the rows ListRows listed (n of
// them, in `listed`), in order: one batch, every load in flight before the first
// add. When it returned kTooMany, the rows of list[0, len) that keep accepts, read
// again, a batch at a time.
template <typename T, typename Keep>
__device__ __forceinline__ void AddListed(float* part, const T* base, const int* listed, int n, const int32_t* list,
                                          int len, Keep keep, int hidden, int col0, int lane, bool vectorized) {
  int batch[kCombineBatch] = {};
  if (n != kTooMany) {
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b) {
      if (b < n) batch[b] = listed[b];
    }
    AddRows<T>(part, base, batch, n, hidden, col0, lane, vectorized);
    return;
  }
  int nb = 0;
  ForEachListed(list, len, lane, keep, [&](int row) {
#pragma unroll
    for (int b = 0; b < kCombineBatch; ++b) {
      if (b == nb) batch[b] = row;
    }
    if (++nb == kCombineBatch) {
      AddRows<T>(part, base, batch, nb, hidden, col0, lane, vectorized);
      nb = 0;
    }
  });
  if (nb > 0) AddRows<T>(part, base, batch, nb, hidden, col0, lane, vectorized);
}

// Rounds the float32 sums `acc` of the chunk at col0 (a chunk of TIn's, ChunkCols)
// once to TOut and stores them into the row `out`: in 16-byte vectors when
// vector_out (TOut == TIn, vector chunks, `out` aligned), else element by element.
template <typename TIn, typename TOut>
__device__ __forceinline__ void StoreChunk(TOut* out, const float* acc, int hidden, int col0, int lane, bool vector_in,
                                           bool vector_out) {
  constexpr int kN = Pack16<TIn>::kN;
  if (vector_in) {
#pragma unroll
    for (int u = 0; u < kCombineUnroll; ++u) {
      const int col = col0 + (u * 32 + lane) * kN;
      if (col >= hidden) continue;
      if constexpr (std::is_same_v<TIn, TOut>) {
        if (vector_out) {
          *reinterpret_cast<int4*>(out + col) = Pack16<TOut>::Pack(acc + u * kN);
          continue;
        }
      }
#pragma unroll
      for (int q = 0; q < kN; ++q) out[col + q] = Num<TOut>::FromF(acc[u * kN + q]);
    }
  } else {
#pragma unroll
    for (int u = 0; u < kScalarCols; ++u) {
      const int col = col0 + u * 32 + lane;
      if (col < hidden) out[col] = Num<TOut>::FromF(acc[u]);
    }
  }
}

}  // namespace jmd
