// Hopper (sm_90) bulk copies between global and shared memory, as small wrappers
// of the PTX instructions (PTX ISA: "Data movement and conversion instructions:
// cp.async.bulk", "Parallel synchronization: mbarrier", "membar/fence"). They are
// the building blocks of rows.cuh's bulk row copy and compile only for
// __CUDA_ARCH__ >= 900 (JMD_BULK_COPIES is then 1).
//
// The two directions complete differently:
//   * global -> shared completes on an mbarrier: the issuing thread announces the
//     bytes (MbarArriveExpectTx), issues the copy (BulkLoad), and the phase of the
//     barrier completes once every byte has landed; waiters then see the data
//     (MbarWait);
//   * shared -> global (BulkStore) belongs to the issuing thread's current bulk
//     async-group: BulkCommit closes the group, BulkWaitRead<N> waits until at most
//     N of the thread's groups still read shared memory (the buffer may then be
//     overwritten). Groups are per thread.
// Addresses and sizes are multiples of 16 bytes. The global side takes any global
// address, a peer GPU's mapped memory included.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define JMD_BULK_COPIES 1
#else
#define JMD_BULK_COPIES 0
#endif

namespace jmd {

#if JMD_BULK_COPIES

// The 32-bit shared-window address of a shared-memory pointer (the PTX operands).
__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Initializes the mbarrier at `bar` for `arrivals` arrivals per phase.
__device__ __forceinline__ void MbarInit(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(SharedAddress(bar)), "r"(arrivals) : "memory");
}

// Makes this thread's earlier generic-proxy writes to shared memory (an mbarrier's
// initialization, data) visible to the async proxy, which the bulk copies use.
__device__ __forceinline__ void FenceProxyAsyncShared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Arrives on `bar` and expects `bytes` more bytes of transactions in its phase.
__device__ __forceinline__ void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SharedAddress(bar)), "r"(bytes)
               : "memory");
}

// Waits until the phase of `bar` with parity `parity` (0 or 1) has completed.
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = SharedAddress(bar);
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n"
        "}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  }
}

// Copies `bytes` from global `src` into shared `dst`; completes `bytes` of
// transactions on `bar` (announced with MbarArriveExpectTx).
__device__ __forceinline__ void BulkLoad(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
          SharedAddress(dst)),
      "l"(src), "r"(bytes), "r"(SharedAddress(bar))
      : "memory");
}

// Copies `bytes` from shared `src` to global `dst`, in this thread's current bulk
// async-group.
__device__ __forceinline__ void BulkStore(void* dst, const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst), "r"(SharedAddress(src)),
               "r"(bytes)
               : "memory");
}

// Closes this thread's current bulk async-group (an empty one when it issued none).
__device__ __forceinline__ void BulkCommit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }

// Waits until at most N of this thread's committed bulk async-groups still read
// their shared-memory sources.
template <int N>
__device__ __forceinline__ void BulkWaitRead() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

#endif  // JMD_BULK_COPIES

}  // namespace jmd
