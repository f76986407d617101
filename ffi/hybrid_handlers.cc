// XLA FFI handlers of the fused HybridEP ops (hybrid.h): check the buffers, find
// this GPU's rank, publish (stage) the inputs, launch notify + the hybrid kernels +
// the done handshake. Errors are returned as ffi::Error; nothing throws.
#include "hybrid_handlers.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "handlers_internal.h"
#include "hybrid.h"
#include "kernels.h"
#include "row_stream_setup.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

using S32Scalar = ffi::Buffer<ffi::S32>;
using S32Vector = ffi::Buffer<ffi::S32, 1>;
using S32Matrix = ffi::Buffer<ffi::S32, 2>;

namespace jmd {
namespace {

// The row streams: inputs [T, ...] into outputs [N, ...], each input published.
ffi::Error SetUpRows(HybridParams& p, Published* published, ffi::RemainingArgs args, ffi::RemainingRets rets,
                     int64_t num_tokens, int64_t num_rows) {
  // Peers' inputs have the same shapes and alignment (XLA: >= 16 bytes; staging:
  // 256), so the vector widths of this rank's input hold for theirs.
  auto n = SetUpRowStreams("hybrid dispatch", args, rets, num_tokens, "T", num_rows, kMaxRowStreams, p.rows);
  if (!n.has_value()) return n.error();
  for (int32_t k = 0; k < *n; ++k) {
    auto in = args.get<ffi::AnyBuffer>(k);  // Checked above.
    published[k] = Published{in->untyped_data(), in->size_bytes()};
  }
  p.num_row_streams = *n;
  return ffi::Error::Success();
}

// What every rank of a hybrid dispatch must agree on.
OpSignature RowsSignature(OpKind kind, const HybridParams& p) {
  OpSignature sig{};
  sig.kind = kind;
  sig.num_tokens = p.num_tokens;
  sig.max_recv = p.max_recv;
  sig.num_streams = p.num_row_streams;
  sig.num_payloads = p.num_local;  // Hybrid ops: the local experts L.
  for (int i = 0; i < p.num_row_streams && i < kMaxStreams; ++i) sig.row_bytes[i] = p.rows[i].bytes;
  return sig;
}

ffi::Error HybridDispatchImpl(cudaStream_t stream, int32_t device, S32Scalar axis_index, ffi::AnyBuffer dest_mask,
                              ffi::AnyBuffer local_map, ffi::AnyBuffer local_probs, ffi::RemainingArgs args,
                              ffi::Result<S32Matrix> send_pos, ffi::Result<S32Vector> dest_offset,
                              ffi::Result<S32Vector> recv_count, ffi::Result<S32Vector> recv_token,
                              ffi::Result<S32Matrix> lists, ffi::Result<S32Matrix> perm_row,
                              ffi::Result<S32Vector> src_row, ffi::Result<S32Vector> tokens_per_expert,
                              ffi::Result<S32Vector> counts, ffi::Result<ffi::AnyBuffer> permuted_probs,
                              ffi::RemainingRets rets, int64_t pad_multiple, int64_t num_blocks) {
  if (auto err = CheckBlocks(num_blocks); err.failure()) return err;
  auto mask_dims = dest_mask.dimensions();
  if (dest_mask.element_type() != ffi::DataType::PRED || mask_dims.size() != 2) {
    return Invalid("dest_mask must be bool [T, R]");
  }
  const int64_t num_tokens = mask_dims[0], ranks = mask_dims[1];
  const int64_t max_recv = recv_token->dimensions()[0];
  const int64_t num_local = perm_row->dimensions()[1];
  const int64_t num_rows = src_row->dimensions()[0];
  auto map_dims = local_map.dimensions();
  auto prob_dims = local_probs.dimensions();
  if (local_map.element_type() != ffi::DataType::PRED || map_dims.size() != 3 || map_dims[0] != num_tokens ||
      map_dims[1] != ranks || map_dims[2] != num_local || prob_dims.size() != 3 || prob_dims[0] != num_tokens ||
      prob_dims[1] != ranks || prob_dims[2] != num_local) {
    return Invalid("local_map must be bool [T, R, L] and local_probs [T, R, L]");
  }
  const size_t prob_bytes = ffi::ByteWidth(local_probs.element_type());
  if ((prob_bytes != 2 && prob_bytes != 4) || permuted_probs->element_type() != local_probs.element_type() ||
      permuted_probs->dimensions().size() != 1 || permuted_probs->dimensions()[0] != num_rows) {
    return Invalid("probabilities must be float32, bfloat16 or float16, permuted to [N]");
  }
  if (send_pos->dimensions()[0] != num_tokens || send_pos->dimensions()[1] != ranks ||
      dest_offset->dimensions()[0] != ranks || recv_count->dimensions()[0] != ranks ||
      lists->dimensions()[0] != ranks || lists->dimensions()[1] != num_tokens ||
      perm_row->dimensions()[0] != max_recv || tokens_per_expert->dimensions()[0] != num_local ||
      counts->dimensions()[0] != num_local) {
    return Invalid("hybrid dispatch outputs: send_pos [T, R], dest_offset/recv_count [R], recv_token [M], "
                   "lists [R, T], perm_row [M, L], src_row [N], tokens_per_expert/counts [L]");
  }
  if (num_tokens * ranks > INT32_MAX || max_recv * num_local > INT32_MAX || num_rows > INT32_MAX ||
      num_tokens * ranks * num_local > INT32_MAX) {
    return Invalid("too many tokens");
  }
  if (pad_multiple < 1 || pad_multiple > INT32_MAX / 2) return Invalid("pad_multiple must be >= 1");
  if (num_local < 1) return Invalid("num_local_experts must be >= 1");
  auto m = Find(device, ranks, stream);
  if (!m.has_value()) return m.error();

  HybridParams p{};
  Published published[kMaxRowStreams + 2];
  if (auto err = SetUpRows(p, published, args, rets, num_tokens, num_rows); err.failure()) return err;
  const int nr = p.num_row_streams;
  published[nr] = Published{local_map.untyped_data(), local_map.size_bytes()};
  published[nr + 1] = Published{local_probs.untyped_data(), local_probs.size_bytes()};
  NotifyParams n{};
  char* scratch = nullptr;
  const size_t list_bytes = static_cast<size_t>(num_tokens * ranks) * sizeof(int32_t);
  // Slots: lists, then the rows, map and probabilities (hybrid.cu reads them so).
  if (auto err = PublishInputs(**m, stream, "hybrid dispatch", published, nr + 2, list_bytes, n.ptrs + 1, &scratch);
      err.failure()) {
    return err;
  }
  n.lists = scratch != nullptr ? reinterpret_cast<int32_t*>(scratch) : lists->typed_data();
  n.ptrs[0] = reinterpret_cast<uint64_t>(n.lists);
  n.axis_index = axis_index.typed_data();
  n.dest_mask = static_cast<const uint8_t*>(dest_mask.untyped_data());
  n.num_tokens = static_cast<int32_t>(num_tokens);
  n.send_pos = send_pos->typed_data();
  n.dest_offset = dest_offset->typed_data();
  n.recv_count = recv_count->typed_data();
  n.max_recv = static_cast<int32_t>(max_recv);

  p.prob_bytes = static_cast<int32_t>(prob_bytes);
  p.probs_out = static_cast<char*>(permuted_probs->untyped_data());
  p.perm_row = perm_row->typed_data();
  p.src_row = src_row->typed_data();
  p.tokens_per_expert = tokens_per_expert->typed_data();
  p.recv_token = recv_token->typed_data();
  p.counts = counts->typed_data();
  p.num_tokens = n.num_tokens;
  p.max_recv = n.max_recv;
  p.num_local = static_cast<int32_t>(num_local);
  p.num_rows = static_cast<int32_t>(num_rows);
  p.pad_multiple = static_cast<int32_t>(pad_multiple);

  return LaunchCall(**m, RowsSignature(kOpHybridDispatch, p), n, stream, "hybrid dispatch launch (data or finish)",
                    [&](const GroupView& g) {
                      const cudaError_t err = LaunchHybridDispatch(g, p, static_cast<int>(num_blocks), stream);
                      if (err != cudaSuccess) return err;
                      return LaunchFinish(g, stream);
                    });
}

ffi::Error HybridDispatchCachedImpl(cudaStream_t stream, int32_t device, S32Scalar axis_index, S32Matrix send_pos,
                                    S32Vector recv_count, S32Matrix perm_row, S32Vector src_row,
                                    ffi::RemainingArgs args, ffi::Result<S32Matrix> lists, ffi::RemainingRets rets,
                                    int64_t num_blocks) {
  if (auto err = CheckBlocks(num_blocks); err.failure()) return err;
  const int64_t num_tokens = send_pos.dimensions()[0], ranks = send_pos.dimensions()[1];
  const int64_t max_recv = perm_row.dimensions()[0], num_local = perm_row.dimensions()[1];
  const int64_t num_rows = src_row.dimensions()[0];
  if (recv_count.dimensions()[0] != ranks || lists->dimensions()[0] != ranks ||
      lists->dimensions()[1] != num_tokens) {
    return Invalid("recv_count must be [R] and lists [R, T]");
  }
  if (num_tokens * ranks > INT32_MAX || max_recv * num_local > INT32_MAX || num_rows > INT32_MAX) {
    return Invalid("too many tokens");
  }
  auto m = Find(device, ranks, stream);
  if (!m.has_value()) return m.error();
  HybridParams p{};
  Published published[kMaxRowStreams];
  if (auto err = SetUpRows(p, published, args, rets, num_tokens, num_rows); err.failure()) return err;
  NotifyParams n{};
  char* scratch = nullptr;
  const size_t list_bytes = static_cast<size_t>(num_tokens * ranks) * sizeof(int32_t);
  if (auto err = PublishInputs(**m, stream, "hybrid combine's backward", published, p.num_row_streams, list_bytes,
                               n.ptrs + 1, &scratch);
      err.failure()) {
    return err;
  }
  n.lists = scratch != nullptr ? reinterpret_cast<int32_t*>(scratch) : lists->typed_data();
  n.ptrs[0] = reinterpret_cast<uint64_t>(n.lists);
  n.axis_index = axis_index.typed_data();
  n.kept_pos = send_pos.typed_data();
  n.cached_recv = recv_count.typed_data();
  n.num_tokens = static_cast<int32_t>(num_tokens);
  n.max_recv = static_cast<int32_t>(max_recv);
  // Read only in a cached dispatch (hybrid.h).
  p.perm_row = const_cast<int32_t*>(perm_row.typed_data());
  p.src_row = const_cast<int32_t*>(src_row.typed_data());
  p.num_tokens = n.num_tokens;
  p.max_recv = n.max_recv;
  p.num_local = static_cast<int32_t>(num_local);
  p.num_rows = static_cast<int32_t>(num_rows);
  p.pad_multiple = 1;

  return LaunchCall(**m, RowsSignature(kOpHybridDispatchCached, p), n, stream,
                    "cached hybrid dispatch launch (data or finish)",
                    [&](const GroupView& g) {
                      const cudaError_t err = LaunchHybridDispatchCached(g, p, static_cast<int>(num_blocks), stream);
                      if (err != cudaSuccess) return err;
                      return LaunchFinish(g, stream);
                    });
}

ffi::Error HybridCombineImpl(cudaStream_t stream, int32_t device, S32Scalar axis_index, S32Matrix send_pos,
                             S32Vector dest_offset, S32Matrix perm_row, ffi::AnyBuffer rows,
                             ffi::Result<ffi::AnyBuffer> out, int64_t num_blocks) {
  if (auto err = CheckBlocks(num_blocks); err.failure()) return err;
  const int64_t num_tokens = send_pos.dimensions()[0], ranks = send_pos.dimensions()[1];
  const int64_t num_local = perm_row.dimensions()[1];
  auto rows_dims = rows.dimensions();
  auto out_dims = out->dimensions();
  if (rows_dims.size() != 2 || out_dims.size() != 2 || out_dims[0] != num_tokens || out_dims[1] != rows_dims[1] ||
      rows.element_type() != out->element_type()) {
    return Invalid("hybrid combine takes rows [N, H] and returns [T, H] of the same dtype");
  }
  HybridCombineParams p{};
  auto dtype = DtypeOf(rows.element_type(), "hybrid combine rows");
  if (!dtype.has_value()) return dtype.error();
  p.dtype = *dtype;
  if (dest_offset.dimensions()[0] != ranks) return Invalid("dest_offset must be [R]");
  if (rows_dims[0] > INT32_MAX || rows_dims[1] > INT32_MAX) return Invalid("too many rows");
  auto m = Find(device, ranks, stream);
  if (!m.has_value()) return m.error();
  NotifyParams n{};
  const Published published[2] = {{rows.untyped_data(), rows.size_bytes()},
                                  {perm_row.typed_data(), perm_row.size_bytes()}};
  char* scratch = nullptr;
  if (auto err = PublishInputs(**m, stream, "hybrid combine", published, 2, 0, n.ptrs, &scratch); err.failure()) {
    return err;
  }
  n.axis_index = axis_index.typed_data();
  n.max_recv = static_cast<int32_t>(perm_row.dimensions()[0]);
  p.send_pos = send_pos.typed_data();
  p.dest_offset = dest_offset.typed_data();
  p.out = out->untyped_data();
  p.num_tokens = static_cast<int32_t>(num_tokens);
  p.hidden = static_cast<int32_t>(rows_dims[1]);
  p.num_local = static_cast<int32_t>(num_local);

  OpSignature sig{};
  sig.kind = kOpHybridCombine;
  sig.num_tokens = p.num_tokens;
  sig.max_recv = n.max_recv;
  sig.num_streams = 1;
  sig.num_payloads = p.num_local;  // Hybrid ops: the local experts L.
  sig.dtype = static_cast<int32_t>(p.dtype);
  sig.row_bytes[0] = static_cast<int32_t>(rows_dims[1] * ffi::ByteWidth(rows.element_type()));
  return LaunchCall(**m, sig, n, stream, "hybrid combine launch (data or finish)",
                    [&](const GroupView& g) {
                      const cudaError_t err = LaunchHybridCombine(g, p, static_cast<int>(num_blocks), stream);
                      if (err != cudaSuccess) return err;
                      return LaunchFinish(g, stream);
                    });
}

}  // namespace
}  // namespace jmd

// No Traits::kCmdBufferCompatible: these kernels wait on other GPUs and must run in
// program order, outside CUDA graphs.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JmdHybridDispatch, jmd::HybridDispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<S32Scalar>()         // axis_index [1]
                                  .Arg<ffi::AnyBuffer>()    // dest_mask [T, R] bool
                                  .Arg<ffi::AnyBuffer>()    // local_map [T, R, L] bool
                                  .Arg<ffi::AnyBuffer>()    // local_probs [T, R, L]
                                  .RemainingArgs()          // rows [T, ...] (and FP8 scales)
                                  .Ret<S32Matrix>()         // send_pos [T, R] (handle)
                                  .Ret<S32Vector>()         // dest_offset [R] (handle)
                                  .Ret<S32Vector>()         // recv_count [R] (handle)
                                  .Ret<S32Vector>()         // recv_token [M] (handle)
                                  .Ret<S32Matrix>()         // lists [R, T] (scratch peers read)
                                  .Ret<S32Matrix>()         // perm_row [M, L] (permutation)
                                  .Ret<S32Vector>()         // src_row [N] (permutation)
                                  .Ret<S32Vector>()         // tokens_per_expert [L]
                                  .Ret<S32Vector>()         // counts [L] (scratch)
                                  .Ret<ffi::AnyBuffer>()    // permuted probs [N]
                                  .RemainingRets()          // permuted rows [N, ...]
                                  .Attr<int64_t>("pad_multiple")
                                  .Attr<int64_t>("num_blocks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmdHybridDispatchCached, jmd::HybridDispatchCachedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<S32Scalar>()    // axis_index [1]
                                  .Arg<S32Matrix>()    // send_pos [T, R] (handle)
                                  .Arg<S32Vector>()    // recv_count [R] (handle)
                                  .Arg<S32Matrix>()    // perm_row [M, L] (permutation)
                                  .Arg<S32Vector>()    // src_row [N] (permutation)
                                  .RemainingArgs()     // rows [T, ...]
                                  .Ret<S32Matrix>()    // lists [R, T] (scratch peers read)
                                  .RemainingRets()     // permuted rows [N, ...]
                                  .Attr<int64_t>("num_blocks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmdHybridCombine, jmd::HybridCombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<S32Scalar>()         // axis_index [1]
                                  .Arg<S32Matrix>()         // send_pos [T, R] (handle)
                                  .Arg<S32Vector>()         // dest_offset [R] (handle)
                                  .Arg<S32Matrix>()         // perm_row [M, L] (permutation)
                                  .Arg<ffi::AnyBuffer>()    // rows [N, H]
                                  .Ret<ffi::AnyBuffer>()    // out [T, H]
                                  .Attr<int64_t>("num_blocks"));
