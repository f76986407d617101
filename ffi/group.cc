#include "group.h"

#include <cuda_runtime.h>

#include <new>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace jmd {
namespace {

std::mutex g_mutex;
// device ordinal -> member; members of one group share the `devices` list.
std::map<int, std::unique_ptr<Member>> g_members;

std::string CudaError(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

// Restores the calling thread's current device on scope exit.
struct DeviceGuard {
  int saved = 0;
  DeviceGuard() { cudaGetDevice(&saved); }
  ~DeviceGuard() { cudaSetDevice(saved); }
};

// The Diag lives in our own page of host memory, registered with CUDA, so it stays
// readable after a failed kernel takes the CUDA context down.
cudaError_t AllocDiag(Diag** host, Diag** device) {
  void* page = std::aligned_alloc(4096, 4096);
  if (page == nullptr) return cudaErrorMemoryAllocation;
  *host = new (page) Diag{};
  cudaError_t err = cudaHostRegister(page, 4096, cudaHostRegisterMapped | cudaHostRegisterPortable);
  if (err == cudaSuccess) err = cudaHostGetDevicePointer(reinterpret_cast<void**>(device), page, 0);
  if (err != cudaSuccess) {
    std::free(page);
    *host = nullptr;
  }
  return err;
}

void FreeDiag(Diag* host) {
  if (host == nullptr) return;
  cudaHostUnregister(host);
  std::free(host);
}

void FreeMemberLocked(Member& m) {
  cudaSetDevice(m.device);
  cudaDeviceSynchronize();
  if (m.regions[m.position] != nullptr) cudaFree(m.regions[m.position]);
  FreeDiag(m.diag_host);
  m.regions[m.position] = nullptr;
  m.diag_host = nullptr;
}

// Frees the groups that contain any of `devices`.
void FreeGroupsOfLocked(const std::vector<int>& devices) {
  std::vector<int> doomed;
  for (int d : devices) {
    auto it = g_members.find(d);
    if (it == g_members.end()) continue;
    for (int other : it->second->devices) doomed.push_back(other);
  }
  std::sort(doomed.begin(), doomed.end());
  doomed.erase(std::unique(doomed.begin(), doomed.end()), doomed.end());
  for (int d : doomed) {
    auto it = g_members.find(d);
    if (it == g_members.end()) continue;
    FreeMemberLocked(*it->second);
    g_members.erase(it);
  }
}

}  // namespace

std::string CreateGroup(const std::vector<int>& devices, double timeout_s) {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceGuard guard;
  const int n = static_cast<int>(devices.size());
  if (n < 1 || n > kMaxRanks) {
    return "a group has 1.." + std::to_string(kMaxRanks) + " GPUs, got " + std::to_string(n);
  }
  int count = 0;
  if (cudaError_t err = cudaGetDeviceCount(&count); err != cudaSuccess) {
    return CudaError("cudaGetDeviceCount", err);
  }
  for (int i = 0; i < n; ++i) {
    if (devices[i] < 0 || devices[i] >= count) {
      return "device ordinal " + std::to_string(devices[i]) + " is not one of the " +
             std::to_string(count) + " visible GPUs";
    }
    for (int j = 0; j < i; ++j) {
      if (devices[i] == devices[j]) return "a GPU appears twice in the group";
    }
  }
  // The same group again: keep it (and its epochs, which running programs rely on).
  auto first = g_members.find(devices[0]);
  if (first != g_members.end() && first->second->devices == devices) {
    for (int d : devices) g_members[d]->timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
    return "";
  }
  FreeGroupsOfLocked(devices);

  // Peer access between every pair (XLA may already have enabled it).
  for (int i = 0; i < n; ++i) {
    cudaSetDevice(devices[i]);
    for (int j = 0; j < n; ++j) {
      if (i == j) continue;
      int can = 0;
      cudaDeviceCanAccessPeer(&can, devices[i], devices[j]);
      if (!can) {
        return "GPU " + std::to_string(devices[i]) + " cannot access GPU " + std::to_string(devices[j]) +
               " directly (no CUDA peer access, e.g. no NVLink/PCIe P2P between them); the native "
               "backend needs every pair of the group to be peers";
      }
      cudaError_t err = cudaDeviceEnablePeerAccess(devices[j], 0);
      if (err == cudaErrorPeerAccessAlreadyEnabled) {
        cudaGetLastError();  // Clear the sticky-free error; already enabled is fine.
      } else if (err != cudaSuccess) {
        return CudaError("cudaDeviceEnablePeerAccess", err);
      }
    }
  }

  std::vector<std::unique_ptr<Member>> made;
  SignalRegion* regions[kMaxRanks] = {};
  for (int i = 0; i < n; ++i) {
    auto m = std::make_unique<Member>();
    m->device = devices[i];
    m->position = i;
    m->devices = devices;
    m->timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
    cudaSetDevice(devices[i]);
    cudaError_t err = cudaMalloc(&regions[i], sizeof(SignalRegion));
    if (err == cudaSuccess) err = cudaMemset(regions[i], 0, sizeof(SignalRegion));
    if (err == cudaSuccess) err = AllocDiag(&m->diag_host, &m->diag_device);
    if (err == cudaSuccess) err = cudaDeviceSynchronize();
    if (err != cudaSuccess) {
      for (int k = 0; k <= i; ++k) {
        if (regions[k] != nullptr) { cudaSetDevice(devices[k]); cudaFree(regions[k]); }
      }
      for (auto& done : made) FreeDiag(done->diag_host);
      FreeDiag(m->diag_host);
      return CudaError("allocating the signal region", err);
    }
    made.push_back(std::move(m));
  }
  for (auto& m : made) {
    std::copy(regions, regions + n, m->regions);
    int d = m->device;
    g_members[d] = std::move(m);
  }
  return "";
}

std::string FreeAll() {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceGuard guard;
  for (auto& [device, m] : g_members) FreeMemberLocked(*m);
  g_members.clear();
  return "";
}

std::string ResetAll() {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceGuard guard;
  for (auto& [device, m] : g_members) {
    cudaSetDevice(device);
    if (cudaError_t err = cudaDeviceSynchronize(); err != cudaSuccess) {
      return CudaError("cudaDeviceSynchronize before reset", err);
    }
  }
  for (auto& [device, m] : g_members) {
    cudaSetDevice(device);
    if (cudaError_t err = cudaMemset(m->regions[m->position], 0, sizeof(SignalRegion));
        err != cudaSuccess) {
      return CudaError("cudaMemset of the signal region", err);
    }
    cudaDeviceSynchronize();
    m->epoch = 0;
    *m->diag_host = Diag{};
  }
  return "";
}

Member* FindMember(int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_members.find(device);
  return it == g_members.end() ? nullptr : it->second.get();
}

std::string DescribeDiag(const Diag& d, const std::vector<int>& devices, uint64_t timeout_ns) {
  const std::string call = "call #" + std::to_string(d.epoch);
  if (d.code == kDiagTimeout) {
    const std::string peer = d.peer >= 0 && d.peer < static_cast<int>(devices.size())
                                 ? "GPU " + std::to_string(devices[d.peer]) + " (group position " +
                                       std::to_string(d.peer) + ")"
                                 : "group position " + std::to_string(d.peer);
    return "GPU " + std::to_string(d.device) + " timed out after " +
           std::to_string(timeout_ns / 1000000) + " ms waiting for " + peer + " in the " +
           (d.stage == kStageNotify ? "notify" : "completion") + " step of " + call +
           " (it last saw call #" + std::to_string(d.seen) +
           "): not every GPU of the axis ran the same dispatch/combine calls in the same order";
  }
  if (d.code == kDiagBadAxis) {
    return "GPU " + std::to_string(d.device) + " saw inconsistent axis indices in " + call +
           ": the mesh axis does not match the group set up by get_buffer";
  }
  return "";
}

std::string LastError(int device) {
  Diag d{};
  std::vector<int> devices;
  uint64_t timeout_ns = 0;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_members.find(device);
    if (it == g_members.end() || it->second->diag_host == nullptr) return "";
    std::memcpy(&d, it->second->diag_host, sizeof(d));  // Written by kernels (host-mapped).
    if (d.code == kDiagNone) return "";
    devices = it->second->devices;
    timeout_ns = it->second->timeout_ns;
  }
  return DescribeDiag(d, devices, timeout_ns);
}

size_t RegionBytes() { return sizeof(SignalRegion); }

}  // namespace jmd
