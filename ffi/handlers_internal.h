// What handlers.cc shares with the other handler files (hybrid_handlers.cc): error
// helpers, attribute checks, the rank lookup, the start of a call (notify, then the
// data kernels) and the publishing (staging) of its inputs.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "group.h"
#include "kernels.h"
#include "protocol.h"
#include "xla/ffi/api/ffi.h"

namespace jmd {

// The most blocks a data kernel is launched with (far above any GPU's SM count).
inline constexpr int64_t kMaxBlocks = 1 << 16;

// InvalidArgument("jax_moe_dispatch: " + msg), or naming the offending value.
xla::ffi::Error Invalid(const std::string& msg);
xla::ffi::Error Invalid(const std::string& what, int64_t value);

// The Dtype of a float32 / bfloat16 / float16 buffer, or InvalidArgument naming `what`
// and the XLA type.
xla::ffi::ErrorOr<Dtype> DtypeOf(xla::ffi::DataType type, const std::string& what);

// Internal error naming the failed CUDA call `what`.
xla::ffi::Error CudaFailure(const char* what, cudaError_t err);

// An attribute any caller of a registered target may set: the data kernels' grid,
// in [1, kMaxBlocks].
xla::ffi::Error CheckBlocks(int64_t num_blocks);

// The widest vector (16, 8, 4, 2 or 1 bytes) that divides `bytes` and `base`'s alignment.
int VectorWidth(int64_t bytes, const void* base);

// Bytes of one row of a [lead..., rest...] buffer after `lead` leading dims.
int64_t RowBytes(const xla::ffi::AnyBuffer& b, int lead);

// This GPU's rank, checked against the axis size, its last recorded failure and
// the stream of its earlier calls; makes its GPU current. The caller holds the
// rank until its launches are enqueued (the registry frees nothing it holds).
xla::ffi::ErrorOr<std::shared_ptr<Member>> Find(int32_t device, int64_t axis_size, cudaStream_t stream);

// The kernels' view of `m`'s group for its next call, whose signature is `sig`
// (what every rank must agree on). The epoch advances only in Commit, once the
// call's first kernel is enqueued, so that a call refused or failed before
// launching leaves the ranks in step.
GroupView Next(const Member& m, const OpSignature& sig);
void Commit(Member& m, const GroupView& g);

// Enqueues notify, then the data kernel `launch_data(view)`; the epoch advances once
// notify is enqueued (from then on peers can see this call).
template <typename LaunchData>
xla::ffi::Error LaunchCall(Member& m, const OpSignature& sig, const NotifyParams& n, cudaStream_t stream,
                      const char* what, LaunchData launch_data) {
  const GroupView g = Next(m, sig);
  if (cudaError_t err = LaunchNotify(g, n, stream); err != cudaSuccess) return CudaFailure("notify launch", err);
  Commit(m, g);
  if (cudaError_t err = launch_data(g); err != cudaSuccess) return CudaFailure(what, err);
  return xla::ffi::Error::Success();
}


// One input that peers read.
struct Published {
  const void* data;
  size_t bytes;
};

// Writes to `addrs[i]` the address peers read `inputs[i]` at: the input itself in
// one process; when the group spans processes, a copy in this rank's staging
// buffer (on `stream`), followed by `scratch_bytes` of staging returned in
// `*scratch` (null in one process). Fails, naming the fix, when staging is too
// small for `op`.
xla::ffi::Error PublishInputs(const Member& m, cudaStream_t stream, const char* op, const Published* inputs,
                              int n, size_t scratch_bytes, uint64_t* addrs, char** scratch);

}  // namespace jmd
