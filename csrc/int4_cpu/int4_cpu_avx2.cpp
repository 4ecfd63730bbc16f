// AVX2 + FMA kernel of lrqat::int4_linear (layout and contract: int4_cpu.h).
//
// Compiled with -mavx2 -mfma (setup.py, by file name) and only called after a runtime check:
// leaf code over raw pointers, no ATen / STL headers.
//
// AVX2 has no bf16 dot product and no 16-bit / 32-entry permutes, so this path is fp32 only
// (the caller widens bf16 / fp16 x to fp32 and narrows y afterwards) and dequantises with
// integer ops: u = (word >> shift) & 15, (u - (8 + z)) converted to fp32 (exact), times the
// scale: W_hat = scale * (w_int - z) exactly as the reference computes it.
// One structure for every M: a chunk of the panel (kChunk x 64 fp32 = 16 KiB, L1-resident)
// is dequantised once, then a 6 x 16 register-blocked micro-kernel (12 ymm accumulators,
// 2 B loads + 6 broadcasts per k) runs over the task's rows, four times per panel.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "int4_cpu/int4_cpu.h"

namespace lrqat {
namespace int4_cpu {
namespace {

constexpr int64_t kChunk = 64;
constexpr int kMR = 6;
static_assert(kChunk <= kKChunk, "scratch too small");

template <bool ZP>
void dequant_chunk(const GemmParams& p, int64_t panel, int64_t kb0, int64_t kb1, float* buf) {
  const uint32_t* wp = p.w + (panel * (p.Kp / kKBlock) + kb0) * kPanel;
  const float* sp = p.scale + panel * p.G * kPanel;
  const int32_t* zp = ZP ? p.zz + panel * p.G * kPanel : nullptr;
  const int64_t kb_per_group = p.group_k / kKBlock;
  const __m256i mask = _mm256_set1_epi32(0xF);
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  for (int64_t kb = kb0; kb < kb1; ++kb, wp += kPanel, buf += kKBlock * kPanel) {
    const int64_t g = kb / kb_per_group;
    for (int v = 0; v < 8; ++v) {
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + v * 8));
      const __m256 s = _mm256_loadu_ps(sp + g * kPanel + v * 8);
      // 8 + z (the stored word repeats it in both halves; keep one).
      const __m256i off =
          ZP ? _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(zp + g * kPanel + v * 8)), low16)
             : _mm256_set1_epi32(8);
      float* b = buf + v * 8;
      for (int kk = 0; kk < 8; ++kk) {
        const int shift = (kk & 1) * 16 + (kk >> 1) * 4;
        const __m256i u = _mm256_and_si256(_mm256_srli_epi32(d, shift), mask);
        const __m256 q = _mm256_cvtepi32_ps(_mm256_sub_epi32(u, off));
        _mm256_store_ps(b + kk * kPanel, _mm256_mul_ps(q, s));
      }
    }
  }
}

// C[0..MR) x 16 += x[0..MR) . buf[:, 16 columns]; buf rows are kPanel floats apart.
template <int MR>
void micro(const float* x, int64_t ldx, const float* buf, int64_t nk, float* C) {
  // Fully unrolled over rows (pragmas): otherwise GCC keeps acc[][] on the stack and stores
  // every accumulator back each k step.
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = _mm256_setzero_ps();
    acc[r][1] = _mm256_setzero_ps();
  }
  const float* xr[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) xr[r] = x + r * ldx;
  for (int64_t k = 0; k < nk; ++k) {
    const __m256 b0 = _mm256_load_ps(buf + k * kPanel);
    const __m256 b1 = _mm256_load_ps(buf + k * kPanel + 8);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 a = _mm256_broadcast_ss(xr[r] + k);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    float* c = C + r * kPanel;
    _mm256_store_ps(c, _mm256_add_ps(acc[r][0], _mm256_load_ps(c)));
    _mm256_store_ps(c + 8, _mm256_add_ps(acc[r][1], _mm256_load_ps(c + 8)));
  }
}

typedef void (*Micro)(const float*, int64_t, const float*, int64_t, float*);
const Micro kMicro[kMR + 1] = {nullptr, micro<1>, micro<2>, micro<3>, micro<4>, micro<5>, micro<6>};

template <bool ZP>
void gemm(const GemmParams& p, int64_t p0, int64_t p1, int64_t m0, int64_t m1, float* scratch) {
  float* buf = scratch;
  float* C = scratch + kKChunk * kPanel;
  const int64_t rows = m1 - m0;
  const float* x = static_cast<const float*>(p.x);
  float* y = static_cast<float*>(p.y);
  for (int64_t panel = p0; panel < p1; ++panel) {
    std::memset(C, 0, sizeof(float) * rows * kPanel);
    for (int64_t k0 = 0; k0 < p.Kp; k0 += kChunk) {
      const int64_t k1 = k0 + kChunk < p.Kp ? k0 + kChunk : p.Kp;
      dequant_chunk<ZP>(p, panel, k0 / kKBlock, k1 / kKBlock, buf);
      for (int64_t mb = m0; mb < m1; mb += kMR) {
        const int mr = static_cast<int>(m1 - mb < kMR ? m1 - mb : kMR);
        for (int c = 0; c < 4; ++c)
          kMicro[mr](x + mb * p.ldx + k0, p.ldx, buf + c * 16, k1 - k0, C + (mb - m0) * kPanel + c * 16);
      }
    }
    const int64_t n0 = panel * kPanel;
    const int64_t nn = p.N - n0 < kPanel ? p.N - n0 : kPanel;
    for (int64_t r = 0; r < rows; ++r) {
      float* yr = y + (m0 + r) * p.ldy + n0;
      const float* cr = C + r * kPanel;
      for (int64_t j = 0; j < nn; ++j) yr[j] = cr[j] + (p.bias ? p.bias[n0 + j] : 0.0f);
    }
  }
}

}  // namespace

void gemm_avx2(const GemmParams& p, int64_t p0, int64_t p1, int64_t m0, int64_t m1, float* scratch) {
  if (p0 >= p1 || m0 >= m1) return;
  p.zz ? gemm<true>(p, p0, p1, m0, m1, scratch) : gemm<false>(p, p0, p1, m0, m1, scratch);
}

}  // namespace int4_cpu
}  // namespace lrqat
