// AVX2 kernel of lrqat::binary_linear_cpu (layout and contract: binary_cpu.h).
//
// Compiled with -mavx2 -mfma (setup.py, by file name), called only after a runtime check. AVX2
// has no mask registers: one packed byte (8 k) is broadcast, ANDed with the lane bits
// (1, 2, ..., 128) and compared, giving an all-ones lane where the bit is 1; P accumulates
// x AND that lane mask. kRowBlock rows share each expanded mask.
#include <immintrin.h>

#include <cstdint>

#include "binary_cpu/binary_cpu.h"

namespace lrqat {
namespace binary_cpu {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R>
void rows(const GemmParams& p, int64_t m0) {
  const int64_t K = p.K;
  const int64_t K8 = K & ~int64_t(7), K16 = K & ~int64_t(15);
  const __m256i lane_bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = p.x + (m0 + r) * p.ldx;
  for (int64_t n = p.n0; n < p.n1; ++n) {
    const uint8_t* wrow = p.w + n * p.ldw;
    __m256 acc[R], acc1[R];  // two chains per row (even / odd byte) hide the add latency at M = 1
    float tail[R];
    for (int r = 0; r < R; ++r) acc[r] = acc1[r] = _mm256_setzero_ps(), tail[r] = 0.0f;
    int64_t k = 0;
    for (; k < K16; k += 16) {
      const __m256i b0 = _mm256_set1_epi32(wrow[k >> 3]), b1 = _mm256_set1_epi32(wrow[(k >> 3) + 1]);
      const __m256 m0v = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b0, lane_bits), lane_bits));
      const __m256 m1v = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b1, lane_bits), lane_bits));
      for (int r = 0; r < R; ++r) {
        acc[r] = _mm256_add_ps(acc[r], _mm256_and_ps(m0v, _mm256_loadu_ps(xr[r] + k)));
        acc1[r] = _mm256_add_ps(acc1[r], _mm256_and_ps(m1v, _mm256_loadu_ps(xr[r] + k + 8)));
      }
    }
    for (; k < K8; k += 8) {
      const __m256i b = _mm256_set1_epi32(wrow[k >> 3]);
      const __m256 m = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, lane_bits), lane_bits));
      for (int r = 0; r < R; ++r) acc[r] = _mm256_add_ps(acc[r], _mm256_and_ps(m, _mm256_loadu_ps(xr[r] + k)));
    }
    for (int64_t k = K8; k < K; ++k) {
      if ((wrow[k >> 3] >> (k & 7)) & 1)
        for (int r = 0; r < R; ++r) tail[r] += xr[r][k];
    }
    const float s = p.scale[n * p.scale_stride];
    const float bias = p.bias ? p.bias[n] : 0.0f;
    for (int r = 0; r < R; ++r) {
      const float P = hsum(_mm256_add_ps(acc[r], acc1[r])) + tail[r];
      p.y[(m0 + r) * p.ldy + n] = s * (2.0f * P - p.rowsum[m0 + r]) + bias;
    }
  }
}

}  // namespace

void gemm_avx2(const GemmParams& p) {
  int64_t m = 0;
  for (; m + kRowBlock <= p.M; m += kRowBlock) rows<kRowBlock>(p, m);
  for (; m < p.M; ++m) rows<1>(p, m);
}

}  // namespace binary_cpu
}  // namespace lrqat
