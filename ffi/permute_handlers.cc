// XLA FFI handlers of the local permutation (permute.h): check every buffer and
// attribute (any caller can reach a registered target), then launch on XLA's
// stream. No group, no buffers of ours: they need no get_buffer. Errors are
// returned as ffi::Error; nothing throws.
#include "permute_handlers.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "handlers_internal.h"
#include "permute.h"
#include "row_stream_setup.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using S32Vector = ffi::Buffer<ffi::S32, 1>;
using S32Matrix = ffi::Buffer<ffi::S32, 2>;

namespace jmd {
namespace {

// Makes `device` current and returns its SM count (sizes the grids).
ffi::ErrorOr<int> DeviceSms(int32_t device) {
  if (cudaError_t err = cudaSetDevice(device); err != cudaSuccess) {
    return ffi::Unexpected(CudaFailure("cudaSetDevice", err));
  }
  int sms = 0;
  if (cudaError_t err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device); err != cudaSuccess) {
    return ffi::Unexpected(CudaFailure("cudaDeviceGetAttribute", err));
  }
  return std::max(sms, 1);
}

ffi::Error PermuteImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer local_map, ffi::AnyBuffer local_probs,
                       ffi::RemainingArgs args, ffi::Result<S32Matrix> perm_row, ffi::Result<S32Vector> src_row,
                       ffi::Result<S32Vector> tokens_per_expert, ffi::Result<S32Matrix> expert_rows,
                       ffi::Result<S32Vector> scratch, ffi::Result<ffi::AnyBuffer> permuted_probs,
                       ffi::RemainingRets rets, int64_t pad_multiple) {
  auto map_dims = local_map.dimensions();
  if (local_map.element_type() != ffi::DataType::PRED || map_dims.size() != 2) {
    return Invalid("local_map must be bool [M, L]");
  }
  const int64_t num_recv = map_dims[0], num_local = map_dims[1];
  const int64_t num_rows = src_row->dimensions()[0];
  const int64_t max_experts = expert_rows->dimensions()[1];
  if (num_local < 1) return Invalid("local_map needs at least one local expert; L", num_local);
  if (max_experts < 1 || max_experts > num_local) {
    return Invalid("expert_rows must be [M, K] with K in [1, L]; K", max_experts);
  }
  if (pad_multiple < 1 || pad_multiple > INT32_MAX / 2) return Invalid("pad_multiple must be >= 1", pad_multiple);
  auto prob_dims = local_probs.dimensions();
  if (prob_dims.size() != 2 || prob_dims[0] != num_recv || prob_dims[1] != num_local) {
    return Invalid("local_probs must be [M, L] like local_map");
  }
  const size_t prob_bytes = ffi::ByteWidth(local_probs.element_type());
  if ((prob_bytes != 1 && prob_bytes != 2 && prob_bytes != 4 && prob_bytes != 8) ||
      permuted_probs->element_type() != local_probs.element_type() || permuted_probs->dimensions().size() != 1 ||
      permuted_probs->dimensions()[0] != num_rows) {
    return Invalid("probabilities must be 1, 2, 4 or 8 bytes each, permuted to [N] of the same dtype");
  }
  if (perm_row->dimensions()[0] != num_recv || perm_row->dimensions()[1] != num_local ||
      tokens_per_expert->dimensions()[0] != num_local || expert_rows->dimensions()[0] != num_recv ||
      scratch->dimensions()[0] != num_local + num_recv) {
    return Invalid("permute outputs: perm_row [M, L], src_row [N], tokens_per_expert [L], expert_rows [M, K], "
                   "scratch [L + M]");
  }
  // Group starts are int32 sums of padded counts: bound them by the worst case.
  if (num_recv * num_local > INT32_MAX || num_rows > INT32_MAX ||
      num_recv * max_experts + num_local * pad_multiple > INT32_MAX) {
    return Invalid("too many rows to permute; M", num_recv);
  }
  if (2 * num_local + 1 > (200 << 10) / static_cast<int64_t>(sizeof(int))) {
    return Invalid("too many local experts for the group table in shared memory; L", num_local);
  }
  auto sms = DeviceSms(device);
  if (!sms.has_value()) return sms.error();

  PermuteParams p{};
  auto num_streams = SetUpRowStreams("permute", args, rets, num_recv, "M", num_rows, kMaxPermuteStreams, p.rows);
  if (!num_streams.has_value()) return num_streams.error();
  p.num_streams = *num_streams;
  p.map = static_cast<const uint8_t*>(local_map.untyped_data());
  p.probs = static_cast<const char*>(local_probs.untyped_data());
  p.prob_bytes = static_cast<int32_t>(prob_bytes);
  p.probs_out = static_cast<char*>(permuted_probs->untyped_data());
  p.perm_row = perm_row->typed_data();
  p.src_row = src_row->typed_data();
  p.tokens_per_expert = tokens_per_expert->typed_data();
  p.expert_rows = expert_rows->typed_data();
  p.counts = scratch->typed_data();
  p.last_expert = max_experts < num_local ? scratch->typed_data() + num_local : nullptr;
  p.num_recv = static_cast<int32_t>(num_recv);
  p.num_local = static_cast<int32_t>(num_local);
  p.num_rows = static_cast<int32_t>(num_rows);
  p.max_experts = static_cast<int32_t>(max_experts);
  p.pad_multiple = static_cast<int32_t>(pad_multiple);
  if (cudaError_t err = LaunchPermute(p, *sms, stream); err != cudaSuccess) return CudaFailure("permute launch", err);
  return ffi::Error::Success();
}

ffi::Error UnpermuteImpl(cudaStream_t stream, int32_t device, S32Matrix expert_rows, ffi::AnyBuffer rows,
                         ffi::Result<ffi::AnyBuffer> out) {
  auto rows_dims = rows.dimensions();
  auto out_dims = out->dimensions();
  const int64_t num_recv = expert_rows.dimensions()[0], max_experts = expert_rows.dimensions()[1];
  if (rows_dims.size() != 2 || out_dims.size() != 2 || out_dims[0] != num_recv || out_dims[1] != rows_dims[1]) {
    return Invalid("unpermute takes rows [N, H] and expert_rows [M, K] and returns [M, H]");
  }
  auto in_type = DtypeOf(rows.element_type(), "unpermute rows");
  if (!in_type.has_value()) return in_type.error();
  auto out_type = DtypeOf(out->element_type(), "unpermute's output");
  if (!out_type.has_value()) return out_type.error();
  if (rows_dims[0] > INT32_MAX || rows_dims[1] > INT32_MAX || num_recv > INT32_MAX || max_experts > INT32_MAX) {
    return Invalid("too many rows to unpermute; N", rows_dims[0]);
  }
  auto sms = DeviceSms(device);
  if (!sms.has_value()) return sms.error();

  UnpermuteParams p{};
  p.rows = rows.untyped_data();
  p.expert_rows = expert_rows.typed_data();
  p.out = out->untyped_data();
  p.num_recv = static_cast<int32_t>(num_recv);
  p.num_rows = static_cast<int32_t>(rows_dims[0]);
  p.max_experts = static_cast<int32_t>(max_experts);
  p.hidden = static_cast<int32_t>(rows_dims[1]);
  p.in_type = *in_type;
  p.out_type = *out_type;
  const int64_t in_bytes = rows_dims[1] * static_cast<int64_t>(ffi::ByteWidth(rows.element_type()));
  const int64_t out_bytes = rows_dims[1] * static_cast<int64_t>(ffi::ByteWidth(out->element_type()));
  p.vector_in = VectorWidth(in_bytes, p.rows) == 16;
  p.vector_out = p.vector_in && p.in_type == p.out_type && VectorWidth(out_bytes, p.out) == 16;
  if (cudaError_t err = LaunchUnpermute(p, *sms, stream); err != cudaSuccess) {
    return CudaFailure("unpermute launch", err);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jmd

// Pure functions of their inputs on XLA's stream: safe inside CUDA graphs.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JmdPermute, jmd::PermuteImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<ffi::AnyBuffer>()    // local_map [M, L] bool
                                  .Arg<ffi::AnyBuffer>()    // local_probs [M, L]
                                  .RemainingArgs()          // rows [M, ...] (and FP8 scales)
                                  .Ret<S32Matrix>()         // perm_row [M, L]
                                  .Ret<S32Vector>()         // src_row [N]
                                  .Ret<S32Vector>()         // tokens_per_expert [L]
                                  .Ret<S32Matrix>()         // expert_rows [M, K]
                                  .Ret<S32Vector>()         // scratch [L + M]
                                  .Ret<ffi::AnyBuffer>()    // permuted probs [N]
                                  .RemainingRets()          // permuted rows [N, ...]
                                  .Attr<int64_t>("pad_multiple"),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmdUnpermute, jmd::UnpermuteImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<S32Matrix>()         // expert_rows [M, K]
                                  .Arg<ffi::AnyBuffer>()    // rows [N, H]
                                  .Ret<ffi::AnyBuffer>(),   // out [M, H]
                              {ffi::Traits::kCmdBufferCompatible});
