// The nanobind module: FFI handler capsules and the group (buffer) lifecycle.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "group.h"
#include "handlers.h"
#include "hybrid_handlers.h"
#include "permute_handlers.h"
#include "protocol.h"

namespace nb = nanobind;

namespace {

void Check(const std::string& error) {
  if (!error.empty()) throw std::runtime_error("jax_moe_dispatch: " + error);
}

// Runs a host call that may wait for the GPUs without holding the GIL.
template <typename F>
std::string Unlocked(F&& fn) {
  nb::gil_scoped_release release;
  return fn();
}

// An OpSignature from its fields in declaration order (missing ones are 0).
jmd::OpSignature Signature(const std::vector<int>& fields) {
  jmd::OpSignature sig{};
  int32_t* out = reinterpret_cast<int32_t*>(&sig);
  const size_t n = std::min(fields.size(), sizeof(sig) / sizeof(int32_t));
  for (size_t i = 0; i < n; ++i) out[i] = fields[i];
  return sig;
}

template <typename T>
nb::capsule Capsule(T* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jmd_ext, m) {
  m.doc() = "CUDA kernels and XLA FFI handlers of jax_moe_dispatch's native backend.";
  m.attr("MAX_RANKS") = jmd::kMaxRanks;
  m.def("handlers", []() {
    nb::dict d;
    d["jmd_dispatch"] = Capsule(JmdDispatch);
    d["jmd_dispatch_cached"] = Capsule(JmdDispatchCached);
    d["jmd_combine"] = Capsule(JmdCombine);
    d["jmd_hybrid_dispatch"] = Capsule(JmdHybridDispatch);
    d["jmd_hybrid_dispatch_cached"] = Capsule(JmdHybridDispatchCached);
    d["jmd_hybrid_combine"] = Capsule(JmdHybridCombine);
    d["jmd_permute"] = Capsule(JmdPermute);
    d["jmd_unpermute"] = Capsule(JmdUnpermute);
    return d;
  }, "FFI handler capsules by target name.");
  m.def("create_group", [](const std::vector<int>& devices, double timeout_s) {
    Check(Unlocked([&] { return jmd::CreateGroup(devices, timeout_s); }));
  }, nb::arg("devices"), nb::arg("timeout_s"),
     "Allocate the signal regions of a group of local GPUs (CUDA ordinals, in axis order) "
     "and enable peer access between them. The same group again is kept as it is.");
  m.def("create_exported", [](int device, int position, int size, double timeout_s, size_t staging_bytes) {
    std::string blob;
    Check(Unlocked([&] { return jmd::CreateExported(device, position, size, timeout_s, staging_bytes, &blob); }));
    return nb::bytes(blob.data(), blob.size());
  }, nb::arg("device"), nb::arg("position"), nb::arg("size"), nb::arg("timeout_s"), nb::arg("staging_bytes"),
     "First step of a rank of a group spanning processes: allocate its signal region and "
     "staging buffer (one CUDA-IPC-exported allocation) on GPU `device`; returns the bytes "
     "every peer passes to open_peers.");
  m.def("open_peers", [](int device, const std::vector<nb::bytes>& blobs, const std::vector<std::string>& names) {
    std::vector<std::string> raw;
    for (const nb::bytes& b : blobs) raw.emplace_back(b.c_str(), b.size());
    Check(Unlocked([&] { return jmd::OpenPeers(device, raw, names); }));
  }, nb::arg("device"), nb::arg("blobs"), nb::arg("names"),
     "Second step: map every peer's allocation (create_exported's bytes of every rank, by "
     "group position) and make the rank on `device` usable; `names` name the ranks in errors.");
  m.def("set_timeout", [](int device, double timeout_s) { Check(jmd::SetTimeout(device, timeout_s)); },
        nb::arg("device"), nb::arg("timeout_s"), "Change how long the rank on `device` waits for a peer.");
  m.def("close_peers", []() { Check(Unlocked(jmd::ClosePeers)); },
        "Take this process's ranks of groups spanning processes out of use: close their "
        "mappings of the peers' memory, keep their own until free_all(exported=True).");
  m.def("free_all", [](bool exported) { Check(Unlocked([&] { return jmd::FreeAll(exported); })); },
        nb::arg("exported") = true,
        "Free every group's device memory (peers' IPC mappings are closed first); memory "
        "exported to other processes only if `exported` (every peer closed its mappings).");
  m.def("synchronize", []() { Check(Unlocked(jmd::SynchronizeAll)); },
        "Wait until this process's GPUs of every group are idle.");
  m.def("reset", []() { Check(Unlocked(jmd::ResetAll)); },
        "Zero this process's signal regions and call counters (its GPUs must be idle).");
  m.def("last_error", [](int device) { return jmd::LastError(device); }, nb::arg("device"),
        "What the last failed kernel on this GPU recorded (timeout, bad axis), or ''.");
  m.def("_describe_diag", [](int code, int stage, int peer, int device, uint64_t epoch, uint64_t seen,
                             const std::vector<std::string>& names, int self, double timeout_s,
                             const std::vector<int>& mine, const std::vector<int>& theirs) {
    jmd::Diag d{code, stage, peer, device, epoch, seen, Signature(mine), Signature(theirs)};
    return jmd::DescribeDiag(d, names, self, static_cast<uint64_t>(timeout_s * 1e9));
  }, nb::arg("code"), nb::arg("stage"), nb::arg("peer"), nb::arg("device"), nb::arg("epoch"),
     nb::arg("seen"), nb::arg("names"), nb::arg("self"), nb::arg("timeout_s"),
     nb::arg("mine") = std::vector<int>(), nb::arg("theirs") = std::vector<int>(),
     "Test hook: the message for a failure recorded by the rank at group position `self`; "
     "`mine` and `theirs` are op signatures as [kind, T, M, streams, payloads, dtype, row bytes...].");
  m.def("mem_info", [](int device) {
    size_t free_bytes = 0, total_bytes = 0;
    Check(jmd::MemoryInfo(device, &free_bytes, &total_bytes));
    return nb::make_tuple(free_bytes, total_bytes);
  }, nb::arg("device"), "(free, total) bytes of device memory on a CUDA ordinal (cudaMemGetInfo).");
  m.def("check_peer_readable", [](int device, uintptr_t ptr, int owner_device) {
    return jmd::CheckPeerReadable(device, reinterpret_cast<const void*>(ptr), owner_device);
  }, nb::arg("device"), nb::arg("ptr"), nb::arg("owner_device"),
     "'' if GPU `device` can read in place the XLA buffer at `ptr` on GPU `owner_device`, else why.");
  m.def("region_bytes", &jmd::RegionBytes, "Device bytes of one GPU's signal region.");
  m.def("staged_bytes", [](const std::vector<size_t>& sizes) { return jmd::StagedBytes(sizes.data(), sizes.size()); },
        nb::arg("sizes"),
        "Staging bytes a call needs to copy arrays of these byte sizes (each at an aligned offset), "
        "as the handlers reserve them when a group spans processes.");
}
