// Host side: the expert-parallel groups this process takes part in, and their memory.
//
// A group is either driven by one process (CreateGroup: every GPU of the group is
// local, peers are reached through CUDA peer access) or spans processes, one rank
// per process (CreateExported + OpenPeers: each rank allocates its signal region
// and staging buffer as one cudaMalloc allocation, exports it through CUDA IPC, and
// maps its peers' allocations; the caller carries the exported blobs between
// processes). The kernels see the same GroupView either way (protocol.h).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "protocol.h"

namespace jmd {

// One rank's membership in a group. Shared by the registry and the handlers: a
// handler holds a reference from FindMember until its launches are enqueued, and
// the registry frees nothing of a member while a handler holds it (and waits for
// the device, so nothing launched still uses it).
struct Member {
  int device = -1;                     // CUDA ordinal of this rank's GPU in this process.
  int position = -1;                   // index in the group (axis order).
  int size = 0;                        // ranks in the group.
  std::vector<int> local_devices;      // the group's GPUs driven by this process.
  std::vector<std::string> names;      // by position, for messages: "GPU 3", "process 2 (GPU 0)".
  SignalRegion* regions[kMaxRanks] = {};  // by position; regions[position] is this rank's.
  int64_t delta[kMaxRanks] = {};       // by position (protocol.h); all 0 in one process.
  // Groups spanning processes: this rank's allocation (region, then staging) and
  // the peers' allocations mapped here (by position; null for this rank).
  char* allocation = nullptr;
  char* staging = nullptr;             // null in one process: inputs are read in place.
  size_t staging_bytes = 0;
  void* mapped[kMaxRanks] = {};
  Diag* diag_host = nullptr;           // host-mapped.
  Diag* diag_device = nullptr;
  uint64_t epoch = 0;                  // calls launched by this rank so far.
  std::atomic<uint64_t> timeout_ns{0};
  // The stream of this rank's first call since set-up or reset: every later call
  // must run on it (the protocol relies on the calls' program order).
  void* stream = nullptr;
};

// Allocates a SignalRegion on every device, enables peer access between all
// pairs and registers the group (one process drives all of it). A device already
// in another group leaves it (that group is freed); the same group again is kept
// with its state (only the timeout changes). Returns "" or the reason it failed.
std::string CreateGroup(const std::vector<int>& devices, double timeout_s);

// Bytes of the blob CreateExported writes: this rank's IPC handle and addresses.
size_t ExportedBytes();

// First step of a rank of a group that spans processes: allocates this rank's
// signal region and a staging buffer of `staging_bytes` on `device` as one
// IPC-exportable allocation and writes into `blob` what peers need to map it. The
// rank is pending (not usable) until OpenPeers. Any group `device` was in is freed.
std::string CreateExported(int device, int position, int size, double timeout_s, size_t staging_bytes,
                           std::string* blob);

// Second step: maps every peer's allocation (blobs by position, this rank's own
// included) and makes the pending rank on `device` usable. `names` (by position)
// name the ranks in error messages. On failure the pending rank is freed.
std::string OpenPeers(int device, const std::vector<std::string>& blobs, const std::vector<std::string>& names);

// Sets the timeout of the rank on `device` (it must exist).
std::string SetTimeout(int device, double timeout_s);

// Takes this process's ranks of groups spanning processes out of use: waits for
// their devices and closes their mappings of the peers' allocations, keeping their
// own (peers may still map them) until FreeAll(true).
std::string ClosePeers();

// Frees every group: synchronises each device and closes the peers' IPC mappings
// first. Allocations exported to other processes are freed only if `exported`
// (every peer must have closed its mappings of them: see ClosePeers); otherwise
// they are kept until a later FreeAll(true) or the end of the process.
std::string FreeAll(bool exported);

// Waits until this process's GPUs of every group are idle.
std::string SynchronizeAll();

// Zeroes this process's signal regions and call counters (its devices must be
// idle; in a group spanning processes, every process must reset before any issues
// a new call: the caller synchronises them).
std::string ResetAll();

// The usable member for a CUDA device ordinal, or null. The registry frees no
// member a caller still holds (see Member).
std::shared_ptr<Member> FindMember(int device);

// A description of the last kernel failure recorded on `device`, or "".
std::string LastError(int device);

// The same for a member the caller holds (takes no lock).
std::string LastError(const Member& m);

// The words for a recorded failure of the rank at `self` (pure; tested on
// machines without GPUs). `names` name the group's ranks by position.
std::string DescribeDiag(const Diag& d, const std::vector<std::string>& names, int self, uint64_t timeout_ns);

// "dispatch(T=.., M=.., ...)": an op signature in words, for messages.
std::string DescribeSignature(const OpSignature& s);

// Free and total bytes of device memory on `device` (cudaMemGetInfo), for leak checks.
std::string MemoryInfo(int device, size_t* free_bytes, size_t* total_bytes);

// Whether GPU `device` can read, in place, a buffer at `ptr` that XLA allocated on
// GPU `owner_device` (what one-process groups rely on): device memory, peer access,
// and, for memory of a stream-ordered pool (XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async),
// the pool's access grant. "" if so, else why.
std::string CheckPeerReadable(int device, const void* ptr, int owner_device);

// Bytes of device memory one rank's signal region takes.
size_t RegionBytes();

}  // namespace jmd
