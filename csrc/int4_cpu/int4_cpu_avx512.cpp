// AVX-512 kernels of lrqat::int4_linear (layout and contract: int4_cpu.h).
//
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512bf16 -mfma (setup.py, by file name)
// and only called after a runtime check, so: leaf code over raw pointers, everything in an
// anonymous namespace except the entry point, no ATen / STL headers.
//
// Two activation paths:
//   bf16 x: vdpbf16ps (32 multiply-adds per instruction, 2x the fp32 FMA rate). The weights
//           are dequantised to the *exact* integers (w_int - z) in -15..15 (exact in bf16),
//           the products x * (w_int - z) are exact in fp32, and the per-group scale is
//           applied once per group in fp32 ("fold": acc += scale * partial). So the result
//           is the fp32 dot product of x with W_hat = scale * (w_int - z), up to fp32
//           summation order: no bf16 rounding of W_hat anywhere.
//   fp32 x: (fp16 x is widened to fp32 by the caller) W_hat = scale * (w_int - z) is computed
//           in fp32 exactly as the reference does, then fp32 FMA.
//
// Two shapes of work:
//   small M (1 or 2 rows, kSmallMaxRows): weights stream once from memory; every 64-byte load
//           of the panel is dequantised in registers (shift + vpermw / vpermps) and used by
//           all rows, final sums in registers. This is the memory-bound decode case: the work
//           per weight byte must stay below what DRAM / L3 delivers, hence the table lookups
//           instead of convert chains. (From 3 rows on, the large-M micro-kernel streams the
//           weights faster: measured.)
//   large M, bf16 x: a 6 x 64 register-blocked micro-kernel (24 zmm accumulators; per k pair
//           4 weight loads + 3 shifts + 4 vpermw + 6 broadcasts feed 24 vdpbf16ps) runs over
//           row blocks of 6, re-dequantising the packed words in registers for every block:
//           the shifts / permutes issue on other ports than the dot products, so this costs
//           nothing, while a dequantised bf16 buffer would cost a store per 32 weights. A
//           chunk of 512 k of the panel (16 KiB of packed words) stays in L1 for all blocks.
//           Groups <= 64 k: 3-row blocks whose per-group fold stays in registers.
//   large M, fp32 x: a chunk of W_hat (64 k x 64 columns fp32) is dequantised once into an
//           L1-resident buffer, then a 6 x 64 FMA micro-kernel runs over the row blocks.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "int4_cpu/int4_cpu.h"

// GCC 12's own _mm512_srli_epi32 trips -Wmaybe-uninitialized (its `__Y = __Y` placeholder for
// an unused merge source); the warning is about the header, not this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace lrqat {
namespace int4_cpu {
namespace {

// k per chunk of the large-M bf16 path: 512 k x 64 columns of packed words = 16 KiB, which
// stays in the 32 KiB L1 together with the x rows and C tile the micro-kernel touches.
constexpr int64_t kChunkBF16 = 512;
constexpr int64_t kChunkF32 = 64;  // 64 k x 64 columns x 4 B = 16 KiB
constexpr int kMR = 6;             // rows of the large-M micro-kernel

static_assert(kChunkF32 <= kKChunk, "scratch too small");

inline uint16_t bf16_bits_of_small_int(int v) {
  // Small integers are exact in bf16: the fp32 bits truncated to the top half.
  float f = static_cast<float>(v);
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return static_cast<uint16_t>(bits >> 16);
}

struct Luts {
  __m512i bf16_u;     // vpermw table: index u (bit 4 ignored: entries repeat) -> bf16(u - 8)
  __m512i bf16_s5;    // vpermw table: 5-bit two's complement i -> bf16(i)
  __m512 f32_u;       // vpermps table: index u (low 4 bits) -> u - 8
  __m512 f32_s5_lo;   // vpermt2ps tables: i in 0..15 -> i, i in 16..31 -> i - 32
  __m512 f32_s5_hi;
};

inline Luts make_luts() {
  alignas(64) uint16_t t16[32];
  alignas(64) uint16_t t5[32];
  alignas(64) float f16[16];
  alignas(64) float lo[16];
  alignas(64) float hi[16];
  for (int i = 0; i < 32; ++i) {
    t16[i] = bf16_bits_of_small_int((i & 15) - 8);
    t5[i] = bf16_bits_of_small_int(i < 16 ? i : i - 32);
  }
  for (int i = 0; i < 16; ++i) {
    f16[i] = static_cast<float>(i - 8);
    lo[i] = static_cast<float>(i);
    hi[i] = static_cast<float>(i - 16);
  }
  Luts l;
  l.bf16_u = _mm512_load_si512(t16);
  l.bf16_s5 = _mm512_load_si512(t5);
  l.f32_u = _mm512_load_ps(f16);
  l.f32_s5_lo = _mm512_load_ps(lo);
  l.f32_s5_hi = _mm512_load_ps(hi);
  return l;
}

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

inline __m512bh bcast_pair(const uint16_t* x) {
  int32_t v;
  std::memcpy(&v, x, 4);
  return as_bh(_mm512_set1_epi32(v));
}

// The bf16 pairs (k = 8b + 2J, 8b + 2J + 1) of 16 columns from their words `d`.
// zz: per-lane 16-bit pairs (8 + z); with a zero point, (u - 8 - z) mod 32 indexes the
// 32-entry signed table, so the zero point costs one AND and one SUB, no conversion.
template <int J, bool ZP>
inline __m512i deq_pair(__m512i d, const Luts& l, __m512i zz) {
  __m512i t = J ? _mm512_srli_epi32(d, 4 * J) : d;
  if (ZP) {
    t = _mm512_and_si512(t, _mm512_set1_epi32(0x000F000F));
    t = _mm512_sub_epi16(t, zz);
    return _mm512_permutexvar_epi16(t, l.bf16_s5);
  }
  return _mm512_permutexvar_epi16(t, l.bf16_u);
}

// fp32 (w_int - z) of k = 8b + KK for 16 columns.
template <int KK, bool ZP>
inline __m512 deq_f32(__m512i d, const Luts& l, __m512i zz) {
  constexpr int shift = (KK & 1) * 16 + (KK >> 1) * 4;
  __m512i t = shift ? _mm512_srli_epi32(d, shift) : d;
  if (ZP) {
    t = _mm512_and_si512(t, _mm512_set1_epi32(0xF));
    t = _mm512_sub_epi32(t, zz);  // low 5 bits = (u - 8 - z) mod 32
    return _mm512_permutex2var_ps(l.f32_s5_lo, t, l.f32_s5_hi);
  }
  return _mm512_permutexvar_ps(t, l.f32_u);
}

inline __mmask16 col_mask(int64_t n0, int64_t N) {
  if (n0 + 16 <= N) return 0xFFFF;
  if (n0 >= N) return 0;
  return static_cast<__mmask16>((1u << (N - n0)) - 1u);
}

// y[m, n0 .. n0 + 15] = v (+ bias), converted to the output dtype, masked at the N edge.
inline void store16(const GemmParams& p, int64_t m, int64_t n0, __m512 v) {
  const __mmask16 mask = col_mask(n0, p.N);
  if (!mask) return;
  if (p.bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, p.bias + n0));
  const int64_t off = m * p.ldy + n0;
  if (p.y_type == kYF32) {
    _mm512_mask_storeu_ps(static_cast<float*>(p.y) + off, mask, v);
  } else if (p.y_type == kYBF16) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);  // round to nearest even
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.y) + off, mask, h);
  } else {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.y) + off, mask, h);
  }
}

// ---------------------------------------------------------------------------------------
// Small M, bf16 x: rows m0 .. m0 + M - 1 of one panel, NV zmm (16 columns each) at a time.
// Per group: partial sums of x * (w_int - z) in vdpbf16ps, then fin += scale * partial.
// S independent sets of partial sums (k pair J goes to set J % S): with M = 1 a single set is
// only 4 dependency chains, and vdpbf16ps latency, not throughput, would bound the loop.
template <int M, int NV, bool ZP, int S = 1>
void small_bf16(const GemmParams& p, const Luts& l, int64_t panel, int64_t m0) {
  const int64_t nkb = p.Kp / kKBlock;
  const uint16_t* x = static_cast<const uint16_t*>(p.x) + m0 * p.ldx;
  const uint32_t* wp = p.w + panel * nkb * kPanel;
  const float* sp = p.scale + panel * p.G * kPanel;
  const int32_t* zp = ZP ? p.zz + panel * p.G * kPanel : nullptr;
  const int64_t kb_per_group = p.group_k / kKBlock;
  for (int h = 0; h < 4 / NV; ++h) {
    const int off = h * NV * 16;
    __m512 fin[M][NV];
    for (int m = 0; m < M; ++m)
      for (int v = 0; v < NV; ++v) fin[m][v] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.G; ++g) {
      __m512i zz[NV];
      for (int v = 0; v < NV; ++v)
        zz[v] = ZP ? _mm512_loadu_si512(zp + g * kPanel + off + v * 16) : _mm512_setzero_si512();
      __m512 part[S][M][NV];
      for (int t = 0; t < S; ++t)
        for (int m = 0; m < M; ++m)
          for (int v = 0; v < NV; ++v) part[t][m][v] = _mm512_setzero_ps();
      const int64_t kb0 = g * kb_per_group;
      const int64_t kb1 = kb0 + kb_per_group < nkb ? kb0 + kb_per_group : nkb;
      const uint32_t* wk = wp + kb0 * kPanel + off;
      const uint16_t* xk = x + kb0 * kKBlock;
      for (int64_t kb = kb0; kb < kb1; ++kb, wk += kPanel, xk += kKBlock) {
        // ~2 KiB ahead on the panel stream. Measured on Zen 4 with DRAM-resident weights: +9 %
        // for M = 4, but -10 % for M = 1, where the loop is nearly bandwidth bound and the
        // hardware prefetcher alone keeps up (the extra load uop only costs issue slots).
        if (M > 1) _mm_prefetch(reinterpret_cast<const char*>(wk + 8 * kPanel), _MM_HINT_T0);
        __m512i d[NV];
        for (int v = 0; v < NV; ++v) d[v] = _mm512_loadu_si512(wk + v * 16);
#define LRQAT_SMALL_BF16_STEP(J)                                              \
  {                                                                           \
    __m512bh a[M];                                                            \
    for (int m = 0; m < M; ++m) a[m] = bcast_pair(xk + m * p.ldx + 2 * (J));  \
    for (int v = 0; v < NV; ++v) {                                            \
      const __m512bh b = as_bh(deq_pair<J, ZP>(d[v], l, zz[v]));              \
      for (int m = 0; m < M; ++m) part[(J) % S][m][v] = _mm512_dpbf16_ps(part[(J) % S][m][v], a[m], b); \
    }                                                                         \
  }
        LRQAT_SMALL_BF16_STEP(0)
        LRQAT_SMALL_BF16_STEP(1)
        LRQAT_SMALL_BF16_STEP(2)
        LRQAT_SMALL_BF16_STEP(3)
#undef LRQAT_SMALL_BF16_STEP
      }
      for (int v = 0; v < NV; ++v) {
        const __m512 s = _mm512_loadu_ps(sp + g * kPanel + off + v * 16);
        for (int m = 0; m < M; ++m) {
          __m512 sum = part[0][m][v];
          for (int t = 1; t < S; ++t) sum = _mm512_add_ps(sum, part[t][m][v]);
          fin[m][v] = _mm512_fmadd_ps(sum, s, fin[m][v]);
        }
      }
    }
    for (int m = 0; m < M; ++m)
      for (int v = 0; v < NV; ++v) store16(p, m0 + m, panel * kPanel + off + v * 16, fin[m][v]);
  }
}

// Small M, fp32 x: W_hat = scale * (w_int - z) in fp32 (as the reference), then FMA.
// S accumulator sets as in small_bf16 (k KK goes to set KK % S).
template <int M, int NV, bool ZP, int S = 1>
void small_f32(const GemmParams& p, const Luts& l, int64_t panel, int64_t m0) {
  const int64_t nkb = p.Kp / kKBlock;
  const float* x = static_cast<const float*>(p.x) + m0 * p.ldx;
  const uint32_t* wp = p.w + panel * nkb * kPanel;
  const float* sp = p.scale + panel * p.G * kPanel;
  const int32_t* zp = ZP ? p.zz + panel * p.G * kPanel : nullptr;
  const int64_t kb_per_group = p.group_k / kKBlock;
  for (int h = 0; h < 4 / NV; ++h) {
    const int off = h * NV * 16;
    __m512 acc[S][M][NV];
    for (int t = 0; t < S; ++t)
      for (int m = 0; m < M; ++m)
        for (int v = 0; v < NV; ++v) acc[t][m][v] = _mm512_setzero_ps();
    for (int64_t g = 0; g < p.G; ++g) {
      __m512i zz[NV];
      __m512 s[NV];
      for (int v = 0; v < NV; ++v) {
        zz[v] = ZP ? _mm512_loadu_si512(zp + g * kPanel + off + v * 16) : _mm512_setzero_si512();
        s[v] = _mm512_loadu_ps(sp + g * kPanel + off + v * 16);
      }
      const int64_t kb0 = g * kb_per_group;
      const int64_t kb1 = kb0 + kb_per_group < nkb ? kb0 + kb_per_group : nkb;
      const uint32_t* wk = wp + kb0 * kPanel + off;
      const float* xk = x + kb0 * kKBlock;
      for (int64_t kb = kb0; kb < kb1; ++kb, wk += kPanel, xk += kKBlock) {
        if (M > 1) _mm_prefetch(reinterpret_cast<const char*>(wk + 8 * kPanel), _MM_HINT_T0);
        __m512i d[NV];
        for (int v = 0; v < NV; ++v) d[v] = _mm512_loadu_si512(wk + v * 16);
#define LRQAT_SMALL_F32_STEP(KK)                                                 \
  {                                                                              \
    __m512 a[M];                                                                 \
    for (int m = 0; m < M; ++m) a[m] = _mm512_set1_ps(xk[m * p.ldx + (KK)]);     \
    for (int v = 0; v < NV; ++v) {                                               \
      const __m512 w = _mm512_mul_ps(deq_f32<KK, ZP>(d[v], l, zz[v]), s[v]);     \
      for (int m = 0; m < M; ++m) acc[(KK) % S][m][v] = _mm512_fmadd_ps(a[m], w, acc[(KK) % S][m][v]); \
    }                                                                            \
  }
        LRQAT_SMALL_F32_STEP(0)
        LRQAT_SMALL_F32_STEP(1)
        LRQAT_SMALL_F32_STEP(2)
        LRQAT_SMALL_F32_STEP(3)
        LRQAT_SMALL_F32_STEP(4)
        LRQAT_SMALL_F32_STEP(5)
        LRQAT_SMALL_F32_STEP(6)
        LRQAT_SMALL_F32_STEP(7)
#undef LRQAT_SMALL_F32_STEP
      }
    }
    for (int m = 0; m < M; ++m)
      for (int v = 0; v < NV; ++v) {
        __m512 sum = acc[0][m][v];
        for (int t = 1; t < S; ++t) sum = _mm512_add_ps(sum, acc[t][m][v]);
        store16(p, m0 + m, panel * kPanel + off + v * 16, sum);
      }
  }
}

// ---------------------------------------------------------------------------------------
// Large M, bf16 x.
//
// No dequantised buffer: every row block dequantises the packed words again, in registers.
// That looks wasteful but is free here: per k pair, 4 loads + 3 shifts + 4 vpermw feed
// 24 vdpbf16ps, and on this class of core (Zen 4: measured) the shifts and permutes issue
// on other ports than the dot products, so a 6 x 64 tile runs at the dot-product peak. A
// bf16 buffer instead costs a 512-bit store per 32 weights (store-bound: ~15 % at M = 16)
// and 4x the L1 footprint of the packed words it replaces.

// C[0..MR) x 64 += sum over the segments of [k0, k1) of scale[g] * (x[0..MR) . (w_int - z)).
// A segment is the part of [k0, k1) inside one scale group. x points at column k0 of the
// first row, rows ldx apart; wk at the words of k block k0 / 8 of the panel. The
// accumulators stay in registers for a whole segment; the fold touches the L1-resident C tile
// once per segment.
template <int MR, bool ZP>
void micro_bf16(const uint16_t* x, int64_t ldx, const uint32_t* wk, int64_t k0, int64_t k1, int64_t group_k,
                const float* sp, const int32_t* zp, float* C, const Luts& l) {
  const uint16_t* xr[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) xr[r] = x + r * ldx;
  // (No software prefetch of x: measured 2 % slower than the hardware prefetcher alone.)
  for (int64_t s = k0; s < k1;) {
    const int64_t g = s / group_k;
    const int64_t ge = (g + 1) * group_k;
    const int64_t e = ge < k1 ? ge : k1;
    __m512 acc[MR][4];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
    }
    const int32_t* zg = ZP ? zp + g * kPanel : nullptr;
    for (int64_t kb = (s - k0) / kKBlock; kb < (e - k0) / kKBlock; ++kb) {
      const uint32_t* wb = wk + kb * kPanel;
      const int64_t q = kb * 4;  // first pair of the block, relative to k0
// The 4 dequantised B vectors first, then row by row (one broadcast, 4 dot products): 2 %
// faster than interleaving per column vector (measured), as each broadcast is used at once.
#define LRQAT_MICRO_STEP(J)                                                                  \
  {                                                                                          \
    __m512bh bb[4];                                                                          \
    _Pragma("GCC unroll 4") for (int v = 0; v < 4; ++v) {                                    \
      const __m512i zz = ZP ? _mm512_loadu_si512(zg + v * 16) : _mm512_setzero_si512();      \
      bb[v] = as_bh(deq_pair<J, ZP>(_mm512_loadu_si512(wb + v * 16), l, zz));                \
    }                                                                                        \
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {                                   \
      const __m512bh a = bcast_pair(xr[r] + 2 * (q + (J)));                                  \
      _Pragma("GCC unroll 4") for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, bb[v]); \
    }                                                                                        \
  }
      LRQAT_MICRO_STEP(0)
      LRQAT_MICRO_STEP(1)
      LRQAT_MICRO_STEP(2)
      LRQAT_MICRO_STEP(3)
#undef LRQAT_MICRO_STEP
    }
    const __m512 s0 = _mm512_loadu_ps(sp + g * kPanel + 0);
    const __m512 s1 = _mm512_loadu_ps(sp + g * kPanel + 16);
    const __m512 s2 = _mm512_loadu_ps(sp + g * kPanel + 32);
    const __m512 s3 = _mm512_loadu_ps(sp + g * kPanel + 48);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      float* c = C + r * kPanel;
      _mm512_store_ps(c + 0, _mm512_fmadd_ps(acc[r][0], s0, _mm512_load_ps(c + 0)));
      _mm512_store_ps(c + 16, _mm512_fmadd_ps(acc[r][1], s1, _mm512_load_ps(c + 16)));
      _mm512_store_ps(c + 32, _mm512_fmadd_ps(acc[r][2], s2, _mm512_load_ps(c + 32)));
      _mm512_store_ps(c + 48, _mm512_fmadd_ps(acc[r][3], s3, _mm512_load_ps(c + 48)));
    }
    // Keep C in memory: without this GCC hoists the whole tile into (spilled) registers
    // across segments, which costs more than the L1 round trip it saves.
    asm volatile("" ::: "memory");
    s = e;
  }
}

// Variant for small groups (<= 64 k): MR <= 3 rows, the scaled sums of finished groups kept in
// registers (12 partial + 12 final zmm) instead of the C tile. With groups of 32 the memory
// fold above runs at 84 % of the dot-product peak and this one at 92 % (measured, L1-resident);
// for groups >= 128 the 6-row kernel wins (less dequantisation per dot product).
template <int MR>
void micro_bf16_rf(const uint16_t* x, int64_t ldx, const uint32_t* wk, int64_t k0, int64_t k1, int64_t group_k,
                   const float* sp, const int32_t* /*zp*/, float* C, const Luts& l) {
  const uint16_t* xr[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) xr[r] = x + r * ldx;
  __m512 fin[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) fin[r][v] = _mm512_setzero_ps();
  }
  const __m512i zz = _mm512_setzero_si512();
  for (int64_t s = k0; s < k1;) {
    const int64_t g = s / group_k;
    const int64_t ge = (g + 1) * group_k;
    const int64_t e = ge < k1 ? ge : k1;
    __m512 acc[MR][4];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
    }
    for (int64_t kb = (s - k0) / kKBlock; kb < (e - k0) / kKBlock; ++kb) {
      const uint32_t* wb = wk + kb * kPanel;
      const int64_t q = kb * 4;
#define LRQAT_MICRO_STEP(J)                                                                  \
  {                                                                                          \
    __m512bh bb[4];                                                                          \
    _Pragma("GCC unroll 4") for (int v = 0; v < 4; ++v)                                      \
      bb[v] = as_bh(deq_pair<J, false>(_mm512_loadu_si512(wb + v * 16), l, zz));             \
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r) {                                   \
      const __m512bh a = bcast_pair(xr[r] + 2 * (q + (J)));                                  \
      _Pragma("GCC unroll 4") for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, bb[v]); \
    }                                                                                        \
  }
      LRQAT_MICRO_STEP(0)
      LRQAT_MICRO_STEP(1)
      LRQAT_MICRO_STEP(2)
      LRQAT_MICRO_STEP(3)
#undef LRQAT_MICRO_STEP
    }
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const __m512 sv = _mm512_loadu_ps(sp + g * kPanel + v * 16);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) fin[r][v] = _mm512_fmadd_ps(acc[r][v], sv, fin[r][v]);
    }
    s = e;
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      float* c = C + r * kPanel + v * 16;
      _mm512_store_ps(c, _mm512_add_ps(fin[r][v], _mm512_load_ps(c)));
    }
  }
}

template <bool ZP>
struct MicroBF16Table {
  typedef void (*Fn)(const uint16_t*, int64_t, const uint32_t*, int64_t, int64_t, int64_t, const float*,
                     const int32_t*, float*, const Luts&);
  static constexpr Fn fn[kMR + 1] = {nullptr,           micro_bf16<1, ZP>, micro_bf16<2, ZP>, micro_bf16<3, ZP>,
                                     micro_bf16<4, ZP>, micro_bf16<5, ZP>, micro_bf16<6, ZP>};
};

const typename MicroBF16Table<false>::Fn kMicroBF16RF[4] = {nullptr, micro_bf16_rf<1>, micro_bf16_rf<2>,
                                                            micro_bf16_rf<3>};

inline void store_tile(const GemmParams& p, int64_t panel, int64_t m0, int64_t rows, const float* C) {
  for (int64_t r = 0; r < rows; ++r)
    for (int v = 0; v < 4; ++v) store16(p, m0 + r, panel * kPanel + v * 16, _mm512_load_ps(C + r * kPanel + v * 16));
}

template <bool ZP>
void large_bf16(const GemmParams& p, const Luts& l, int64_t p0, int64_t p1, int64_t m0, int64_t m1,
                float* scratch) {
  float* C = scratch + kKChunk * kPanel;
  const int64_t rows = m1 - m0;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const int64_t nkb = p.Kp / kKBlock;
  for (int64_t panel = p0; panel < p1; ++panel) {
    std::memset(C, 0, sizeof(float) * rows * kPanel);
    const float* sp = p.scale + panel * p.G * kPanel;
    const int32_t* zp = ZP ? p.zz + panel * p.G * kPanel : nullptr;
    const uint32_t* wp = p.w + panel * nkb * kPanel;
    // Chunks of k: the chunk's packed words (16 KiB) stay in L1 while every row block uses them.
    for (int64_t k0 = 0; k0 < p.Kp; k0 += kChunkBF16) {
      const int64_t k1 = k0 + kChunkBF16 < p.Kp ? k0 + kChunkBF16 : p.Kp;
      // Row blocks: 6 (memory fold); 5 with a zero point (its 4 per-lane (8 + z) vectors need
      // registers too); 3 with register fold for groups <= 64 k (no zero point).
      const bool reg_fold = !ZP && p.G > 1 && p.group_k <= 64;
      const int mr_max = reg_fold ? 3 : (ZP ? kMR - 1 : kMR);
      // (Software prefetch of the next chunk's words: no gain measured, even at M = 16 with
      // DRAM-resident weights; huge pages for the packed weight did help, see the prepack.)
      for (int64_t mb = m0; mb < m1; mb += mr_max) {
        const int mr = static_cast<int>(m1 - mb < mr_max ? m1 - mb : mr_max);
        const auto fn = reg_fold ? kMicroBF16RF[mr] : MicroBF16Table<ZP>::fn[mr];
        fn(x + mb * p.ldx + k0, p.ldx, wp + k0 / kKBlock * kPanel, k0, k1, p.group_k, sp, zp, C + (mb - m0) * kPanel, l);
      }
    }
    store_tile(p, panel, m0, rows, C);
  }
}

// ---------------------------------------------------------------------------------------
// Large M, fp32 x: chunk dequantised to fp32 W_hat (scale applied, exact as the reference).

template <bool ZP>
void dequant_chunk_f32(const GemmParams& p, const Luts& l, int64_t panel, int64_t kb0, int64_t kb1, float* buf) {
  const uint32_t* wp = p.w + (panel * (p.Kp / kKBlock) + kb0) * kPanel;
  const float* sp = p.scale + panel * p.G * kPanel;
  const int32_t* zp = ZP ? p.zz + panel * p.G * kPanel : nullptr;
  const int64_t kb_per_group = p.group_k / kKBlock;
  for (int64_t kb = kb0; kb < kb1; ++kb, wp += kPanel, buf += kKBlock * kPanel) {
    const int64_t g = kb / kb_per_group;
    for (int v = 0; v < 4; ++v) {
      const __m512i d = _mm512_loadu_si512(wp + v * 16);
      const __m512 s = _mm512_loadu_ps(sp + g * kPanel + v * 16);
      const __m512i zz = ZP ? _mm512_loadu_si512(zp + g * kPanel + v * 16) : _mm512_setzero_si512();
      float* b = buf + v * 16;
      _mm512_store_ps(b + 0 * kPanel, _mm512_mul_ps(deq_f32<0, ZP>(d, l, zz), s));
      _mm512_store_ps(b + 1 * kPanel, _mm512_mul_ps(deq_f32<1, ZP>(d, l, zz), s));
      _mm512_store_ps(b + 2 * kPanel, _mm512_mul_ps(deq_f32<2, ZP>(d, l, zz), s));
      _mm512_store_ps(b + 3 * kPanel, _mm512_mul_ps(deq_f32<3, ZP>(d, l, zz), s));
      _mm512_store_ps(b + 4 * kPanel, _mm512_mul_ps(deq_f32<4, ZP>(d, l, zz), s));
      _mm512_store_ps(b + 5 * kPanel, _mm512_mul_ps(deq_f32<5, ZP>(d, l, zz), s));
      _mm512_store_ps(b + 6 * kPanel, _mm512_mul_ps(deq_f32<6, ZP>(d, l, zz), s));
      _mm512_store_ps(b + 7 * kPanel, _mm512_mul_ps(deq_f32<7, ZP>(d, l, zz), s));
    }
  }
}

template <int MR>
void micro_f32(const float* x, int64_t ldx, const float* buf, int64_t nk, float* C) {
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_setzero_ps();
  }
  const float* xr[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) xr[r] = x + r * ldx;
  for (int64_t k = 0; k < nk; ++k) {
    const __m512 b0 = _mm512_load_ps(buf + k * kPanel + 0);
    const __m512 b1 = _mm512_load_ps(buf + k * kPanel + 16);
    const __m512 b2 = _mm512_load_ps(buf + k * kPanel + 32);
    const __m512 b3 = _mm512_load_ps(buf + k * kPanel + 48);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(xr[r][k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(a, b3, acc[r][3]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      float* c = C + r * kPanel + v * 16;
      _mm512_store_ps(c, _mm512_add_ps(acc[r][v], _mm512_load_ps(c)));
    }
  }
}

typedef void (*MicroF32)(const float*, int64_t, const float*, int64_t, float*);
const MicroF32 kMicroF32[kMR + 1] = {nullptr, micro_f32<1>, micro_f32<2>, micro_f32<3>,
                                     micro_f32<4>, micro_f32<5>, micro_f32<6>};

template <bool ZP>
void large_f32(const GemmParams& p, const Luts& l, int64_t p0, int64_t p1, int64_t m0, int64_t m1, float* scratch) {
  float* buf = scratch;
  float* C = scratch + kKChunk * kPanel;
  const int64_t rows = m1 - m0;
  const float* x = static_cast<const float*>(p.x);
  for (int64_t panel = p0; panel < p1; ++panel) {
    std::memset(C, 0, sizeof(float) * rows * kPanel);
    for (int64_t k0 = 0; k0 < p.Kp; k0 += kChunkF32) {
      const int64_t k1 = k0 + kChunkF32 < p.Kp ? k0 + kChunkF32 : p.Kp;
      dequant_chunk_f32<ZP>(p, l, panel, k0 / kKBlock, k1 / kKBlock, buf);
      for (int64_t mb = m0; mb < m1; mb += kMR) {
        const int mr = static_cast<int>(m1 - mb < kMR ? m1 - mb : kMR);
        kMicroF32[mr](x + mb * p.ldx + k0, p.ldx, buf, k1 - k0, C + (mb - m0) * kPanel);
      }
    }
    store_tile(p, panel, m0, rows, C);
  }
}

// ---------------------------------------------------------------------------------------

template <bool ZP>
void small_dispatch(const GemmParams& p, const Luts& l, int64_t p0, int64_t p1, int64_t m0, int64_t m1) {
  const bool one = m1 - m0 == 1;
  const bool bf16 = p.x_type == kXBF16;
  for (int64_t panel = p0; panel < p1; ++panel) {
    if (bf16) {
      one ? small_bf16<1, 4, ZP, 4>(p, l, panel, m0) : small_bf16<2, 4, ZP>(p, l, panel, m0);
    } else {
      one ? small_f32<1, 4, ZP, 2>(p, l, panel, m0) : small_f32<2, 4, ZP>(p, l, panel, m0);
    }
  }
}

}  // namespace

void gemm_avx512(const GemmParams& p, int64_t p0, int64_t p1, int64_t m0, int64_t m1, float* scratch) {
  if (p0 >= p1 || m0 >= m1) return;
  const Luts l = make_luts();
  const bool zp = p.zz != nullptr;
  // The problem's M picks the kernel, not this task's rows: the small and large kernels sum in
  // different orders (fp32 x), so a 1-2 row tail task of a larger M (its row split follows the
  // thread count) would make results depend on at::get_num_threads().
  if (p.M <= kSmallMaxRows) {
    zp ? small_dispatch<true>(p, l, p0, p1, m0, m1) : small_dispatch<false>(p, l, p0, p1, m0, m1);
  } else if (p.x_type == kXBF16) {
    zp ? large_bf16<true>(p, l, p0, p1, m0, m1, scratch) : large_bf16<false>(p, l, p0, p1, m0, m1, scratch);
  } else {
    zp ? large_f32<true>(p, l, p0, p1, m0, m1, scratch) : large_f32<false>(p, l, p0, p1, m0, m1, scratch);
  }
}

}  // namespace int4_cpu
}  // namespace lrqat
