// Vector types for row copies: VecOf<W>::T moves W bytes (16, 8, 4, 2, 1), and
// JMD_SWITCH_WIDTH(width, body) runs `body` with constexpr int W = width.
#pragma once

#include <cuda_runtime.h>

namespace jmd {

template <int W> struct VecOf;
template <> struct VecOf<16> { using T = int4; };
template <> struct VecOf<8> { using T = int2; };
template <> struct VecOf<4> { using T = int; };
template <> struct VecOf<2> { using T = short; };
template <> struct VecOf<1> { using T = char; };

}  // namespace jmd

#define JMD_SWITCH_WIDTH(width, ...)                       \
  switch (width) {                                         \
    case 16: { constexpr int W = 16; __VA_ARGS__; } break; \
    case 8: { constexpr int W = 8; __VA_ARGS__; } break;   \
    case 4: { constexpr int W = 4; __VA_ARGS__; } break;   \
    case 2: { constexpr int W = 2; __VA_ARGS__; } break;   \
    default: { constexpr int W = 1; __VA_ARGS__; } break;  \
  }
