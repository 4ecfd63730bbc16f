// INT4 x float GEMM for CPUs (deployment of merged LR-QAT models): shared declarations.
//
//   y[M, N] = x[M, K] @ W_hat[N, K]^T (+ bias),  W_hat = scale * (w_int - zero_point)
//
// w_int is 4-bit signed (-8..7, NUMERICS.md "packed_int"); one fp32 scale (and optionally one
// integer zero point) per output channel or per group of `group_size` consecutive k.
//
// This header is included by the ISA-specific translation units (int4_cpu_avx512.cpp,
// int4_cpu_avx2.cpp, compiled with -mavx512* / -mavx2 by setup.py). It must therefore hold
// declarations, constexpr constants and PODs only: an inline function defined here would be
// compiled with AVX-512 in one TU and could be picked by the linker for the whole .so.
//
// ---------------------------------------------------------------------------------------
// Prepacked layout (lrqat::int4_prepack_cpu)
//
//   packed_weight  uint8  [Np, Kp / 8, 256]    Np = ceil(N / 64), Kp = K rounded up to 8
//   packed_scale   fp32   [Np, G, 64]          G = K / group_size (1 per channel)
//   packed_zero    int32  [Np, G, 64]          (optional) (8 + z) * 0x00010001
//
// A *panel* is 64 output columns (N is zero-padded to a multiple of 64). For panel p and k
// block b (8 consecutive k), the 256 bytes packed_weight[p, b] are 64 little-endian 32-bit
// words, word l for column n = 64 p + l. Word l holds the 8 nibbles of (n, 8 b .. 8 b + 7):
//
//     bits  4 j .. 4 j + 3        k = 8 b + 2 j       (j = 0..3)   even k in the low half
//     bits 16 + 4 j .. 16+4j+3    k = 8 b + 2 j + 1                odd  k in the high half
//
// Nibbles are offset-binary: u = w_int + 8 in 0..15 (prepack XORs the two's complement code
// with 8), so no sign extension is ever needed.
//
// Why this layout:
//   * one 64-byte load gives 16 columns (one zmm of fp32 lanes) x 8 k: the dequantised
//     vector is directly the B operand of a broadcast-A register-blocked micro-kernel, so
//     there is no transpose and no horizontal reduction, and the panel streams linearly;
//   * even / odd k 16 bits apart: shifting the word right by 4 j leaves the codes of k = 2j
//     and 2j + 1 in the low bits of the two 16-bit halves, which is exactly the (k, k + 1)
//     bf16 pair a lane of vdpbf16ps consumes. One shift + one vpermw (16-entry bf16 table)
//     dequantises 32 weights; the fp32 path uses one shift + one vpermps per 16 weights;
//   * scales are [panel, group, 64]: a group's 64 scales are one contiguous 256-byte read;
//   * the zero point is stored as the 16-bit pair (8 + z, 8 + z) so that one vpsubw turns
//     u into (w_int - z) mod 32 for a 32-entry table lookup (q - z is in -15..15, exact in
//     bf16).
// ---------------------------------------------------------------------------------------
#pragma once

#include <cstdint>

namespace lrqat {
namespace int4_cpu {

constexpr int64_t kPanel = 64;         // output columns per panel
constexpr int64_t kKBlock = 8;         // k per 32-bit word
constexpr int64_t kBlockBytes = 256;   // bytes of one (panel, k block)
constexpr int64_t kKChunk = 256;       // k per dequantised chunk of the large-M path
constexpr int64_t kMaxRowsPerTask = 480;  // rows per task of the large-M path (C scratch)
constexpr int64_t kSmallMaxRows = 2;      // tasks of <= this many rows: the streaming (decode) kernel

enum : int { kXF32 = 0, kXBF16 = 1 };
enum : int { kYF32 = 0, kYBF16 = 1, kYF16 = 2 };

// One GEMM call. All pointers are raw host memory; x and y are row-major.
struct GemmParams {
  const void* x;          // [M, ldx]: fp32 or bf16 (x_type); columns K..Kp-1 are zeros
  int64_t ldx;            // elements
  int64_t M;
  int64_t Kp;             // multiple of 8
  int64_t group_k;        // k per scale group, multiple of 8 (== Kp when per channel)
  int64_t G;              // groups
  const uint32_t* w;      // packed_weight as words: [Np][Kp / 8][64]
  const float* scale;     // [Np][G][64]
  const int32_t* zz;      // [Np][G][64] or nullptr (symmetric)
  const float* bias;      // [N] fp32 or nullptr
  void* y;                // [M, ldy]: fp32, bf16 or fp16 (y_type)
  int64_t ldy;            // elements
  int64_t N;              // valid output columns
  int x_type;
  int y_type;
};

// Floats of scratch one task needs (64-byte aligned): a dequantised chunk plus an fp32
// accumulator tile for `rows` rows of one panel.
constexpr int64_t scratch_floats(int64_t rows) { return kKChunk * kPanel + rows * kPanel + 64; }

// Kernels: panels [p0, p1), rows [m0, m1). `scratch` holds scratch_floats(m1 - m0) floats.
// The AVX-512 kernel needs avx512f/bw/vl + avx512bf16 (checked by the caller); it reads
// bf16 x (vdpbf16ps) or fp32 x, writes fp32/bf16/fp16 y.
// The AVX2 kernel needs avx2 + fma; it reads fp32 x only and writes fp32 y only.
void gemm_avx512(const GemmParams& p, int64_t p0, int64_t p1, int64_t m0, int64_t m1, float* scratch);
void gemm_avx2(const GemmParams& p, int64_t p0, int64_t p1, int64_t m0, int64_t m1, float* scratch);

}  // namespace int4_cpu
}  // namespace lrqat
