// AVX-512F kernel of lrqat::binary_linear_cpu (layout and contract: binary_cpu.h).
//
// Compiled with -mavx512* (setup.py, by file name), called only after a runtime avx512f check;
// uses AVX-512F only. Two bytes of a packed row are directly a __mmask16 over 16 consecutive k
// (LSB-first), so P = sum of x where the bit is 1 is one _mm512_mask_add_ps per 16 weights and
// row of x. kRowBlock rows share each mask (the weight stream is read once per row block), k runs
// in chunks of kKChunk so those rows' x stays in L1 across all n (partial sums go through y), and
// two accumulators per row (even / odd 16-k chunk) hide the add latency at M = 1.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "binary_cpu/binary_cpu.h"

namespace lrqat {
namespace binary_cpu {
namespace {

inline __mmask16 mask_at(const uint8_t* wrow, int64_t k, int64_t ldw) {
  const int64_t b = k >> 3;
  uint16_t m = wrow[b];
  if (b + 1 < ldw) m |= static_cast<uint16_t>(wrow[b + 1]) << 8;
  return static_cast<__mmask16>(m);
}

// Partial P of rows [m0, m0 + R) over k in [k0, k1) for every n, added into y (written at k0 == 0).
template <int R>
void rows(const GemmParams& p, int64_t m0, int64_t k0, int64_t k1) {
  const int64_t K32 = k0 + ((k1 - k0) & ~int64_t(31));
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = p.x + (m0 + r) * p.ldx;
  for (int64_t n = p.n0; n < p.n1; ++n) {
    const uint8_t* wrow = p.w + n * p.ldw;
    __m512 a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k < K32; k += 32) {
      uint32_t bits;
      std::memcpy(&bits, wrow + (k >> 3), 4);  // 4 full bytes: k + 31 < k1 <= K
      const __mmask16 lo = static_cast<__mmask16>(bits), hi = static_cast<__mmask16>(bits >> 16);
      for (int r = 0; r < R; ++r) {
        a0[r] = _mm512_mask_add_ps(a0[r], lo, a0[r], _mm512_loadu_ps(xr[r] + k));
        a1[r] = _mm512_mask_add_ps(a1[r], hi, a1[r], _mm512_loadu_ps(xr[r] + k + 16));
      }
    }
    for (; k < k1; k += 16) {  // tail (last chunk only): valid lanes only, padding bits are 0 anyway
      const int64_t left = k1 - k;
      const __mmask16 valid = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      const __mmask16 m = mask_at(wrow, k, p.ldw) & valid;
      for (int r = 0; r < R; ++r)
        a0[r] = _mm512_mask_add_ps(a0[r], m, a0[r], _mm512_maskz_loadu_ps(valid, xr[r] + k));
    }
    for (int r = 0; r < R; ++r) {
      const float P = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
      float& y = p.y[(m0 + r) * p.ldy + n];
      y = k0 == 0 ? P : y + P;
    }
  }
}

template <int R>
void block(const GemmParams& p, int64_t m0) {
  // k in chunks of kKChunk: the R rows' chunk of x (R * 4 KiB) stays in L1 while every n reads it.
  for (int64_t k0 = 0; k0 < p.K || k0 == 0; k0 += kKChunk) rows<R>(p, m0, k0, k0 + kKChunk < p.K ? k0 + kKChunk : p.K);
  for (int r = 0; r < R; ++r)
    for (int64_t n = p.n0; n < p.n1; ++n) {
      float& y = p.y[(m0 + r) * p.ldy + n];
      y = p.scale[n * p.scale_stride] * (2.0f * y - p.rowsum[m0 + r]) + (p.bias ? p.bias[n] : 0.0f);
    }
}

}  // namespace

void gemm_avx512(const GemmParams& p) {
  int64_t m = 0;
  for (; m + kRowBlock <= p.M; m += kRowBlock) block<kRowBlock>(p, m);
  for (; m < p.M; ++m) block<1>(p, m);
}

}  // namespace binary_cpu
}  // namespace lrqat
