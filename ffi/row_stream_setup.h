// The row streams (row_streams.h) of the handlers that move rows into the permuted
// buffer (hybrid_handlers.cc, permute_handlers.cc): their remaining arguments and
// results, checked and turned into RowStreams.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "handlers_internal.h"
#include "row_streams.h"
#include "xla/ffi/api/ffi.h"

namespace jmd {

// The row streams of `op` ("hybrid dispatch", "permute"): inputs args[k], [num_in, ...]
// (`in_dim` names num_in in errors), into outputs rets[k], [num_out, ...] with the same
// row bytes and dtype; one to `max_streams` of them. Fills streams[0, n), each with the
// widest vector both its input's and its output's alignment allow, and returns n.
inline xla::ffi::ErrorOr<int32_t> SetUpRowStreams(const std::string& op, xla::ffi::RemainingArgs args,
                                                  xla::ffi::RemainingRets rets, int64_t num_in, const char* in_dim,
                                                  int64_t num_out, int max_streams, RowStream* streams) {
  const int64_t n = static_cast<int64_t>(args.size());
  if (n < 1 || n > max_streams || static_cast<int64_t>(rets.size()) != n) {
    return xla::ffi::Unexpected(Invalid("a " + op + " moves one to " + std::to_string(max_streams) +
                                            " row arrays (rows, FP8 scales, ...), one output each; arrays",
                                        n));
  }
  for (int64_t k = 0; k < n; ++k) {
    auto in = args.get<xla::ffi::AnyBuffer>(k);
    auto out = rets.get<xla::ffi::AnyBuffer>(k);
    if (!in.has_value()) return xla::ffi::Unexpected(in.error());
    if (!out.has_value()) return xla::ffi::Unexpected(out.error());
    const int64_t bytes = RowBytes(*in, 1);
    if (in->dimensions().size() < 1 || in->dimensions()[0] != num_in || (*out)->dimensions().size() < 1 ||
        (*out)->dimensions()[0] != num_out || RowBytes(**out, 1) != bytes ||
        in->element_type() != (*out)->element_type()) {
      return xla::ffi::Unexpected(Invalid(op + " rows " + std::to_string(k) + " must be [" + in_dim +
                                          ", ...] in and [N, ...] out, with the same row bytes and dtype"));
    }
    if (bytes > INT32_MAX / 2) {
      return xla::ffi::Unexpected(Invalid("rows over 1 GiB are not supported; row bytes", bytes));
    }
    RowStream& st = streams[k];
    st.src = static_cast<const char*>(in->untyped_data());
    st.dst = static_cast<char*>((*out)->untyped_data());
    st.bytes = static_cast<int32_t>(bytes);
    st.width = std::min(VectorWidth(bytes, st.src), VectorWidth(bytes, st.dst));
  }
  return static_cast<int32_t>(n);
}

}  // namespace jmd
