// Host side: the expert-parallel groups of local GPUs and their signal regions.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "protocol.h"

namespace jmd {

// One GPU's membership in a group. Owned by the registry; handlers borrow it.
struct Member {
  int device = -1;
  int position = -1;
  std::vector<int> devices;            // the whole group, by position.
  SignalRegion* regions[kMaxRanks] = {};
  Diag* diag_host = nullptr;           // host-mapped.
  Diag* diag_device = nullptr;
  uint64_t epoch = 0;                  // calls issued on this device so far.
  uint64_t timeout_ns = 0;
};

// Allocates a SignalRegion on every device, enables peer access between all
// pairs and registers the group. A device already in another group leaves it
// (that group is freed). Returns an empty string or the reason it failed.
std::string CreateGroup(const std::vector<int>& devices, double timeout_s);

// Frees every group (synchronising its devices first).
std::string FreeAll();

// Zeroes every signal region and epoch (all devices must be idle).
std::string ResetAll();

// The member for a CUDA device ordinal, or nullptr.
Member* FindMember(int device);

// A description of the last kernel failure recorded on `device`, or "".
std::string LastError(int device);

// The words for a recorded failure (pure; tested on machines without GPUs).
std::string DescribeDiag(const Diag& d, const std::vector<int>& devices, uint64_t timeout_ns);

// Bytes of device memory the registry holds on each device.
size_t RegionBytes();

}  // namespace jmd
