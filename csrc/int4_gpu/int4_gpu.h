// W4A16 GEMM for GPUs: the prepacked weight layout and the in-register dequantisation.
//
// Everything here is __host__ __device__ on purpose: the CPU prepack, the CPU test hook
// lrqat::int4_gpu_dequant_words and the CUDA kernel all call these same functions, so the
// layout the CPU writes and the order the GPU reads it in cannot drift apart, and the bit
// tricks are unit-tested on a machine without a GPU (tests/test_int4_gpu.py).
//
// ---------------------------------------------------------------------------------------
// The mma this layout is built for: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}
//   A = x tile (16 rows of M x 16 of K), B = W^T tile (16 of K x 8 of N), C/D fp32.
//   B fragment (PTX ISA, "Matrix Fragments for mma.m16n8k16", .f16/.bf16 B operand):
//   lane l holds 2 .b32 registers = 4 16-bit elements b0..b3 (b0 = low half of reg 0),
//     element e: k = (l % 4) * 2 + (e & 1) + (e >= 2) * 8,  n = l / 4.
//   So lane l needs, for its column n = l / 4, the k pairs {2t, 2t+1} (reg 0) and
//   {2t+8, 2t+9} (reg 1), t = l % 4. Each pair is ONE byte of the standard packed layout
//   (formats.py: byte j of a row = column 2j low nibble | column 2j+1 high nibble), which
//   is what makes the prepack a pure byte shuffle.
//
// Prepacked layout (int32 [ceil(N / 128), K / 16, 256]), i.e. per
//   strip p   : 128 output columns (one CTA's N tile; N is zero-padded up to 128),
//   step s    : 16 of K (one mma k-step); the 1 KiB of a step is contiguous, so a CTA's
//               pipeline stage (8 steps = 8 KiB) is one contiguous, fully coalesced run,
//   sub-tile u: 16 columns (two n8 mma tiles j = 0, 1), one per warp,
//   lane l    : one 32-bit word = the 8 nibbles lane l's B fragments need for both n8
//               tiles of this step: a single conflict-free 32-bit shared-memory load per
//               lane and step feeds two mma instructions.
// Inside the word, nibble a (bits 4a..4a+3) and nibble a+4 form pair a = 0..3:
//   pair a -> n8 tile j = a >> 1, B register i = a & 1,
//             nibble a   = k = 16 s + 2t + 8i      (low half of the register),
//             nibble a+4 = k = 16 s + 2t + 8i + 1  (high half),
//             column n = 128 p + 16 u + 8 j + l / 4.
// Why pairs (a, a+4): the magic-number conversion below turns the nibbles at bit offsets
// 0 and 16 of a 32-bit word into the two halves of one f16x2/bf16x2 register with one lop3,
// so the two halves of a register must sit 16 bits apart.
// Nibbles are stored offset-binary (u = w_int + 8 in 0..15, i.e. the two's complement
// nibble XOR 8) so the conversion needs no sign handling; prepack does the XOR once.
// ---------------------------------------------------------------------------------------
#pragma once

#include <cstdint>

#ifndef LRQAT_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define LRQAT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LRQAT_HOST_DEVICE inline
#endif
#endif

namespace lrqat {
namespace int4_gpu {

constexpr int kStripN = 128;        // output columns per prepacked strip (and per CTA)
constexpr int kStepK = 16;          // K per mma step
constexpr int kSubTiles = 8;        // 16-column sub-tiles per strip (one per warp)
constexpr int kWordsPerStep = 256;  // kSubTiles * 32 lanes
// Pair a of a word belongs to n8 tile kPairTile[a], B register kPairReg[a].
LRQAT_HOST_DEVICE int pair_tile(int a) { return a >> 1; }
LRQAT_HOST_DEVICE int pair_reg(int a) { return a & 1; }

// ---- prepack ------------------------------------------------------------------------------

// The prepacked word of (strip p, k-step s, sub-tile u, lane) from the standard packed
// weight `qw` (uint8 [n_rows, k_bytes], nibble layout of formats.py). Rows past n_rows are
// padding and read as w_int = 0 (byte 0x00 -> offset-binary 8).
LRQAT_HOST_DEVICE uint32_t prepack_word(const uint8_t* qw, int64_t n_rows, int64_t k_bytes,
                                        int64_t p, int64_t s, int u, int lane) {
  const int t = lane % 4;
  const int64_t n_base = p * kStripN + u * 16 + lane / 4;
  uint32_t word = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int a = 0; a < 4; ++a) {
    const int64_t n = n_base + 8 * pair_tile(a);
    const int64_t k_lo = s * kStepK + 2 * t + 8 * pair_reg(a);  // even: one whole byte
    const uint32_t byte = n < n_rows ? qw[n * k_bytes + k_lo / 2] : 0u;
    word |= ((byte & 0xFu) ^ 0x8u) << (4 * a);               // column k_lo   -> nibble a
    word |= (((byte >> 4) & 0xFu) ^ 0x8u) << (4 * (a + 4));  // column k_lo+1 -> nibble a+4
  }
  return word;
}

// ---- magic-number dequantisation ----------------------------------------------------------
//
// A 16-bit float whose exponent field is fixed and whose low mantissa bits are a nibble u
// has the value base + u * ulp exactly: fp16 0x6400 = 1024 with ulp 1 on [1024, 2048), bf16
// 0x4300 = 128 with ulp 1 on [128, 256). So OR-ing a nibble into those bits converts it to a
// float with a single lop3, two values per 32-bit register, and one fma then removes the
// base, the offset 8 and the zero point z: (base + u) - (base + 8 + z) = w_int - z, exact
// (every value involved is an integer below 2^11 (fp16) / 2^8 (bf16)). This replaces 8
// I2F conversions per word (the slow path: prmt + i2f + cvt) by ~9-11 ALU instructions.
//
// fp16, per word q (pairs 0,1 from q, pairs 2,3 from q >> 8):
//   even pairs: (q & 0x000f000f) | 0x64006400 = 1024 + u        -> fma(x, 1,    -(1032 + z))
//   odd pairs:  (q & 0x00f000f0) | 0x64006400 = 1024 + 16 u     -> fma(x, 1/16, -(72 + z))
//     (the nibble sits 4 bits higher, so it is scaled by 16; 1024 + 16 u < 2048 is still
//      exact, and the fma divides by 16 exactly: one shift per two pairs, as in Marlin)
// bf16 has only 7 mantissa bits, so a nibble at bits 4..7 would spill into the exponent:
//   pair a: ((q >> 4a) & 0x000f000f) | 0x43004300 = 128 + u     -> fma(x, 1, -(136 + z))

constexpr uint32_t kMaskLo = 0x000f000fu;
constexpr uint32_t kMaskHi = 0x00f000f0u;
constexpr uint32_t kMagicF16 = 0x64006400u;   // fp16 1024.0 in both halves
constexpr uint32_t kMagicBF16 = 0x43004300u;  // bf16 128.0 in both halves

LRQAT_HOST_DEVICE uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  // (a & b) | c as ONE instruction: immLut = (0xF0 & 0xCC) | 0xAA = 0xEA. The compiler
  // usually finds it, but writing it out guarantees it (Marlin does the same).
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
#else
  return (a & b) | c;
#endif
}

// Step 1 (pure bit operations, shared verbatim by host and device): the 4 magic registers of
// a word, in pair order a = 0..3.
LRQAT_HOST_DEVICE void magic_pairs_f16(uint32_t q, uint32_t r[4]) {
  r[0] = lop3_and_or(q, kMaskLo, kMagicF16);
  r[1] = lop3_and_or(q, kMaskHi, kMagicF16);
  q >>= 8;
  r[2] = lop3_and_or(q, kMaskLo, kMagicF16);
  r[3] = lop3_and_or(q, kMaskHi, kMagicF16);
}

LRQAT_HOST_DEVICE void magic_pairs_bf16(uint32_t q, uint32_t r[4]) {
  r[0] = lop3_and_or(q, kMaskLo, kMagicBF16);
  r[1] = lop3_and_or(q >> 4, kMaskLo, kMagicBF16);
  r[2] = lop3_and_or(q >> 8, kMaskLo, kMagicBF16);
  r[3] = lop3_and_or(q >> 12, kMaskLo, kMagicBF16);
}

// Step 2 constants: x * mul + add per pair, as 16-bit patterns replicated in both halves.
// z is the integer zero point of the column (0 when symmetric), in [-8, 7]; the patterns
// are written as integer bit arithmetic (exact for that range) so no float conversion is
// needed when a new group's zero point is loaded:
//   fp16  -(1032 + z) = 0xE408 + z   (1032 + z in [1024, 1040): ulp 1, exponent 0x19)
//   fp16  -(72 + z)   = 0xD480 + 16z (72 + z in [64, 80): ulp 1/16, exponent 0x15)
//   bf16  -(136 + z)  = 0xC308 + z   (136 + z in [128, 144): ulp 1, exponent 0x86)
constexpr uint32_t kOneF16 = 0x3C003C00u;        // fp16 1.0
constexpr uint32_t kSixteenthF16 = 0x2C002C00u;  // fp16 1/16
constexpr uint32_t kOneBF16 = 0x3F803F80u;       // bf16 1.0

LRQAT_HOST_DEVICE uint32_t replicate16(uint32_t h) { return (h & 0xFFFFu) * 0x00010001u; }
LRQAT_HOST_DEVICE uint32_t add_even_f16(int z) { return replicate16(0xE408u + z); }
LRQAT_HOST_DEVICE uint32_t add_odd_f16(int z) { return replicate16(0xD480u + 16 * z); }
LRQAT_HOST_DEVICE uint32_t add_bf16(int z) { return replicate16(0xC308u + z); }

// ---- host emulation of step 2 (the device uses fma.rn.{f16x2,bf16x2}) -------------------
// Only for the CPU test hook: decode the 16-bit patterns, compute x * mul + add in float
// (exact here: every operand and result is a small integer or 1/16) and encode back.

inline float f16_bits_to_float(uint32_t h) {
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  float v;
  if (exp == 0) {
    v = static_cast<float>(man) * (1.0f / 16777216.0f);  // subnormal: man * 2^-24
  } else if (exp == 31) {
    v = man ? __builtin_nanf("") : __builtin_inff();
  } else {
    v = (1.0f + static_cast<float>(man) / 1024.0f);
    int e = static_cast<int>(exp) - 15;
    for (; e > 0; --e) v *= 2.0f;
    for (; e < 0; ++e) v *= 0.5f;
  }
  return sign ? -v : v;
}

// Exact for the values the dequantisation produces (integers |v| < 2048, multiples of 2^-4
// above 64); rounds to nearest-even otherwise for normal numbers.
inline uint32_t float_to_f16_bits(float v) {
  uint32_t sign = 0;
  if (v < 0) {
    sign = 0x8000u;
    v = -v;
  }
  if (v == 0.0f) return sign;
  int e = 0;
  while (v >= 2.0f) {
    v *= 0.5f;
    ++e;
  }
  while (v < 1.0f) {
    v *= 2.0f;
    --e;
  }
  // v in [1, 2): mantissa = round((v - 1) * 1024), ties to even.
  const float m = (v - 1.0f) * 1024.0f;
  uint32_t mi = static_cast<uint32_t>(m);
  const float frac = m - static_cast<float>(mi);
  if (frac > 0.5f || (frac == 0.5f && (mi & 1u))) ++mi;
  if (mi == 1024u) {
    mi = 0;
    ++e;
  }
  return sign | (static_cast<uint32_t>(e + 15) << 10) | mi;
}

inline float bf16_bits_to_float(uint32_t h) {
  const uint32_t bits = (h & 0xFFFFu) << 16;
  float v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}

inline uint32_t float_to_bf16_bits(float v) {  // round to nearest even (no NaN inputs here)
  uint32_t bits;
  __builtin_memcpy(&bits, &v, sizeof(bits));
  return (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
}

// One f16x2 / bf16x2 fma on bit patterns, as the device computes it.
inline uint32_t emulate_fma2(uint32_t x, uint32_t mul, uint32_t add, bool bf16) {
  uint32_t out = 0;
  for (int half = 0; half < 2; ++half) {
    const uint32_t xs = (x >> (16 * half)) & 0xFFFFu, ms = (mul >> (16 * half)) & 0xFFFFu,
                   as = (add >> (16 * half)) & 0xFFFFu;
    uint32_t r;
    if (bf16) {
      r = float_to_bf16_bits(bf16_bits_to_float(xs) * bf16_bits_to_float(ms) + bf16_bits_to_float(as));
    } else {
      r = float_to_f16_bits(f16_bits_to_float(xs) * f16_bits_to_float(ms) + f16_bits_to_float(as));
    }
    out |= r << (16 * half);
  }
  return out;
}

// Host twin of the kernel's dequantisation of one word: out[a] = pair a as a 16-bit x2
// register (low half = nibble a, high half = nibble a + 4), value w_int - z.
inline void dequant_word_host(uint32_t q, bool bf16, int z, uint32_t out[4]) {
  uint32_t r[4];
  if (bf16) {
    magic_pairs_bf16(q, r);
    for (int a = 0; a < 4; ++a) out[a] = emulate_fma2(r[a], kOneBF16, add_bf16(z), true);
  } else {
    magic_pairs_f16(q, r);
    for (int a = 0; a < 4; ++a) {
      const bool odd = a & 1;
      out[a] = emulate_fma2(r[a], odd ? kSixteenthF16 : kOneF16, odd ? add_odd_f16(z) : add_even_f16(z), false);
    }
  }
}

// ---- split-K bookkeeping shared by the launcher and the kernel ----------------------------

constexpr int kStageSteps = 8;  // k-steps per pipeline stage (128 of K, 8 KiB of weights per CTA)

// Stage range [begin, end) of split `split` out of `splits` over `n_stages` stages: balanced
// (sizes differ by at most one), never empty when splits <= n_stages.
LRQAT_HOST_DEVICE int split_stage_begin(int split, int splits, int n_stages) {
  return static_cast<int>(static_cast<int64_t>(split) * n_stages / splits);
}

}  // namespace int4_gpu
}  // namespace lrqat
