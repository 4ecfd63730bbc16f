// 1-bit x fp32 GEMM for CPUs (deployment of pQuant's binary branch): shared declarations.
//
//   y[M, N] = scale * (x[M, K] @ S[N, K]^T) + bias,   S[n, k] = +1 or -1
//
// Weight layout (lrqat_kernels.pquant.pack_signs): uint8 [N, ceil(K / 8)], LSB-first along k:
// bit j (value 1 << j) of byte b of row n is S[n, 8 b + j]; 1 means +1, 0 means -1; padding
// bits past K are 0. The kernels use  x . S_n = 2 * P - T  with  P = sum of x[k] where the bit
// is 1  and  T = sum of x (one per row of x, shared by every n): one masked add per 16 weights
// (AVX-512 mask registers are the packed bits themselves), no unpacking.
//
// Included by the ISA translation units (binary_cpu_avx512.cpp, binary_cpu_avx2.cpp, compiled
// with -mavx512* / -mavx2): declarations and PODs only (an inline function here could be
// compiled with AVX-512 in one TU and picked by the linker for the whole .so).
#pragma once

#include <cstdint>

namespace lrqat {
namespace binary_cpu {

constexpr int kRowBlock = 4;       // rows of x sharing one weight mask load
constexpr int64_t kKChunk = 1024;  // k per pass of the AVX-512 kernel (a multiple of 32)

// One call covers output columns [n0, n1) for all M rows. Raw host memory, row-major.
struct GemmParams {
  const float* x;        // [M, K], row stride ldx
  int64_t ldx;
  int64_t M;
  int64_t K;
  const uint8_t* w;      // [N, ldw] packed signs, ldw = ceil(K / 8)
  int64_t ldw;
  const float* rowsum;   // [M]: T = sum_k x[m, k]
  const float* scale;    // [1] or [N] (scale_stride 0 or 1)
  int64_t scale_stride;
  const float* bias;     // [N] or nullptr
  float* y;              // [M, N], row stride ldy
  int64_t ldy;
  int64_t n0;
  int64_t n1;
};

void gemm_avx512(const GemmParams& p);
void gemm_avx2(const GemmParams& p);

}  // namespace binary_cpu
}  // namespace lrqat
