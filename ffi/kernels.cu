// Notify, dispatch and combine kernels. protocol.h describes the signalling and
// backends/base.py the layout these kernels produce (the reference backend in
// backends/reference.py computes the same bits with JAX collectives).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kernels.h"
#include "vectors.h"

namespace jmd {
namespace {

// ---------------------------------------------------------------------------
// Flags: system-scope release/acquire, every wait bounded by a timeout.

__device__ __forceinline__ uint64_t GlobalTimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t LoadAcquire(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void StoreRelease(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Records what went wrong in host-mapped memory. The kernels do not trap (a trap
// would take the CUDA context, and the diagnosis, down with it): the call gives up,
// and the handler of this GPU's next call returns the diagnosis as an XLA error.
// The first failure is kept: the claim is an atomicCAS in this GPU's own region
// (device memory), and `code` is stored last, so the host never reads a half-filled
// Diag. `theirs` (may be null) is the peer's published signature.
__device__ void Fail(const GroupView& g, int32_t code, int32_t stage, int32_t peer, uint64_t seen,
                     const OpSignature* theirs = nullptr) {
  if (atomicCAS(&g.regions[g.position]->layout.fail_claimed, 0, 1) != 0) return;
  volatile Diag* d = g.diag;
  d->stage = stage;
  d->peer = peer;
  d->device = g.device;
  d->epoch = g.epoch;
  d->seen = seen;
  const int32_t* mine = reinterpret_cast<const int32_t*>(&g.sig);
  const int32_t* other = reinterpret_cast<const int32_t*>(theirs);
  volatile int32_t* out_mine = reinterpret_cast<volatile int32_t*>(&d->mine);
  volatile int32_t* out_theirs = reinterpret_cast<volatile int32_t*>(&d->theirs);
  for (int i = 0; i < static_cast<int>(sizeof(OpSignature) / sizeof(int32_t)); ++i) {
    out_mine[i] = mine[i];
    out_theirs[i] = other != nullptr ? other[i] : 0;
  }
  __threadfence_system();
  d->code = code;
  __threadfence_system();
}

enum Arrival : int32_t { kArrived = 0, kAhead = 1, kTimedOut = 2 };

// Waits until *flag == the current epoch. A flag past the epoch is a peer in a later
// call (kAhead: the caller records the mismatch); a flag that stays below it past
// the timeout is recorded here (kTimedOut). `seen` gets the last flag read.
__device__ Arrival WaitForEpoch(const uint64_t* flag, const GroupView& g, int32_t stage, int32_t peer,
                                uint64_t* seen) {
  uint64_t v = LoadAcquire(flag);
  const uint64_t start = GlobalTimer();
  while (v < g.epoch) {
    if (GlobalTimer() - start > g.timeout_ns) {
      *seen = v;
      Fail(g, kDiagTimeout, stage, peer, v);
      return kTimedOut;
    }
    __nanosleep(32);
    v = LoadAcquire(flag);
  }
  *seen = v;
  return v == g.epoch ? kArrived : kAhead;
}

// The last block of a data kernel to finish tells every peer that this rank is done
// with their buffers, then waits until every peer has said the same to this rank.
__device__ void Finish(const GroupView& g, SignalRegion* mine) {
  __shared__ bool last;
  __threadfence_system();  // This thread's peer stores/loads are complete system-wide.
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(&mine->layout.block_counter, 1u) == gridDim.x - 1;
    __threadfence();
  }
  __syncthreads();
  if (!last) return;
  if (threadIdx.x == 0) mine->layout.block_counter = 0;  // Every block has counted.
  __threadfence_system();
  if (threadIdx.x < g.size) {
    StoreRelease(&g.regions[threadIdx.x]->done[g.position], g.epoch);
    uint64_t seen = 0;
    if (WaitForEpoch(&mine->done[threadIdx.x], g, kStageDone, threadIdx.x, &seen) == kAhead) {
      Fail(g, kDiagMismatch, kStageDone, threadIdx.x, seen);  // That peer finished a later call.
    }
  }
  __threadfence_system();
}

// ---------------------------------------------------------------------------
// Notify: one block. Builds this rank's send lists (dispatch), publishes its counts
// and addresses to every member (warp w talks to member w), reads theirs, and
// derives the layout: the handle of a fresh dispatch, the receive ranges.

constexpr int kNotifyThreads = 512;

// Fresh dispatch: send_pos (list positions, before dropping), lists and counts from
// the destination mask, by a block-wide scan over tokens for every destination.
__device__ void BuildLists(const NotifyParams& p, int size, int* counts) {
  __shared__ int warp_prefix[kMaxRanks][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, num_warps = blockDim.x / 32;
  const int num_tokens = p.num_tokens;
  const int per = (num_tokens + blockDim.x - 1) / blockDim.x;
  const int t0 = min(num_tokens, static_cast<int>(threadIdx.x) * per), t1 = min(num_tokens, t0 + per);
  int mine[kMaxRanks], incl[kMaxRanks];
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) {
    mine[d] = 0;
    if (d < size) {
      for (int t = t0; t < t1; ++t) mine[d] += p.dest_mask[static_cast<int64_t>(t) * size + d] != 0;
    }
    int v = mine[d];
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int n = __shfl_up_sync(0xffffffffu, v, off);
      if (lane >= off) v += n;
    }
    incl[d] = v;
    if (lane == 31) warp_prefix[d][warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    for (int d = 0; d < size; ++d) {
      const int own = lane < num_warps ? warp_prefix[d][lane] : 0;
      int v = own;
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const int n = __shfl_up_sync(0xffffffffu, v, off);
        if (lane >= off) v += n;
      }
      if (lane < num_warps) warp_prefix[d][lane] = v - own;
      if (lane == 31) counts[d] = v;
    }
  }
  __syncthreads();
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) {
    if (d >= size) continue;
    int pos = warp_prefix[d][warp] + incl[d] - mine[d];
    for (int t = t0; t < t1; ++t) {
      const int64_t i = static_cast<int64_t>(t) * size + d;
      if (p.dest_mask[i] != 0) {
        p.send_pos[i] = pos;
        p.lists[static_cast<int64_t>(d) * num_tokens + pos] = t;
        ++pos;
      } else {
        p.send_pos[i] = -1;
      }
    }
  }
}

__global__ void __launch_bounds__(kNotifyThreads, 1) NotifyKernel(GroupView g, const __grid_constant__ NotifyParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int size = g.size;
  SignalRegion* mine = g.regions[g.position];
  Layout& layout = mine->layout;
  const int me = *p.axis_index;
  __shared__ int axis_of[kMaxRanks];
  __shared__ int counts[kMaxRanks];
  __shared__ int offset[kMaxRanks];
  __shared__ int aborted;
  // A GPU whose earlier call gave up (in this same program, so after its handler had
  // run) publishes nothing: its slots keep that call's content, so a peer still in
  // it reads and names that call, not this later one.
  if (threadIdx.x == 0) aborted = layout.fail_claimed != 0;
  if (threadIdx.x < kMaxRanks) counts[threadIdx.x] = 0;
  __syncthreads();
  if (aborted) {
    if (threadIdx.x == 0) layout.aborted = 1;
    return;
  }

  if (p.dest_mask != nullptr) {
    BuildLists(p, size, counts);
  } else if (p.kept_pos != nullptr) {  // Cached: the lists of the kept positions.
    const int64_t total = static_cast<int64_t>(p.num_tokens) * size;
    for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
      const int pos = p.kept_pos[i];
      if (pos >= 0 && pos < p.num_tokens) {  // Out of range: not a kept position (no write).
        p.lists[(i % size) * p.num_tokens + pos] = static_cast<int32_t>(i / size);
        atomicAdd(&counts[i % size], 1);  // Bounds what a receiver reads of this list.
      }
    }
  }
  __threadfence_system();  // The lists are complete before peers can see their address.
  __syncthreads();

  if (warp < size) {  // Publish into member `warp`'s slot for me: flag cleared, content, flag.
    Slot* slot = &g.regions[warp]->slots[g.position];
    volatile Slot* out = slot;
    if (lane == 0) out->flag = 0;
    __threadfence_system();
    __syncwarp();
    if (lane == 0) out->axis_index = me;
    if (lane < size) out->counts[lane] = counts[lane];
    if (lane < kMaxStreams) out->ptrs[lane] = p.ptrs[lane];
    if (lane < static_cast<int>(sizeof(OpSignature) / sizeof(int32_t))) {
      reinterpret_cast<volatile int32_t*>(&out->sig)[lane] = reinterpret_cast<const int32_t*>(&g.sig)[lane];
    }
    __threadfence_system();
    __syncwarp();
    if (lane == 0) StoreRelease(&slot->flag, g.epoch);
  }
  if (warp < size) {  // Read what member `warp` published for me.
    Slot* slot = &mine->slots[warp];
    const uint64_t delta = static_cast<uint64_t>(g.delta[warp]);
    int status = kArrived;
    uint64_t seen = 0;
    if (lane == 0) status = WaitForEpoch(&slot->flag, g, kStageNotify, warp, &seen);
    status = __shfl_sync(0xffffffffu, status, 0);
    int axis = -1;
    if (status != kTimedOut) {
      LoadAcquire(&slot->flag);  // Every lane acquires before reading the content.
      volatile Slot* in = slot;
      OpSignature theirs;
      int32_t* words = reinterpret_cast<int32_t*>(&theirs);
      for (int i = 0; i < static_cast<int>(sizeof(OpSignature) / sizeof(int32_t)); ++i) {
        words[i] = reinterpret_cast<volatile int32_t*>(&in->sig)[i];
      }
      const int published_axis = in->axis_index;
      const int count = lane < size ? in->counts[lane] : 0;
      const uint64_t ptr = lane < kMaxStreams ? in->ptrs[lane] : 0;
      __threadfence_system();
      __syncwarp();
      if (lane == 0 && status == kArrived) {
        const uint64_t again = LoadAcquire(&slot->flag);  // Unchanged: the content is this call's.
        if (again != g.epoch) {
          status = kAhead;
          seen = again;
        } else if (!SameSignature(theirs, g.sig)) {
          status = kAhead;  // Same epoch, another op or shape: a mismatch all the same.
        }
      }
      status = __shfl_sync(0xffffffffu, status, 0);
      if (status == kArrived) {
        axis = published_axis;
        if (axis >= 0 && axis < size) {
          if (lane < size) layout.counts[axis][lane] = count;
          // In this rank's address space (the publisher's own, plus its delta).
          if (lane < kMaxStreams) layout.ptrs[axis][lane] = ptr + delta;
        }
      } else if (lane == 0) {
        Fail(g, kDiagMismatch, kStageNotify, warp, seen, &theirs);
      }
    }
    if (lane == 0 && status != kArrived) aborted = 1;
    if (lane == 0) axis_of[warp] = axis;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned seen = 0;
    for (int w = 0; w < size; ++w) {
      if (axis_of[w] >= 0 && axis_of[w] < size) seen |= 1u << axis_of[w];
    }
    if (!aborted && (seen != (1u << size) - 1 || me < 0 || me >= size)) {
      Fail(g, kDiagBadAxis, kStageNotify, 0, 0);
      aborted = 1;
    }
    layout.aborted = aborted;
  }
  __syncthreads();
  if (aborted) return;

  if (threadIdx.x < size) {
    const int d = threadIdx.x;  // As a destination: where my rows start there.
    int off = 0;
    for (int s = 0; s < me; ++s) off += layout.counts[s][d];
    offset[d] = off;
    if (p.dest_offset != nullptr) p.dest_offset[d] = off;
    const int s = threadIdx.x;  // As a source: how many of its rows I keep.
    int start = 0;
    for (int r = 0; r < s; ++r) start += layout.counts[r][me];
    if (p.recv_count != nullptr) p.recv_count[s] = max(0, min(p.max_recv - start, layout.counts[s][me]));
  }
  if (threadIdx.x == 0) {
    // Rows from source s follow those of sources < s; rows past max_recv are dropped.
    int start = 0;
    for (int s = 0; s < size; ++s) {
      layout.recv_start[s] = start;
      // Cached: the handle's count, never more than the source's list holds.
      const int count = p.cached_recv != nullptr ? min(p.cached_recv[s], layout.counts[s][me]) : layout.counts[s][me];
      start += max(0, min(count, p.max_recv - start));
    }
    layout.recv_start[size] = start;
    layout.my_axis_index = me;
  }
  __syncthreads();
  if (p.send_pos != nullptr) {  // Positions whose row would be past max_recv: dropped (-1).
    const int64_t total = static_cast<int64_t>(p.num_tokens) * size;
    for (int64_t i = threadIdx.x; i < total; i += blockDim.x) {
      const int pos = p.send_pos[i];
      if (pos >= 0 && offset[i % size] + pos >= p.max_recv) p.send_pos[i] = -1;
    }
  }
}

// ---------------------------------------------------------------------------
// Dispatch: each rank pulls its receive rows. Row `row` of source s is token
// list_s[me][row - start[s]] of s; its data is loaded from s's inputs and stored
// into this rank's outputs.

// Rows of at least this many bytes, in 16-byte vectors (hidden states), move a
// warp per row; the others (routing metadata, FP8 scales) a vector per thread.
constexpr int kLongRow = 1024;
constexpr int kCopyUnroll = 8;  // Vectors in flight per lane: the copy is latency-bound.

struct Sources {
  const char* base[kMaxStreams - 1][kMaxRanks];  // [stream][source axis index]
  const int32_t* list[kMaxRanks];               // source s's list for me
  int start[kMaxRanks + 1];
};

// (source, position in its list) of a receive row.
__device__ __forceinline__ int SourceOf(const Sources& src, int size, int row) {
  int s = 0;
  while (s + 1 < size && row >= src.start[s + 1]) ++s;
  return s;
}

// Source s's token of receive row `row`, or -1 when the list holds no valid token
// there (only a handle not made by this library's dispatch gives such lists): that
// row is then zeroed instead of read.
__device__ __forceinline__ int TokenOf(const Sources& src, int s, int row, int num_tokens) {
  const int t = src.list[s][row - src.start[s]];
  return t >= 0 && t < num_tokens ? t : -1;
}

template <int W>
__device__ __forceinline__ void PullSmall(const Stream& st, int index, const Sources& src, int size, int me,
                                          int num_recv, int num_tokens, int64_t tid, int64_t nthreads) {
  using V = typename VecOf<W>::T;
  const int nvec = st.bytes / W;
  const int64_t total = static_cast<int64_t>(num_recv) * nvec;
  for (int64_t idx = tid; idx < total; idx += nthreads) {
    const int row = static_cast<int>(idx / nvec), i = static_cast<int>(idx % nvec);
    const int s = SourceOf(src, size, row);
    const int t = TokenOf(src, s, row, num_tokens);
    V v{};
    if (t >= 0) {
      v = __ldg(reinterpret_cast<const V*>(src.base[index][s] + t * st.tok_stride + me * st.dest_stride) + i);
    }
    reinterpret_cast<V*>(st.dst + static_cast<int64_t>(row) * st.bytes)[i] = v;
  }
}

__device__ __forceinline__ bool IsLong(const Stream& st) { return st.bytes >= kLongRow && st.width == 16; }

// Copies two rows at once (the second is absent when dst1 is null), so that each
// lane has 2 x kCopyUnroll vectors in flight: the copy is bound by load latency. A
// null source gives a zero row.

__device__ __forceinline__ void PullRows(const char* src0, char* dst0, const char* src1, char* dst1, int bytes,
                                         int lane) {
  using V = int4;
  const int nvec = bytes / 16;
  const V* in0 = reinterpret_cast<const V*>(src0);
  const V* in1 = reinterpret_cast<const V*>(src1);
  V* out0 = reinterpret_cast<V*>(dst0);
  V* out1 = reinterpret_cast<V*>(dst1);
  for (int base = 0; base < nvec; base += 32 * kCopyUnroll) {
    V v0[kCopyUnroll], v1[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int i = base + u * 32 + lane;
      if (i < nvec) v0[u] = in0 != nullptr ? __ldg(in0 + i) : V{};
      if (i < nvec && out1 != nullptr) v1[u] = in1 != nullptr ? __ldg(in1 + i) : V{};
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int i = base + u * 32 + lane;
      if (i < nvec) out0[i] = v0[u];
      if (i < nvec && out1 != nullptr) out1[i] = v1[u];
    }
  }
}

template <int W>
__device__ __forceinline__ void Fill(char* dst, int64_t bytes, int64_t tid, int64_t nthreads) {
  using V = typename VecOf<W>::T;
  V zero{};
  V* out = reinterpret_cast<V*>(dst);
  for (int64_t i = tid; i < bytes / W; i += nthreads) out[i] = zero;
}

__global__ void __launch_bounds__(kThreads) DispatchKernel(GroupView g, const __grid_constant__ DispatchParams p) {
  __shared__ Sources src;
  SignalRegion* mine = g.regions[g.position];
  const Layout& layout = mine->layout;
  if (layout.aborted) return;  // The notify step failed (recorded); nothing is valid.
  const int size = g.size;
  const int me = layout.my_axis_index;
  for (int i = threadIdx.x; i < (kMaxStreams - 1) * kMaxRanks; i += blockDim.x) {
    const int k = i / kMaxRanks, s = i % kMaxRanks;
    src.base[k][s] = s < size && k < p.num_streams ? reinterpret_cast<const char*>(layout.ptrs[s][k]) : nullptr;
  }
  if (threadIdx.x < kMaxRanks) {
    const int s = threadIdx.x;
    src.list[s] = s < size ? reinterpret_cast<const int32_t*>(layout.ptrs[s][p.num_streams]) +
                                 static_cast<int64_t>(me) * p.num_tokens
                           : nullptr;
  }
  if (threadIdx.x <= kMaxRanks) src.start[threadIdx.x] = layout.recv_start[min(static_cast<int>(threadIdx.x), size)];
  __syncthreads();
  const int num_recv = src.start[size];
  const int lane = threadIdx.x % 32;
  const int warps_per_block = blockDim.x / 32;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;

  // Short rows and source token ids: a vector per thread, loads independent.
  for (int k = 0; k < p.num_streams; ++k) {
    const Stream& st = p.streams[k];
    if (IsLong(st)) continue;
    JMD_SWITCH_WIDTH(st.width, PullSmall<W>(st, k, src, size, me, num_recv, p.num_tokens, tid, nthreads));
  }
  if (p.recv_token != nullptr) {
    for (int64_t row = tid; row < num_recv; row += nthreads) {
      const int s = SourceOf(src, size, static_cast<int>(row));
      p.recv_token[row] = TokenOf(src, s, static_cast<int>(row), p.num_tokens);
    }
  }
  // Long rows: a warp per two rows (row and row + total_warps), copied together.
  const int warp = blockIdx.x * warps_per_block + threadIdx.x / 32;
  const int total_warps = gridDim.x * warps_per_block;
  for (int row = warp; row < num_recv; row += 2 * total_warps) {
    const int row1 = row + total_warps;
    const bool two = row1 < num_recv;
    const int s0 = SourceOf(src, size, row), s1 = two ? SourceOf(src, size, row1) : 0;
    const int64_t t0 = TokenOf(src, s0, row, p.num_tokens);
    const int64_t t1 = two ? TokenOf(src, s1, row1, p.num_tokens) : -1;
    for (int k = 0; k < p.num_streams; ++k) {
      const Stream& st = p.streams[k];
      if (!IsLong(st)) continue;
      const char* in0 = t0 >= 0 ? src.base[k][s0] + t0 * st.tok_stride + me * st.dest_stride : nullptr;
      const char* in1 = t1 >= 0 ? src.base[k][s1] + t1 * st.tok_stride + me * st.dest_stride : nullptr;
      char* out0 = st.dst + static_cast<int64_t>(row) * st.bytes;
      char* out1 = two ? st.dst + static_cast<int64_t>(row1) * st.bytes : nullptr;
      PullRows(in0, out0, in1, out1, st.bytes, lane);
    }
  }
  // Padding rows [num_recv, max_recv): zeros (token ids: -1).
  for (int k = 0; k < p.num_streams; ++k) {
    const Stream& st = p.streams[k];
    char* begin = st.dst + static_cast<int64_t>(num_recv) * st.bytes;
    const int64_t bytes = static_cast<int64_t>(p.max_recv - num_recv) * st.bytes;
    JMD_SWITCH_WIDTH(st.width, Fill<W>(begin, bytes, tid, nthreads));
  }
  if (p.recv_token != nullptr) {
    for (int64_t i = num_recv + tid; i < p.max_recv; i += nthreads) p.recv_token[i] = -1;
  }
  Finish(g, mine);
}

// ---------------------------------------------------------------------------
// Combine: warp per token; loads the token's rows from every rank it went to,
// sums them in float32 in ascending rank order, stores the result locally.

template <typename T> struct Elem;
template <> struct Elem<float> {
  static constexpr int kPerVec = 4;
  __device__ static void Add(float* acc, const int4& v) {
    acc[0] += __int_as_float(v.x); acc[1] += __int_as_float(v.y);
    acc[2] += __int_as_float(v.z); acc[3] += __int_as_float(v.w);
  }
  __device__ static int4 Pack(const float* acc) {
    return make_int4(__float_as_int(acc[0]), __float_as_int(acc[1]), __float_as_int(acc[2]), __float_as_int(acc[3]));
  }
  __device__ static float ToFloat(float v) { return v; }
  __device__ static float FromFloat(float v) { return v; }
};
template <typename H2, typename H, float2 (*ToF2)(H2), H2 (*FromF2)(float, float), float (*ToF)(H), H (*FromF)(float)>
struct HalfElem {
  static constexpr int kPerVec = 8;
  __device__ static void Add(float* acc, const int4& v) {
    const H2* h = reinterpret_cast<const H2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = ToF2(h[i]);
      acc[2 * i] += f.x;
      acc[2 * i + 1] += f.y;
    }
  }
  __device__ static int4 Pack(const float* acc) {
    int4 v;
    H2* h = reinterpret_cast<H2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = FromF2(acc[2 * i], acc[2 * i + 1]);
    return v;
  }
  __device__ static float ToFloat(H v) { return ToF(v); }
  __device__ static H FromFloat(float v) { return FromF(v); }
};
__device__ float2 Bf2ToF2(__nv_bfloat162 v) { return __bfloat1622float2(v); }
__device__ __nv_bfloat162 F2ToBf2(float a, float b) { return __floats2bfloat162_rn(a, b); }
__device__ float BfToF(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __nv_bfloat16 FToBf(float v) { return __float2bfloat16_rn(v); }
__device__ float2 H2ToF2(__half2 v) { return __half22float2(v); }
__device__ __half2 F2ToH2(float a, float b) { return __floats2half2_rn(a, b); }
__device__ float HToF(__half v) { return __half2float(v); }
__device__ __half FToH(float v) { return __float2half_rn(v); }
template <> struct Elem<__nv_bfloat16> : HalfElem<__nv_bfloat162, __nv_bfloat16, Bf2ToF2, F2ToBf2, BfToF, FToBf> {};
template <> struct Elem<__half> : HalfElem<__half2, __half, H2ToF2, F2ToH2, HToF, FToH> {};

template <typename T, int RB>
__global__ void __launch_bounds__(kThreads) CombineKernel(GroupView g, const __grid_constant__ CombineParams p) {
  constexpr int kUnroll = 16 / RB;  // Vectors in flight per lane: RB sources x kUnroll.
  constexpr int kPerVec = Elem<T>::kPerVec;
  __shared__ const T* src_base[RB];
  __shared__ int offset[RB];
  SignalRegion* mine = g.regions[g.position];
  if (mine->layout.aborted) return;  // The notify step failed (recorded); nothing is valid.
  const int size = g.size;
  if (threadIdx.x < RB) {
    const int d = threadIdx.x;
    src_base[d] = d < size ? reinterpret_cast<const T*>(mine->layout.ptrs[d][0]) : nullptr;
    offset[d] = d < size ? p.dest_offset[d] : 0;
  }
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int warps_per_block = blockDim.x / 32;
  const int total_warps = gridDim.x * warps_per_block;
  const int hidden = p.hidden;
  const bool vectorized = (static_cast<int64_t>(hidden) * sizeof(T)) % 16 == 0;

  for (int t = blockIdx.x * warps_per_block + threadIdx.x / 32; t < p.num_tokens; t += total_warps) {
    int row = -1;
    if (lane < size) {
      const int pos = p.send_pos[static_cast<int64_t>(t) * size + lane];
      // Rows outside the M rows every rank holds (signature-checked) are never read.
      if (pos >= 0 && offset[lane] >= 0 && static_cast<int64_t>(offset[lane]) + pos < p.max_recv) {
        row = offset[lane] + pos;
      }
    }
    const T* src[RB];
#pragma unroll
    for (int d = 0; d < RB; ++d) {
      const int r = __shfl_sync(0xffffffffu, row, d);
      src[d] = r >= 0 ? src_base[d] + static_cast<int64_t>(r) * hidden : nullptr;
    }
    T* out = reinterpret_cast<T*>(p.out) + static_cast<int64_t>(t) * hidden;
    if (vectorized) {
      const int nvec = hidden / kPerVec;
      for (int base = 0; base < nvec; base += 32 * kUnroll) {
        int4 v[RB][kUnroll];
#pragma unroll
        for (int d = 0; d < RB; ++d) {
          if (src[d] == nullptr) continue;
#pragma unroll
          for (int u = 0; u < kUnroll; ++u) {
            const int i = base + u * 32 + lane;
            if (i < nvec) v[d][u] = __ldg(reinterpret_cast<const int4*>(src[d]) + i);
          }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int i = base + u * 32 + lane;
          if (i >= nvec) continue;
          float acc[kPerVec];
#pragma unroll
          for (int e = 0; e < kPerVec; ++e) acc[e] = 0.0f;
#pragma unroll
          for (int d = 0; d < RB; ++d) {
            if (src[d] != nullptr) Elem<T>::Add(acc, v[d][u]);
          }
          reinterpret_cast<int4*>(out)[i] = Elem<T>::Pack(acc);
        }
      }
    } else {
      for (int i = lane; i < hidden; i += 32) {
        float acc = 0.0f;
#pragma unroll
        for (int d = 0; d < RB; ++d) {
          if (src[d] != nullptr) acc += Elem<T>::ToFloat(src[d][i]);
        }
        out[i] = Elem<T>::FromFloat(acc);
      }
    }
  }
  Finish(g, mine);
}

// The rank count rounded up to 2, 4 or 8: the kernel's static loop bound.
template <typename T>
cudaError_t LaunchCombineAs(const GroupView& g, const CombineParams& p, int blocks, cudaStream_t stream) {
  if (g.size <= 2) {
    CombineKernel<T, 2><<<blocks, kThreads, 0, stream>>>(g, p);
  } else if (g.size <= 4) {
    CombineKernel<T, 4><<<blocks, kThreads, 0, stream>>>(g, p);
  } else {
    CombineKernel<T, 8><<<blocks, kThreads, 0, stream>>>(g, p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchNotify(const GroupView& g, const NotifyParams& p, cudaStream_t stream) {
  NotifyKernel<<<1, kNotifyThreads, 0, stream>>>(g, p);
  return cudaGetLastError();
}

cudaError_t LaunchDispatch(const GroupView& g, const DispatchParams& p, int num_blocks, cudaStream_t stream) {
  DispatchKernel<<<num_blocks, kThreads, 0, stream>>>(g, p);
  return cudaGetLastError();
}

cudaError_t LaunchCombine(const GroupView& g, const CombineParams& p, int num_blocks, cudaStream_t stream) {
  switch (p.dtype) {
    case Dtype::kF32: return LaunchCombineAs<float>(g, p, num_blocks, stream);
    case Dtype::kBF16: return LaunchCombineAs<__nv_bfloat16>(g, p, num_blocks, stream);
    case Dtype::kF16: return LaunchCombineAs<__half>(g, p, num_blocks, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace jmd

namespace jmd {
namespace {

// The done handshake alone, for ops whose data kernels live elsewhere (hybrid.cu).
__global__ void FinishKernel(GroupView g) {
  SignalRegion* mine = g.regions[g.position];
  if (mine->layout.aborted) return;  // The notify step failed (recorded).
  Finish(g, mine);
}

}  // namespace

cudaError_t LaunchFinish(const GroupView& g, cudaStream_t stream) {
  FinishKernel<<<1, 32, 0, stream>>>(g);
  return cudaGetLastError();
}

}  // namespace jmd
