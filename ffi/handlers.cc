// XLA FFI handlers: check the buffers, find this GPU's rank, stage the inputs when
// its group spans processes, launch notify + data.
// Errors are returned as ffi::Error; nothing throws across the FFI boundary.
#include "handlers.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>

#include "group.h"
#include "handlers_internal.h"
#include "kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// Comma-free names for the binding macros below.
using S32Scalar = ffi::Buffer<ffi::S32>;
using S32Vector = ffi::Buffer<ffi::S32, 1>;
using S32Matrix = ffi::Buffer<ffi::S32, 2>;

namespace jmd {

namespace {

// Staging offsets are multiples of this (any vector width).
constexpr size_t kStagingAlign = 256;

size_t Aligned(size_t bytes) { return (bytes + kStagingAlign - 1) / kStagingAlign * kStagingAlign; }

}  // namespace

size_t StagedBytes(const size_t* sizes, size_t n) {
  size_t total = 0;
  for (size_t i = 0; i < n; ++i) total += Aligned(sizes[i]);
  return total;
}

// Shared with the other handler files (handlers_internal.h).

ffi::Error Invalid(const std::string& msg) {
  return ffi::Error::InvalidArgument("jax_moe_dispatch: " + msg);
}

ffi::Error Invalid(const std::string& what, int64_t value) {
  return Invalid(what + ", got " + std::to_string(value));
}

ffi::ErrorOr<Dtype> DtypeOf(ffi::DataType type, const std::string& what) {
  switch (type) {
    case ffi::DataType::F32: return Dtype::kF32;
    case ffi::DataType::BF16: return Dtype::kBF16;
    case ffi::DataType::F16: return Dtype::kF16;
    default:
      return ffi::Unexpected(Invalid(what + " must be float32, bfloat16 or float16; XLA type",
                                     static_cast<int64_t>(type)));
  }
}

ffi::Error CudaFailure(const char* what, cudaError_t err) {
  return ffi::Error::Internal(std::string("jax_moe_dispatch: ") + what + ": " + cudaGetErrorName(err) +
                              " (" + cudaGetErrorString(err) + ")");
}

ffi::Error CheckBlocks(int64_t num_blocks) {
  if (num_blocks < 1 || num_blocks > kMaxBlocks) {
    return Invalid("num_blocks must be in [1, " + std::to_string(kMaxBlocks) + "]", num_blocks);
  }
  return ffi::Error::Success();
}

ffi::ErrorOr<std::shared_ptr<Member>> Find(int32_t device, int64_t axis_size, cudaStream_t stream) {
  std::shared_ptr<Member> m = FindMember(device);
  if (m == nullptr) {
    return ffi::Unexpected(ffi::Error(
        ffi::ErrorCode::kFailedPrecondition,
        "jax_moe_dispatch: no native buffer on GPU " + std::to_string(device) +
            ". Fix: call jax_moe_dispatch.get_buffer(mesh, hidden_bytes) with the mesh whose "
            "expert axis this op runs over, before running it (or use implementation='reference')."));
  }
  if (m->size != axis_size) {
    return ffi::Unexpected(ffi::Error(
        ffi::ErrorCode::kFailedPrecondition,
        "jax_moe_dispatch: the expert axis has " + std::to_string(axis_size) + " ranks but GPU " +
            std::to_string(device) + "'s buffer was set up for a group of " + std::to_string(m->size) +
            ". Fix: call get_buffer with the mesh and axis_name this op runs over."));
  }
  if (std::string last = LastError(*m); !last.empty()) {
    return ffi::Unexpected(ffi::Error(
        ffi::ErrorCode::kFailedPrecondition,
        "jax_moe_dispatch: an earlier dispatch/combine on this GPU gave up (its results were "
        "invalid): " + last + ". Fix: make every rank of the axis run the same calls, then restart "
        "the processes or call jax_moe_dispatch.reset_hybrid_ep_buffer() in every process once "
        "every rank is idle."));
  }
  if (m->stream == nullptr) {
    m->stream = stream;
  } else if (m->stream != stream) {
    return ffi::Unexpected(ffi::Error(
        ffi::ErrorCode::kFailedPrecondition,
        "jax_moe_dispatch: a dispatch/combine on GPU " + std::to_string(device) +
            " runs on another CUDA stream than this GPU's earlier ones; the native protocol needs "
            "every call of a GPU on one stream, in program order. Fix: run the native ops from one "
            "JAX client without multi-stream execution of custom calls, or call "
            "jax_moe_dispatch.reset_hybrid_ep_buffer() in every process, once every rank is idle, "
            "before the first call on the new stream."));
  }
  int current = -1;
  cudaGetDevice(&current);
  if (current != device) cudaSetDevice(device);  // For the staging copies and launches.
  return m;
}

GroupView Next(const Member& m, const OpSignature& sig) {
  GroupView g{};
  for (int i = 0; i < m.size; ++i) {
    g.regions[i] = m.regions[i];
    g.delta[i] = m.delta[i];
  }
  g.diag = m.diag_device;
  g.size = m.size;
  g.position = m.position;
  g.device = m.device;
  g.epoch = m.epoch + 1;
  g.timeout_ns = m.timeout_ns.load();
  g.sig = sig;
  return g;
}

void Commit(Member& m, const GroupView& g) { m.epoch = g.epoch; }

int VectorWidth(int64_t bytes, const void* base) {
  for (int w : {16, 8, 4, 2}) {
    if (bytes % w == 0 && reinterpret_cast<uintptr_t>(base) % w == 0) return w;
  }
  return 1;
}

int64_t RowBytes(const ffi::AnyBuffer& b, int lead) {
  int64_t n = static_cast<int64_t>(ffi::ByteWidth(b.element_type()));
  auto dims = b.dimensions();
  for (size_t i = lead; i < dims.size(); ++i) n *= dims[i];
  return n;
}

namespace {

// axis_index is one int32.
ffi::Error CheckAxisIndex(const S32Scalar& axis_index) {
  if (axis_index.element_count() != 1) {
    return Invalid("axis_index must hold one int32", static_cast<int64_t>(axis_index.element_count()));
  }
  return ffi::Error::Success();
}

// A [T, R] handle array and the rank count: R in [1, kMaxRanks], T in int32 range.
ffi::Error CheckTokensByRanks(const char* what, int64_t num_tokens, int64_t ranks) {
  if (ranks < 1 || ranks > kMaxRanks) {
    return Invalid(std::string(what) + " must be [T, R] with R in [1, " + std::to_string(kMaxRanks) + "]",
                   ranks);
  }
  if (num_tokens < 0 || num_tokens * ranks > INT32_MAX) return Invalid(std::string(what) + ": too many tokens", num_tokens);
  return ffi::Error::Success();
}

// A group spanning processes: peers cannot read XLA's buffers (not IPC-exportable),
// so a call copies its inputs into this rank's staging buffer, in order, and
// publishes those copies. One process: no staging, inputs are published in place.
class Staging {
 public:
  Staging(const Member& m, cudaStream_t stream) : m_(m), stream_(stream) {}

  bool active() const { return m_.staging != nullptr; }

  // Fails (naming the fix) unless `bytes` (StagedBytes of what the call stages) fit.
  ffi::Error Reserve(size_t bytes, const char* op) const {
    if (!active() || bytes <= m_.staging_bytes) return ffi::Error::Success();
    return ffi::Error(
        ffi::ErrorCode::kResourceExhausted,
        std::string("jax_moe_dispatch: this ") + op + " stages " + std::to_string(bytes) +
            " bytes per rank but the staging buffer set up by get_buffer holds " +
            std::to_string(m_.staging_bytes) + ": the program was traced while a larger buffer was set up "
            "(tracing an op grows the buffer to what it stages). Fix: set the buffer up that large again "
            "before running it (jax_moe_dispatch.get_buffer or init_hybrid_ep_buffer with a larger "
            "max_num_tokens or hidden size), or call jax.clear_caches() so that the next call traces it "
            "again.");
  }

  // The next `bytes` of staging (after Reserve).
  char* Take(size_t bytes) {
    char* out = m_.staging + used_;
    used_ += Aligned(bytes);
    return out;
  }

  // The address peers read `src` at: a staged copy, or `src` itself in one process.
  ffi::ErrorOr<const void*> Publish(const void* src, size_t bytes) {
    if (!active()) return src;
    char* dst = Take(bytes);
    if (cudaError_t err = cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_);
        err != cudaSuccess) {
      return ffi::Unexpected(CudaFailure("staging copy", err));
    }
    return static_cast<const void*>(dst);
  }

 private:
  const Member& m_;
  cudaStream_t stream_;
  size_t used_ = 0;
};

// Shared by fresh and cached dispatch: checks the arrays, fills the streams and
// the addresses this rank publishes (its inputs, then its send lists), staging
// them when the group spans processes.
ffi::Error SetUpDispatch(DispatchParams& p, NotifyParams& n, Staging& staging, int64_t num_tokens, int64_t ranks,
                         ffi::Result<S32Matrix>& lists, ffi::RemainingArgs args, ffi::RemainingRets rets,
                         int64_t num_payloads, int64_t max_recv) {
  const int64_t num_streams = static_cast<int64_t>(args.size());
  if (lists->dimensions()[0] != ranks || lists->dimensions()[1] != num_tokens) {
    return Invalid("lists must be [R, T]");
  }
  if (num_streams != static_cast<int64_t>(rets.size())) {
    return Invalid("dispatch needs one output per input array; outputs", static_cast<int64_t>(rets.size()));
  }
  if (num_payloads < 0 || num_payloads > num_streams) {
    return Invalid("num_payloads must be in [0, " + std::to_string(num_streams) + "]", num_payloads);
  }
  if (max_recv < 0) return Invalid("max_recv must be >= 0", max_recv);
  if (num_streams > kMaxStreams - 1) {
    return Invalid("at most " + std::to_string(kMaxStreams - 1) + " arrays per dispatch");
  }
  if (num_tokens * ranks > INT32_MAX || max_recv > INT32_MAX) return Invalid("too many tokens", num_tokens);
  const size_t list_bytes = static_cast<size_t>(num_tokens * ranks) * sizeof(int32_t);
  const void* inputs[kMaxStreams] = {};
  // What is staged: the send lists, then every input.
  size_t staged[kMaxStreams + 1] = {list_bytes};
  size_t* input_bytes = staged + 1;
  for (int64_t i = 0; i < num_streams; ++i) {
    auto in = args.get<ffi::AnyBuffer>(i);
    auto out = rets.get<ffi::AnyBuffer>(i);
    if (!in.has_value()) return in.error();
    if (!out.has_value()) return out.error();
    const bool sliced = i >= num_payloads;
    auto in_dims = in->dimensions();
    auto out_dims = (*out)->dimensions();
    if (in_dims.size() < (sliced ? 2u : 1u) || in_dims[0] != num_tokens || (sliced && in_dims[1] != ranks)) {
      return Invalid("dispatch array " + std::to_string(i) + " must be [T, ...]" + (sliced ? " with R second" : ""));
    }
    const int64_t bytes = RowBytes(*in, sliced ? 2 : 1);
    if (out_dims.size() < 1 || out_dims[0] != max_recv || RowBytes(**out, 1) != bytes ||
        in->element_type() != (*out)->element_type()) {
      return Invalid("dispatch output " + std::to_string(i) + " must be [M, ...] like its input row");
    }
    if (bytes > INT32_MAX / 2) return Invalid("rows over 1 GiB are not supported");
    Stream& s = p.streams[i];
    s.dst = static_cast<char*>((*out)->untyped_data());
    s.bytes = static_cast<int32_t>(bytes);
    s.dest_stride = sliced ? bytes : 0;
    s.tok_stride = sliced ? bytes * ranks : bytes;
    inputs[i] = in->untyped_data();
    input_bytes[i] = in->size_bytes();
  }
  if (auto err = staging.Reserve(StagedBytes(staged, num_streams + 1), "dispatch"); err.failure()) return err;
  for (int64_t i = 0; i < num_streams; ++i) {
    auto src = staging.Publish(inputs[i], input_bytes[i]);
    if (!src.has_value()) return src.error();
    Stream& s = p.streams[i];
    // Peers' inputs have the same shapes and alignment: XLA aligns every buffer to at
    // least 16 bytes, staged copies start at multiples of 256.
    s.width = std::min(VectorWidth(s.bytes, *src), VectorWidth(s.bytes, s.dst));
    n.ptrs[i] = reinterpret_cast<uint64_t>(*src);
  }
  p.num_streams = static_cast<int32_t>(num_streams);
  // Peers read the lists where notify writes them: the `lists` result in one process
  // (then left unwritten otherwise), the staging buffer when the group spans processes.
  n.lists = staging.active() ? reinterpret_cast<int32_t*>(staging.Take(list_bytes)) : lists->typed_data();
  n.ptrs[num_streams] = reinterpret_cast<uint64_t>(n.lists);
  n.num_tokens = static_cast<int32_t>(num_tokens);
  p.num_tokens = n.num_tokens;
  p.max_recv = static_cast<int32_t>(max_recv);
  n.max_recv = p.max_recv;
  return ffi::Error::Success();
}

// What every rank of a dispatch must agree on.
OpSignature DispatchSignature(OpKind kind, const DispatchParams& p, int64_t num_payloads) {
  OpSignature sig{};
  sig.kind = kind;
  sig.num_tokens = p.num_tokens;
  sig.max_recv = p.max_recv;
  sig.num_streams = p.num_streams;
  sig.num_payloads = static_cast<int32_t>(num_payloads);
  for (int i = 0; i < p.num_streams; ++i) sig.row_bytes[i] = p.streams[i].bytes;
  return sig;
}

ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, S32Scalar axis_index, ffi::AnyBuffer dest_mask,
                        ffi::RemainingArgs args, ffi::Result<S32Matrix> send_pos,
                        ffi::Result<S32Vector> dest_offset, ffi::Result<S32Vector> recv_count,
                        ffi::Result<S32Vector> recv_token, ffi::Result<S32Matrix> lists, ffi::RemainingRets rets,
                        int64_t num_payloads, int64_t num_blocks) {
  if (auto err = CheckBlocks(num_blocks); err.failure()) return err;
  if (auto err = CheckAxisIndex(axis_index); err.failure()) return err;
  auto mask_dims = dest_mask.dimensions();
  if (dest_mask.element_type() != ffi::DataType::PRED || mask_dims.size() != 2) {
    return Invalid("dest_mask must be bool [T, R]; rank", static_cast<int64_t>(mask_dims.size()));
  }
  const int64_t num_tokens = mask_dims[0], ranks = mask_dims[1];
  if (auto err = CheckTokensByRanks("dest_mask", num_tokens, ranks); err.failure()) return err;
  if (send_pos->dimensions()[0] != num_tokens || send_pos->dimensions()[1] != ranks ||
      dest_offset->dimensions()[0] != ranks || recv_count->dimensions()[0] != ranks) {
    return Invalid("send_pos must be [T, R], dest_offset and recv_count [R]");
  }
  auto m = Find(device, ranks, stream);
  if (!m.has_value()) return m.error();
  DispatchParams p{};
  NotifyParams n{};
  Staging staging(**m, stream);
  if (auto err = SetUpDispatch(p, n, staging, num_tokens, ranks, lists, args, rets, num_payloads,
                               recv_token->dimensions()[0]);
      err.failure()) {
    return err;
  }
  p.recv_token = recv_token->typed_data();
  n.axis_index = axis_index.typed_data();
  n.dest_mask = static_cast<const uint8_t*>(dest_mask.untyped_data());
  n.send_pos = send_pos->typed_data();
  n.dest_offset = dest_offset->typed_data();
  n.recv_count = recv_count->typed_data();
  return LaunchCall(**m, DispatchSignature(kOpDispatch, p, num_payloads), n, stream, "dispatch launch",
                    [&](const GroupView& g) { return LaunchDispatch(g, p, static_cast<int>(num_blocks), stream); });
}

ffi::Error DispatchCachedImpl(cudaStream_t stream, int32_t device, S32Scalar axis_index, S32Matrix send_pos,
                              S32Vector recv_count, ffi::RemainingArgs args, ffi::Result<S32Matrix> lists,
                              ffi::RemainingRets rets, int64_t max_recv, int64_t num_blocks) {
  if (auto err = CheckBlocks(num_blocks); err.failure()) return err;
  if (auto err = CheckAxisIndex(axis_index); err.failure()) return err;
  const int64_t num_tokens = send_pos.dimensions()[0], ranks = send_pos.dimensions()[1];
  if (auto err = CheckTokensByRanks("send_pos", num_tokens, ranks); err.failure()) return err;
  if (recv_count.dimensions()[0] != ranks) return Invalid("recv_count must be [R]; length", recv_count.dimensions()[0]);
  auto m = Find(device, ranks, stream);
  if (!m.has_value()) return m.error();
  DispatchParams p{};
  NotifyParams n{};
  Staging staging(**m, stream);
  if (auto err = SetUpDispatch(p, n, staging, num_tokens, ranks, lists, args, rets, args.size(), max_recv);
      err.failure()) {
    return err;
  }
  n.axis_index = axis_index.typed_data();
  n.kept_pos = send_pos.typed_data();
  n.cached_recv = recv_count.typed_data();
  return LaunchCall(**m, DispatchSignature(kOpDispatchCached, p, static_cast<int64_t>(args.size())), n, stream,
                    "dispatch launch",
                    [&](const GroupView& g) { return LaunchDispatch(g, p, static_cast<int>(num_blocks), stream); });
}

ffi::Error CombineImpl(cudaStream_t stream, int32_t device, S32Scalar axis_index, S32Matrix send_pos,
                       S32Vector dest_offset,
                       ffi::AnyBuffer rows, ffi::Result<ffi::AnyBuffer> out, int64_t num_blocks) {
  if (auto err = CheckBlocks(num_blocks); err.failure()) return err;
  if (auto err = CheckAxisIndex(axis_index); err.failure()) return err;
  const int64_t num_tokens = send_pos.dimensions()[0], ranks = send_pos.dimensions()[1];
  if (auto err = CheckTokensByRanks("send_pos", num_tokens, ranks); err.failure()) return err;
  auto rows_dims = rows.dimensions();
  auto out_dims = out->dimensions();
  if (rows_dims.size() != 2 || out_dims.size() != 2 || out_dims[0] != num_tokens ||
      out_dims[1] != rows_dims[1] || rows.element_type() != out->element_type()) {
    return Invalid("combine takes rows [M, H] and returns [T, H] of the same dtype");
  }
  if (rows_dims[0] > INT32_MAX) return Invalid("combine rows [M, H] need M < 2^31; M", rows_dims[0]);
  if (rows_dims[1] > INT32_MAX / 4) return Invalid("combine rows [M, H] need rows under 2 GiB; H", rows_dims[1]);
  CombineParams p{};
  auto dtype = DtypeOf(rows.element_type(), "combine rows");
  if (!dtype.has_value()) return dtype.error();
  p.dtype = *dtype;
  if (dest_offset.dimensions()[0] != ranks) return Invalid("dest_offset must be [R]; length", dest_offset.dimensions()[0]);
  auto m = Find(device, ranks, stream);
  if (!m.has_value()) return m.error();
  Staging staging(**m, stream);
  const size_t rows_bytes = rows.size_bytes();
  if (auto err = staging.Reserve(StagedBytes(&rows_bytes, 1), "combine"); err.failure()) return err;
  auto src = staging.Publish(rows.untyped_data(), rows.size_bytes());
  if (!src.has_value()) return src.error();
  NotifyParams n{};
  n.axis_index = axis_index.typed_data();
  n.ptrs[0] = reinterpret_cast<uint64_t>(*src);
  n.max_recv = static_cast<int32_t>(rows_dims[0]);
  p.send_pos = send_pos.typed_data();
  p.dest_offset = dest_offset.typed_data();
  p.out = out->untyped_data();
  p.num_tokens = static_cast<int32_t>(num_tokens);
  p.hidden = static_cast<int32_t>(rows_dims[1]);
  p.max_recv = n.max_recv;
  OpSignature sig{};
  sig.kind = kOpCombine;
  sig.num_tokens = p.num_tokens;
  sig.max_recv = p.max_recv;
  sig.num_streams = 1;
  sig.num_payloads = 1;
  sig.dtype = static_cast<int32_t>(p.dtype);
  sig.row_bytes[0] = static_cast<int32_t>(RowBytes(rows, 1));
  return LaunchCall(**m, sig, n, stream, "combine launch",
                    [&](const GroupView& g) { return LaunchCombine(g, p, static_cast<int>(num_blocks), stream); });
}

}  // namespace
}  // namespace jmd

// No Traits::kCmdBufferCompatible: these kernels wait on other GPUs and must run
// in program order, outside CUDA graphs.
XLA_FFI_DEFINE_HANDLER_SYMBOL(JmdDispatch, jmd::DispatchImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<S32Scalar>()       // axis_index [1]
                                  .Arg<ffi::AnyBuffer>()  // dest_mask [T, R] bool
                                  .RemainingArgs()        // payloads, then sliced
                                  .Ret<S32Matrix>()       // send_pos [T, R] (handle)
                                  .Ret<S32Vector>()       // dest_offset [R] (handle)
                                  .Ret<S32Vector>()       // recv_count [R] (handle)
                                  .Ret<S32Vector>()       // recv_token [M] (handle)
                                  .Ret<S32Matrix>()       // lists [R, T] (scratch peers read)
                                  .RemainingRets()        // received arrays
                                  .Attr<int64_t>("num_payloads")
                                  .Attr<int64_t>("num_blocks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmdDispatchCached, jmd::DispatchCachedImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<S32Scalar>()   // axis_index [1]
                                  .Arg<S32Matrix>()   // send_pos [T, R] (handle: kept positions)
                                  .Arg<S32Vector>()   // recv_count [R] (handle)
                                  .RemainingArgs()    // payloads
                                  .Ret<S32Matrix>()   // lists [R, T] (scratch peers read)
                                  .RemainingRets()    // received payloads
                                  .Attr<int64_t>("max_recv")
                                  .Attr<int64_t>("num_blocks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JmdCombine, jmd::CombineImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .Arg<S32Scalar>()      // axis_index [1]
                                  .Arg<S32Matrix>()   // send_pos [T, R]
                                  .Arg<S32Vector>()   // dest_offset [R]
                                  .Arg<ffi::AnyBuffer>()             // rows [M, H]
                                  .Ret<ffi::AnyBuffer>()             // out [T, H]
                                  .Attr<int64_t>("num_blocks"));

// handlers_internal.h: the above, for the other handler files.
namespace jmd {

ffi::Error PublishInputs(const Member& m, cudaStream_t stream, const char* op, const Published* inputs, int n,
                         size_t scratch_bytes, uint64_t* addrs, char** scratch) {
  Staging staging(m, stream);
  size_t staged = StagedBytes(&scratch_bytes, 1);
  for (int i = 0; i < n; ++i) staged += StagedBytes(&inputs[i].bytes, 1);
  if (auto err = staging.Reserve(staged, op); err.failure()) return err;
  for (int i = 0; i < n; ++i) {
    auto src = staging.Publish(inputs[i].data, inputs[i].bytes);
    if (!src.has_value()) return src.error();
    addrs[i] = reinterpret_cast<uint64_t>(*src);
  }
  *scratch = staging.active() ? staging.Take(scratch_bytes) : nullptr;
  return ffi::Error::Success();
}

}  // namespace jmd
