// The signalling protocol shared by the host code and the kernels.
//
// Every rank of an expert-parallel group owns one small SignalRegion in device
// memory that the other ranks of the group can write. Rows never pass through it:
// both ops pull. Dispatch loads each received row from the sender's inputs into the
// receiver's output; combine loads each token's rows from the experts' inputs into
// the source's output. The region only carries, per call ("epoch"):
//   * slots[g]: what group member g published for this call (its index on the JAX
//     axis, the op's signature, its row counts to every destination, the addresses
//     of its inputs), written by g into every member's region: flag cleared first,
//     flag (= epoch) stored last;
//   * done[g]: the epoch at which member g finished touching this member's buffers;
//   * layout: this member's private result of the notify step.
// Every rank issues the same calls in the same order (one SPMD program), so a host
// counter per rank gives all ranks the same epoch for the same call; it advances
// only once the call's first kernel is launched. A reader accepts a slot only when
// its flag equals its own epoch and the publisher's OpSignature equals its own
// (and the flag is unchanged after reading the content); a flag ahead of its epoch,
// or another signature, ends the call on that rank with kDiagMismatch. Any failure
// aborts the call (the data kernels then touch no peer memory) and is recorded.
//
// How a rank reaches its peers' memory is the only difference between the two
// ways of running a group:
//   * one process drives every GPU of the group: regions are reached through CUDA
//     peer access, and the published addresses are the XLA input buffers
//     themselves (one address space, GroupView::delta is 0);
//   * one process per rank (jax.distributed): XLA's buffers cannot be exported
//     through CUDA IPC, so each rank first copies its inputs into its own staging
//     buffer (cudaMalloc'd next to its region, one IPC allocation) and publishes
//     addresses in its own address space; peers map that allocation with
//     cudaIpcOpenMemHandle and add delta[publisher] (mapped base - published base)
//     to every address they read from a slot.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define JMD_HOST_DEVICE __host__ __device__
#else
#define JMD_HOST_DEVICE
#endif

namespace jmd {

inline constexpr int kMaxRanks = 8;     // ranks of one group (one node).
inline constexpr int kMaxStreams = 8;   // buffer addresses one rank publishes per call.
inline constexpr int kThreads = 512;    // threads per block of the data kernels.

// What kind of call a rank is in, and the shapes every rank of the call must share.
enum OpKind : int32_t {
  kOpNone = 0,
  kOpDispatch = 1,
  kOpDispatchCached = 2,
  kOpCombine = 3,
  kOpHybridDispatch = 4,
  kOpHybridDispatchCached = 5,
  kOpHybridCombine = 6,
};

// Published with every call; peers compare it field by field before trusting a
// slot. Dispatch: one row_bytes per stream; combine: row_bytes[0] is a row's bytes.
struct OpSignature {
  int32_t kind;                    // OpKind.
  int32_t num_tokens;              // T.
  int32_t max_recv;                // M: receive rows (combine: rows it reads).
  int32_t num_streams;             // arrays moved (combine: 1).
  int32_t num_payloads;            // dispatch: whole-row arrays before the sliced ones.
  int32_t dtype;                   // combine: Dtype (kernels.h); dispatch: 0.
  int32_t row_bytes[kMaxStreams];  // bytes of one received row of each stream.
};

JMD_HOST_DEVICE inline bool SameSignature(const OpSignature& a, const OpSignature& b) {
  if (a.kind != b.kind || a.num_tokens != b.num_tokens || a.max_recv != b.max_recv ||
      a.num_streams != b.num_streams || a.num_payloads != b.num_payloads || a.dtype != b.dtype) {
    return false;
  }
  for (int i = 0; i < kMaxStreams; ++i) {
    if (a.row_bytes[i] != b.row_bytes[i]) return false;
  }
  return true;
}

struct alignas(64) Slot {
  uint64_t flag;                 // epoch of the content below; stored last (release).
  OpSignature sig;               // the call the publisher is in.
  int32_t axis_index;            // publisher's index on the JAX axis.
  int32_t counts[kMaxRanks];     // publisher's rows for each destination (axis order).
  uint64_t ptrs[kMaxStreams];    // publisher's buffer addresses for this call.
};

struct Layout {
  int32_t counts[kMaxRanks][kMaxRanks];   // [source axis index][destination axis index].
  uint64_t ptrs[kMaxRanks][kMaxStreams];  // [axis index][stream]: published addresses.
  int32_t recv_start[kMaxRanks + 1];      // my receive rows from source s: [start[s], start[s+1]).
  int32_t my_axis_index;
  int32_t aborted;                        // the notify step failed: data kernels do nothing.
  uint32_t block_counter;                 // last-block detection in the data kernels.
  int32_t fail_claimed;                   // 0 until a kernel claims the Diag (atomicCAS).
};

struct SignalRegion {
  Slot slots[kMaxRanks];                        // slots[g]: written by group member g.
  alignas(64) uint64_t done[kMaxRanks];         // done[g]: written by group member g.
  alignas(64) Layout layout;                    // private to the owning GPU.
};

// Written by a kernel (in host-mapped memory) just before it traps, so that the
// host can say what went wrong after the CUDA context has failed.
// The first failure on a GPU is kept: a kernel claims the Diag (atomicCAS on its
// region's Layout::fail_claimed), fills it, and stores `code` last.
enum DiagCode : int32_t { kDiagNone = 0, kDiagTimeout = 1, kDiagBadAxis = 2, kDiagMismatch = 3 };
enum DiagStage : int32_t { kStageNotify = 0, kStageDone = 1 };

struct Diag {
  int32_t code;
  int32_t stage;
  int32_t peer;       // group member that did not arrive, or that differs.
  int32_t device;
  uint64_t epoch;
  uint64_t seen;      // the last flag value read.
  OpSignature mine;   // kDiagMismatch: this rank's call ...
  OpSignature theirs; // ... and the peer's (as published with flag `seen`).
};

// What a kernel needs to know about its group; passed by value.
struct GroupView {
  SignalRegion* regions[kMaxRanks];  // by group position; peers' through P2P or IPC.
  int64_t delta[kMaxRanks];          // by group position: added to the addresses it publishes.
  Diag* diag;                        // device view of this GPU's host-mapped Diag.
  int32_t size;
  int32_t position;                  // this GPU's position in the group.
  int32_t device;
  uint64_t epoch;
  uint64_t timeout_ns;
  OpSignature sig;                   // this call's; published in the notify step.
};

}  // namespace jmd
