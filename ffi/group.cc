#include "group.h"

#include <cuda.h>
#include <cuda_runtime.h>

#include <new>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace jmd {
namespace {

std::mutex g_mutex;
// device ordinal -> usable member; the local members of one group share `local_devices`.
std::map<int, std::shared_ptr<Member>> g_members;
// device ordinal -> member of a group spanning processes, between CreateExported and OpenPeers.
std::map<int, std::shared_ptr<Member>> g_pending;
// Members of groups spanning processes that left their group: the peers' mappings
// are closed, but the exported allocation is kept until FreeAll(true), because a
// peer may still map it (freeing it first is undefined behaviour in CUDA).
std::vector<std::shared_ptr<Member>> g_released;

// A rank's allocation in a group spanning processes: its SignalRegion, then its
// staging buffer at this offset (aligned for any vector width).
constexpr size_t kStagingOffset = (sizeof(SignalRegion) + 255) / 256 * 256;

// What one rank of a group spanning processes tells its peers (ExportedBytes()).
struct Exported {
  cudaIpcMemHandle_t handle;  // of the whole allocation.
  uint64_t base;              // the allocation's address in the exporter's process.
  uint64_t bytes;             // the allocation's size.
  int32_t position;
  int32_t size;
};

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

// Waits for the member's device, then closes the peers' IPC mappings.
void CloseMappingsLocked(Member& m) {
  cudaSetDevice(m.device);
  cudaDeviceSynchronize();
  for (int p = 0; p < kMaxRanks; ++p) {
    if (m.mapped[p] == nullptr) continue;
    cudaIpcCloseMemHandle(m.mapped[p]);
    m.mapped[p] = nullptr;
    m.regions[p] = nullptr;
  }
}

// CloseMappingsLocked, then frees what this process allocated for the member.
void FreeMemberLocked(Member& m) {
  CloseMappingsLocked(m);
  if (m.allocation != nullptr) {
    cudaFree(m.allocation);
  } else if (m.regions[m.position] != nullptr) {
    cudaFree(m.regions[m.position]);
  }
  FreeDiag(m.diag_host);
  m.allocation = nullptr;
  m.staging = nullptr;
  m.regions[m.position] = nullptr;
  m.diag_host = nullptr;
}

// Waits until no handler holds `m` (handlers hold it only while they enqueue a
// call and take no lock meanwhile, so this is brief).
void WaitUnusedLocked(const std::shared_ptr<Member>& m) {
  while (m.use_count() > 1) std::this_thread::yield();
}

// Takes a member out of use: frees it, or, if peers may map its allocation, closes
// its mappings and keeps it in g_released.
void RetireLocked(std::shared_ptr<Member> m) {
  WaitUnusedLocked(m);
  if (m->allocation == nullptr) {
    FreeMemberLocked(*m);
    return;
  }
  CloseMappingsLocked(*m);
  g_released.push_back(std::move(m));
}

// Retires the groups (and pending ranks) that contain any of `devices`.
void FreeGroupsOfLocked(const std::vector<int>& devices) {
  std::vector<int> doomed;
  for (int d : devices) {
    auto it = g_members.find(d);
    if (it == g_members.end()) continue;
    for (int other : it->second->local_devices) doomed.push_back(other);
  }
  std::sort(doomed.begin(), doomed.end());
  doomed.erase(std::unique(doomed.begin(), doomed.end()), doomed.end());
  for (int d : doomed) {
    auto it = g_members.find(d);
    if (it == g_members.end()) continue;
    RetireLocked(std::move(it->second));
    g_members.erase(it);
  }
  for (int d : devices) {
    auto it = g_pending.find(d);
    if (it == g_pending.end()) continue;
    RetireLocked(std::move(it->second));
    g_pending.erase(it);
  }
}

std::string CheckOrdinal(int device) {
  int count = 0;
  if (cudaError_t err = cudaGetDeviceCount(&count); err != cudaSuccess) {
    return CudaError("cudaGetDeviceCount", err);
  }
  if (device < 0 || device >= count) {
    return "device ordinal " + std::to_string(device) + " is not one of the " + std::to_string(count) +
           " visible GPUs";
  }
  return "";
}

// The stream-ordered pool `ptr` was allocated from (null: not from a pool), through
// the driver's cuPointerGetAttribute (reached via the runtime: no libcuda link).
std::string PoolOf(const void* ptr, cudaMemPool_t* pool) {
  using GetAttribute = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);
  static GetAttribute get = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    cudaGetDriverEntryPointByVersion("cuPointerGetAttribute", &fn, 12000, cudaEnableDefault, &found);
#else
    cudaGetDriverEntryPoint("cuPointerGetAttribute", &fn, cudaEnableDefault, &found);
#endif
    return found == cudaDriverEntryPointSuccess ? reinterpret_cast<GetAttribute>(fn) : nullptr;
  }();
  *pool = nullptr;
  if (get == nullptr) return "the CUDA driver's cuPointerGetAttribute is not available";
  CUmemoryPool handle = nullptr;
  if (CUresult res = get(&handle, CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE, reinterpret_cast<CUdeviceptr>(ptr));
      res != CUDA_SUCCESS) {
    return "cuPointerGetAttribute(MEMPOOL_HANDLE) failed with CUresult " + std::to_string(static_cast<int>(res));
  }
  *pool = reinterpret_cast<cudaMemPool_t>(handle);
  return "";
}

std::string SynchronizeLocked() {
  DeviceGuard guard;
  for (auto& [device, m] : g_members) {
    cudaSetDevice(device);
    if (cudaError_t err = cudaDeviceSynchronize(); err != cudaSuccess) {
      return CudaError("cudaDeviceSynchronize", err);
    }
  }
  return "";
}

}  // namespace

std::string CreateGroup(const std::vector<int>& devices, double timeout_s) {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceGuard guard;
  const int n = static_cast<int>(devices.size());
  if (n < 1 || n > kMaxRanks) {
    return "a group has 1.." + std::to_string(kMaxRanks) + " GPUs, got " + std::to_string(n);
  }
  for (int i = 0; i < n; ++i) {
    if (std::string err = CheckOrdinal(devices[i]); !err.empty()) return err;
    for (int j = 0; j < i; ++j) {
      if (devices[i] == devices[j]) return "a GPU appears twice in the group";
    }
  }
  // The same group again: keep it (and its epochs, which running programs rely on).
  auto first = g_members.find(devices[0]);
  if (first != g_members.end() && first->second->allocation == nullptr &&
      first->second->local_devices == devices) {
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

  std::vector<std::string> names;
  for (int d : devices) names.push_back("GPU " + std::to_string(d));
  std::vector<std::shared_ptr<Member>> made;
  SignalRegion* regions[kMaxRanks] = {};
  for (int i = 0; i < n; ++i) {
    auto m = std::make_shared<Member>();
    m->device = devices[i];
    m->position = i;
    m->size = n;
    m->local_devices = devices;
    m->names = names;
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

size_t ExportedBytes() { return sizeof(Exported); }

std::string CreateExported(int device, int position, int size, double timeout_s, size_t staging_bytes,
                           std::string* blob) {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceGuard guard;
  if (size < 2 || size > kMaxRanks || position < 0 || position >= size) {
    return "a group spanning processes has 2.." + std::to_string(kMaxRanks) + " ranks; got position " +
           std::to_string(position) + " of " + std::to_string(size);
  }
  if (std::string err = CheckOrdinal(device); !err.empty()) return err;
  FreeGroupsOfLocked({device});

  auto m = std::make_shared<Member>();
  m->device = device;
  m->position = position;
  m->size = size;
  m->local_devices = {device};
  m->timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
  m->staging_bytes = (staging_bytes + 255) / 256 * 256;
  const size_t bytes = kStagingOffset + m->staging_bytes;
  cudaSetDevice(device);
  Exported out{};
  cudaError_t err = cudaMalloc(&m->allocation, bytes);
  if (err == cudaSuccess) err = cudaMemset(m->allocation, 0, sizeof(SignalRegion));
  if (err == cudaSuccess) err = cudaIpcGetMemHandle(&out.handle, m->allocation);
  if (err == cudaSuccess) err = AllocDiag(&m->diag_host, &m->diag_device);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();  // The region is zero before peers map it.
  if (err != cudaSuccess) {
    cudaGetLastError();
    if (m->allocation != nullptr) cudaFree(m->allocation);
    FreeDiag(m->diag_host);
    return CudaError("allocating the IPC-exported signal region and staging buffer", err);
  }
  m->staging = m->allocation + kStagingOffset;
  m->regions[position] = reinterpret_cast<SignalRegion*>(m->allocation);
  out.base = reinterpret_cast<uint64_t>(m->allocation);
  out.bytes = bytes;
  out.position = position;
  out.size = size;
  blob->assign(reinterpret_cast<const char*>(&out), sizeof(out));
  g_pending[device] = std::move(m);
  return "";
}

std::string OpenPeers(int device, const std::vector<std::string>& blobs, const std::vector<std::string>& names) {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceGuard guard;
  auto it = g_pending.find(device);
  if (it == g_pending.end()) return "no pending rank on GPU " + std::to_string(device) + " (CreateExported first)";
  std::shared_ptr<Member> m = std::move(it->second);
  g_pending.erase(it);
  if (static_cast<int>(blobs.size()) != m->size || static_cast<int>(names.size()) != m->size) {
    const std::string error = "expected " + std::to_string(m->size) + " blobs and names, got " +
                              std::to_string(blobs.size()) + " and " + std::to_string(names.size());
    RetireLocked(std::move(m));
    return error;
  }
  m->names = names;
  const uint64_t own_bytes = kStagingOffset + m->staging_bytes;
  std::string error;
  for (int p = 0; p < m->size && error.empty(); ++p) {
    Exported in{};
    if (blobs[p].size() != sizeof(Exported)) {
      error = "the blob of " + names[p] + " has " + std::to_string(blobs[p].size()) + " bytes, expected " +
              std::to_string(sizeof(Exported));
      break;
    }
    std::memcpy(&in, blobs[p].data(), sizeof(in));
    if (in.position != p || in.size != m->size) {
      error = names[p] + " set up position " + std::to_string(in.position) + " of a group of " +
              std::to_string(in.size) + ", expected position " + std::to_string(p) + " of " +
              std::to_string(m->size) + ": every process must call get_buffer with the same mesh and axis";
    } else if (in.bytes != own_bytes) {
      error = names[p] + " allocated " + std::to_string(in.bytes) + " bytes, this rank " +
              std::to_string(own_bytes) +
              ": every process must call get_buffer with the same hidden_bytes and max_num_tokens";
    } else if (p == m->position) {
      if (in.base != reinterpret_cast<uint64_t>(m->allocation)) error = "blob " + std::to_string(p) + " is not this rank's";
    } else {
      cudaSetDevice(device);
      void* peer = nullptr;
      cudaError_t err = cudaIpcOpenMemHandle(&peer, in.handle, cudaIpcMemLazyEnablePeerAccess);
      if (err != cudaSuccess) {
        cudaGetLastError();  // Not sticky: clear it so that later launch checks do not see it.
        error = CudaError(("mapping the buffer of " + names[p] + " (cudaIpcOpenMemHandle: the ranks of a "
                           "group must be on one node, and every process must see the node's GPUs: "
                           "pick each process's GPU with jax.distributed.initialize(local_device_ids=...), "
                           "not with CUDA_VISIBLE_DEVICES)").c_str(), err);
        break;
      }
      m->mapped[p] = peer;
      m->regions[p] = static_cast<SignalRegion*>(peer);
      m->delta[p] = static_cast<int64_t>(reinterpret_cast<uint64_t>(peer) - in.base);
    }
  }
  if (!error.empty()) {
    RetireLocked(std::move(m));  // Peers may have mapped this rank's allocation already.
    return error;
  }
  g_members[device] = std::move(m);
  return "";
}

std::string SetTimeout(int device, double timeout_s) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_members.find(device);
  if (it == g_members.end()) return "no native buffer on GPU " + std::to_string(device);
  it->second->timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
  return "";
}

std::string ClosePeers() {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceGuard guard;
  for (auto it = g_members.begin(); it != g_members.end();) {
    if (it->second->allocation == nullptr) {
      ++it;
      continue;
    }
    RetireLocked(std::move(it->second));
    it = g_members.erase(it);
  }
  for (auto& [device, m] : g_pending) RetireLocked(std::move(m));
  g_pending.clear();
  return "";
}

std::string FreeAll(bool exported) {
  std::lock_guard<std::mutex> lock(g_mutex);
  DeviceGuard guard;
  for (auto& [device, m] : g_members) RetireLocked(std::move(m));
  for (auto& [device, m] : g_pending) RetireLocked(std::move(m));
  g_members.clear();
  g_pending.clear();
  if (exported) {
    for (auto& m : g_released) FreeMemberLocked(*m);
    g_released.clear();
  }
  return "";
}

std::string SynchronizeAll() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return SynchronizeLocked();
}

std::string ResetAll() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (std::string err = SynchronizeLocked(); !err.empty()) return err + " (before reset)";
  DeviceGuard guard;
  for (auto& [device, m] : g_members) {
    WaitUnusedLocked(m);
    cudaSetDevice(device);
    if (cudaError_t err = cudaMemset(m->regions[m->position], 0, sizeof(SignalRegion));
        err != cudaSuccess) {
      return CudaError("cudaMemset of the signal region", err);
    }
    cudaDeviceSynchronize();
    m->epoch = 0;
    m->stream = nullptr;
    *m->diag_host = Diag{};
  }
  return "";
}

std::shared_ptr<Member> FindMember(int device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_members.find(device);
  return it == g_members.end() ? nullptr : it->second;
}

std::string DescribeDiag(const Diag& d, const std::vector<std::string>& names, int self, uint64_t timeout_ns) {
  const int n = static_cast<int>(names.size());
  auto name = [&](int p) {
    return p >= 0 && p < n ? names[p] + " (group position " + std::to_string(p) + ")"
                           : "group position " + std::to_string(p);
  };
  const std::string me = self >= 0 && self < n ? names[self] : "GPU " + std::to_string(d.device);
  const std::string call = "call #" + std::to_string(d.epoch);
  if (d.code == kDiagTimeout) {
    return me + " timed out after " + std::to_string(timeout_ns / 1000000) + " ms waiting for " +
           name(d.peer) + " in the " + (d.stage == kStageNotify ? "notify" : "completion") + " step of " +
           call + " (it last saw call #" + std::to_string(d.seen) +
           "): that rank did not reach this call. Either not every rank of the axis runs the same "
           "dispatch/combine calls in the same order, or its process died or is still busy (e.g. "
           "compiling the program; then raise get_buffer's timeout_s)";
  }
  if (d.code == kDiagMismatch) {
    if (d.stage == kStageDone) {
      return me + " saw " + name(d.peer) + " finish call #" + std::to_string(d.seen) + " while it was in " +
             call + ": the ranks are not in the same call. Fix: every rank of the axis must run the "
             "same dispatch/combine calls in the same order";
    }
    const std::string other = name(d.peer);
    if (d.seen != d.epoch) {
      return me + " was in " + call + " (" + DescribeSignature(d.mine) + ") but " + other +
             " had already published call #" + std::to_string(d.seen) + " (" + DescribeSignature(d.theirs) +
             "): the ranks are not in the same call. Fix: every rank of the axis must run the same "
             "dispatch/combine calls in the same order";
    }
    return me + " ran " + DescribeSignature(d.mine) + " as " + call + " but " + other + " ran " +
           DescribeSignature(d.theirs) + ": every rank of the axis must run the same op with the same "
           "shapes (tokens, receive rows, row bytes, dtypes) in the same order. Fix: run one SPMD "
           "program on every rank (no rank-dependent shapes or branches around dispatch/combine)";
  }
  if (d.code == kDiagBadAxis) {
    return me + " saw inconsistent axis indices in " + call +
           ": the mesh axis does not match the group set up by get_buffer";
  }
  return "";
}

std::string LastError(const Member& m) {
  if (m.diag_host == nullptr) return "";
  Diag d{};
  std::memcpy(&d, m.diag_host, sizeof(d));  // Written by kernels (host-mapped); code last.
  if (d.code == kDiagNone) return "";
  return DescribeDiag(d, m.names, m.position, m.timeout_ns.load());
}

std::string LastError(int device) {
  std::shared_ptr<Member> m = FindMember(device);
  return m == nullptr ? "" : LastError(*m);
}

std::string DescribeSignature(const OpSignature& s) {
  static const char* const kinds[] = {"no call",         "dispatch",
                                      "cached dispatch", "combine",
                                      "hybrid dispatch", "cached hybrid dispatch",
                                      "hybrid combine"};
  const std::string kind =
      s.kind >= 0 && s.kind <= kOpHybridCombine ? kinds[s.kind] : "op " + std::to_string(s.kind);
  std::string out = kind + "(T=" + std::to_string(s.num_tokens) + ", M=" + std::to_string(s.max_recv);
  if (s.kind == kOpHybridDispatch || s.kind == kOpHybridDispatchCached || s.kind == kOpHybridCombine) {
    out += ", L=" + std::to_string(s.num_payloads);
  }
  if (s.kind == kOpCombine || s.kind == kOpHybridCombine) {
    static const char* const dtypes[] = {"float32", "bfloat16", "float16"};
    out += ", row bytes " + std::to_string(s.row_bytes[0]) + ", " +
           (s.dtype >= 0 && s.dtype <= 2 ? dtypes[s.dtype] : "dtype " + std::to_string(s.dtype));
  } else {
    out += ", ";
    if (s.kind != kOpHybridDispatch && s.kind != kOpHybridDispatchCached) {
      out += std::to_string(s.num_payloads) + " payloads of ";
    }
    out += std::to_string(s.num_streams) + " arrays, row bytes [";
    for (int i = 0; i < s.num_streams && i < kMaxStreams; ++i) {
      out += (i ? ", " : "") + std::to_string(s.row_bytes[i]);
    }
    out += "]";
  }
  return out + ")";
}

std::string MemoryInfo(int device, size_t* free_bytes, size_t* total_bytes) {
  if (std::string err = CheckOrdinal(device); !err.empty()) return err;
  DeviceGuard guard;
  cudaSetDevice(device);
  if (cudaError_t err = cudaMemGetInfo(free_bytes, total_bytes); err != cudaSuccess) {
    return CudaError("cudaMemGetInfo", err);
  }
  return "";
}

std::string CheckPeerReadable(int device, const void* ptr, int owner_device) {
  if (std::string err = CheckOrdinal(device); !err.empty()) return err;
  if (std::string err = CheckOrdinal(owner_device); !err.empty()) return err;
  cudaPointerAttributes attr{};
  if (cudaError_t err = cudaPointerGetAttributes(&attr, ptr); err != cudaSuccess) {
    cudaGetLastError();
    return CudaError("cudaPointerGetAttributes of an XLA buffer", err);
  }
  if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
    return "XLA's buffers on GPU " + std::to_string(owner_device) +
           " are not device memory (cudaPointerGetAttributes type " + std::to_string(attr.type) +
           "), so peers cannot read them in place";
  }
  if (device == owner_device) return "";
  int can = 0;
  cudaDeviceCanAccessPeer(&can, device, owner_device);
  if (!can) {
    return "GPU " + std::to_string(device) + " cannot access GPU " + std::to_string(owner_device) +
           " (no CUDA peer access)";
  }
  // Memory from a stream-ordered pool (cudaMallocAsync, XLA's cuda_async allocator)
  // needs the pool's access grant for peers; peer access alone does not cover it.
  cudaMemPool_t pool = nullptr;
  if (std::string err = PoolOf(ptr, &pool); !err.empty()) return err;
  if (pool != nullptr) {
    cudaMemLocation where{};
    where.type = cudaMemLocationTypeDevice;
    where.id = device;
    cudaMemAccessFlags flags = cudaMemAccessFlagsProtNone;
    if (cudaError_t err = cudaMemPoolGetAccess(&flags, pool, &where); err != cudaSuccess) {
      cudaGetLastError();
      return CudaError("cudaMemPoolGetAccess", err);
    }
    if (flags == cudaMemAccessFlagsProtNone) {
      return "XLA allocates from a stream-ordered memory pool on GPU " + std::to_string(owner_device) +
             " that grants GPU " + std::to_string(device) + " no access";
    }
  }
  cudaGetLastError();
  return "";
}

size_t RegionBytes() { return sizeof(SignalRegion); }

}  // namespace jmd
