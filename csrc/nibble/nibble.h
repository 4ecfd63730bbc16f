// Signed 4-bit ("nibble") packing: the one C++ definition of the packed_int layout.
//
// Layout (NUMERICS.md, packed_int; lrqat_kernels/formats.py holds the Python twin):
//   w_int int8 [out, in], values in [-8, 7], `in` even  <->  packed uint8 [out, in / 2]
//   byte j of a row = column 2j in the low nibble | column 2j + 1 in the high nibble,
//   each nibble a 4-bit two's complement integer.
// Because `in` is even, a row never straddles a byte, so on contiguous tensors packed
// byte i (flat) holds flat elements 2i and 2i + 1: kernels can run over a flat index.
//
// The bit tricks are __host__ __device__ so the CPU loop and the CUDA kernel share them
// and cannot drift apart.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LRQAT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LRQAT_HOST_DEVICE inline
#endif

namespace lrqat {
namespace nibble {

constexpr int8_t kMin = -8;
constexpr int8_t kMax = 7;

// True when v fits a signed nibble. Written without branches so the CPU loop vectorizes.
LRQAT_HOST_DEVICE bool in_range(int8_t v) { return (v >= kMin) & (v <= kMax); }

// Two's complement keeps the low 4 bits of an in-range int8 as its nibble code, so
// packing is a mask and a shift. Out-of-range values are NOT saturated: only their low
// 4 bits survive (callers that cannot check, e.g. the CUDA kernel, document this).
LRQAT_HOST_DEVICE uint8_t pack2(int8_t lo, int8_t hi) {
  return static_cast<uint8_t>((static_cast<uint8_t>(lo) & 0x0Fu) |
                              ((static_cast<uint8_t>(hi) & 0x0Fu) << 4));
}

// Sign-extend a 4-bit code c in [0, 15]: (c ^ 8) - 8 maps 0..7 -> 0..7 and 8..15 -> -8..-1.
// Unlike `(int8_t)(c << 4) >> 4` it relies on no implementation-defined signed shift.
LRQAT_HOST_DEVICE int8_t sign_extend4(uint8_t c) {
  return static_cast<int8_t>(static_cast<int>(c ^ 0x08u) - 8);
}

LRQAT_HOST_DEVICE int8_t unpack_lo(uint8_t byte) { return sign_extend4(byte & 0x0Fu); }

LRQAT_HOST_DEVICE int8_t unpack_hi(uint8_t byte) {
  return sign_extend4(static_cast<uint8_t>(byte >> 4));
}

}  // namespace nibble
}  // namespace lrqat
