// What handlers.cc shares with the other handler files (hybrid_handlers.cc): the
// rank lookup, the start of a call and the publishing (staging) of its inputs.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "group.h"
#include "protocol.h"
#include "xla/ffi/api/ffi.h"

namespace jmd {

// This GPU's rank, checked against the axis size, its last recorded failure and
// the stream of its calls; makes its GPU current. Held while the call is set up.
xla::ffi::ErrorOr<std::shared_ptr<Member>> FindRank(int32_t device, int64_t axis_size, cudaStream_t stream);

// The kernels' view of `m`'s group for its next call, whose signature is `sig`
// (what every rank must agree on). Call CommitCall once its notify kernel is
// enqueued: only then does the epoch advance.
GroupView NextCall(const Member& m, const OpSignature& sig);
void CommitCall(Member& m, const GroupView& g);

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
