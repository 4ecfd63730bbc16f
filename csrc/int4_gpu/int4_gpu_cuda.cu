// CUDA impls of lrqat::int4_gpu_linear (W4A16 GEMM) and lrqat::int4_gpu_prepack
// (schemas in csrc/registration.cpp; layout and dequantisation in int4_gpu.h).
//
//   y[M, N] = x[M, K] @ (s * (W_int - z))^T (+ bias),  x fp16/bf16, W_int 4-bit, fp32 accumulate.
//
// Why the kernel looks the way it does (the regime it is built for is small M, decode):
// * At M <= 64 a linear layer moves N*K/2 weight bytes and does almost no math per byte, so
//   the only goal is to stream the weights at HBM bandwidth. Every choice below serves that:
//   many bytes in flight, weights read exactly once, and dequantisation cheap enough to
//   hide under the loads.
// * cp.async (sm_80+) copies global -> shared without staging through registers, so a CTA
//   can keep kStages - 1 = 3 stages (24 KiB of weights) in flight at no register cost.
//   Weights are read once per CTA and never again: they are loaded with an L2 evict_first
//   policy so they do not push the activations, scales and the split-K workspace (all
//   re-read) out of L2. When several M-blocks re-read the same weights (M > 64) the policy
//   is evict_normal instead, so the second M-block finds them in L2.
// * One CTA owns a 128-column strip of N and a range of K. Its 8 warps split the strip's
//   N (16 columns each) and all walk the same K: each weight lands in exactly one warp, no
//   intra-CTA reduction is needed, and a group boundary is crossed by all warps at the
//   same step (uniform branches).
// * mma.sync m16n8k16 with A = x (ldmatrix.x4 from a row-padded tile, bank-conflict
//   free) and B = the weights (one 32-bit shared load per lane and k-step gives both n8
//   tiles' B fragments, see int4_gpu.h). M < 16 pads A with zero rows (cp.async zero-fill):
//   wasted tensor-core work, free in a memory-bound kernel.
// * Dequantisation: magic-number lop3 + one fma per register (int4_gpu.h), exact. The
//   fma also subtracts the integer zero point, so asymmetric weights cost nothing extra.
// * Scales are applied AFTER the dot product, per group, in fp32: the mma accumulates
//   sum_k x_k (W_int - z) (exact products, fp32 sums) into a temporary, and at each group
//   end acc += s * tmp. Per n8 tile and group that is 4 * MT FFMA (+ zeroing) per thread
//   instead of Marlin's one 16-bit multiply per two weights (g / 8 per thread): cheaper at
//   g = 128 with M <= 16, comparable at M <= 32, dearer at M = 64 or g = 32 (the ALU has
//   slack there while the kernel is memory bound). It is more accurate in every case: no
//   16-bit rounding of s * (W_int - z) at all, and fp32 scales are used as given.
// * Split-K fills the GPU when N / 128 strips are too few (decode shapes): splits write
//   fp32 partials to a workspace and the LAST CTA of a tile to finish (atomic counter) sums
//   them in a fixed order (deterministic), adds the bias and writes y, all in the same
//   launch (a second kernel would cost a few microseconds, as much as the whole GEMM at
//   M = 1 on a 4096 x 4096 layer). It resets its counter, so the counters stay zero
//   between launches and need no memset.
//
// Only c10/cuda headers (no ATen/cuda/CUDAContext.h, which needs cuBLAS headers).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "int4_gpu/int4_gpu.h"
#include "int4_gpu/int4_gpu_checks.h"

namespace lrqat {
namespace int4_gpu {
namespace {

constexpr int kThreads = 256;           // 8 warps: one per 16-column sub-tile of the strip
constexpr int kWarps = kThreads / 32;
static_assert(kWarps == kSubTiles, "one warp per prepacked sub-tile");
constexpr int kStages = 4;              // 3 stages in flight while one is computed
constexpr int kMaxGroupsPerStage = 4;   // 8 k-steps per stage / 2 k-steps per group (g = 32)
constexpr int kPerChannelLog2 = 30;     // "group" longer than any K: one scale per split
constexpr int kMinBlocksPerSM = 2;      // __launch_bounds__: caps registers at 128/thread

// ---- PTX wrappers ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// L2 policy for the weight stream (see header comment). createpolicy is cheap, once a thread.
__device__ __forceinline__ uint64_t make_l2_policy(bool evict_first) {
  uint64_t policy;
  if (evict_first) {
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  } else {
    asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(policy));
  }
  return policy;
}

// 16-byte async copy with an L2 cache-policy hint; .cg bypasses L1 (data is used once from
// shared memory, L1 would only be polluted).
__device__ __forceinline__ void cp_async16_hint(void* smem, const void* gmem, uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "l"(policy)
               : "memory");
}

// 16-byte async copy, no cache hint (the scales and zero points: re-read by every split-K CTA
// and M-block of a strip, so the default evict_normal; an explicit evict_normal policy would be a
// no-op, and the policy operand's sm_90 SASS matched a reported ptxas miscompile, marlin#44).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem) : "memory");
}

// 16-byte async copy that writes zeros instead when !valid (src-size 0 reads nothing).
__device__ __forceinline__ void cp_async16_zfill(void* smem, const void* gmem, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_size)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// A fragment of m16n8k16 (16 x 16, row-major) in one instruction: lane l points at row
// l % 16, 8-column half l / 16; register r of every lane then holds exactly a_r.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t fma2_f16(uint32_t x, uint32_t mul, uint32_t add) {
  uint32_t d;
  asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(x), "r"(mul), "r"(add));
  return d;
}

// fma.rn.bf16x2 exists from sm_80 (sub.bf16x2 only from sm_90), hence fma with 1.0.
__device__ __forceinline__ uint32_t fma2_bf16(uint32_t x, uint32_t mul, uint32_t add) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(x), "r"(mul), "r"(add));
  return d;
}

// ---- per-dtype pieces -----------------------------------------------------------------------

template <typename T>
struct Dtype;

template <>
struct Dtype<__half> {
  using T2 = __half2;
  // Per n8 tile j: add[0][j] for even pairs (nibble at bit 0), add[1][j] for odd pairs.
  static __device__ __forceinline__ void zero_consts(int z0, int z1, uint32_t (&add)[2][2]) {
    add[0][0] = add_even_f16(z0);
    add[0][1] = add_even_f16(z1);
    add[1][0] = add_odd_f16(z0);
    add[1][1] = add_odd_f16(z1);
  }
  // b[a] = pair a of word q (tile a >> 1, register a & 1), values w_int - z, exact.
  static __device__ __forceinline__ void dequant(uint32_t q, const uint32_t (&add)[2][2], uint32_t (&b)[4]) {
    uint32_t r[4];
    magic_pairs_f16(q, r);
    b[0] = fma2_f16(r[0], kOneF16, add[0][0]);
    b[1] = fma2_f16(r[1], kSixteenthF16, add[1][0]);
    b[2] = fma2_f16(r[2], kOneF16, add[0][1]);
    b[3] = fma2_f16(r[3], kSixteenthF16, add[1][1]);
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ T2 from_float2(float a, float b) { return __floats2half2_rn(a, b); }
};

template <>
struct Dtype<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ __forceinline__ void zero_consts(int z0, int z1, uint32_t (&add)[2][2]) {
    add[0][0] = add[1][0] = add_bf16(z0);
    add[0][1] = add[1][1] = add_bf16(z1);
  }
  static __device__ __forceinline__ void dequant(uint32_t q, const uint32_t (&add)[2][2], uint32_t (&b)[4]) {
    uint32_t r[4];
    magic_pairs_bf16(q, r);
    b[0] = fma2_bf16(r[0], kOneBF16, add[0][0]);
    b[1] = fma2_bf16(r[1], kOneBF16, add[1][0]);
    b[2] = fma2_bf16(r[2], kOneBF16, add[0][1]);
    b[3] = fma2_bf16(r[3], kOneBF16, add[1][1]);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ T2 from_float2(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// Two consecutive scales (columns n, n + 1) from shared memory as fp32.
__device__ __forceinline__ float2 load_scale2(const float* s) { return *reinterpret_cast<const float2*>(s); }
__device__ __forceinline__ float2 load_scale2(const __half* s) {
  return __half22float2(*reinterpret_cast<const __half2*>(s));
}
__device__ __forceinline__ float2 load_scale2(const __nv_bfloat16* s) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(s));
}

// ---- shared-memory plan of one pipeline stage -----------------------------------------------

template <typename T, typename ScaleT, int MT>
struct Plan {
  static constexpr int kBM = 16 * MT;                                   // rows of x per CTA
  static constexpr int kBBytes = kStageSteps * kWordsPerStep * 4;      // 8 KiB of weights
  // 128 of K = 256 B per row, padded by 16 B: consecutive rows then start 4 banks apart, so the
  // 8 rows one ldmatrix phase reads (same column) hit 8 different 16-byte bank groups, and the
  // per-step address is base + 32 * kk, an immediate (an XOR swizzle would cost ALU per step).
  static constexpr int kARowBytes = kStageSteps * kStepK * 2 + 16;
  static constexpr int kABytes = kBM * kARowBytes;
  static constexpr int kSRowBytes = kStripN * static_cast<int>(sizeof(ScaleT));
  static constexpr int kSBytes = kMaxGroupsPerStage * kSRowBytes;
  static constexpr int kZBytes = kMaxGroupsPerStage * kStripN;        // int8 zero points
  static constexpr int kStageBytes = kBBytes + kABytes + kSBytes + kZBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kStageBytes % 16 == 0, "16-byte aligned stage");
  static_assert((kBM * 16) % kThreads == 0, "whole A chunks per thread");
};

struct Params {
  const void* x;             // [M, K] T
  const uint32_t* qweight;   // prepacked [n_strips, k_steps, 256]
  const void* scale;         // [G, n_pad] ScaleT
  const int8_t* zero_point;  // [G, n_pad] or null
  const void* bias;          // [N] T or null
  void* y;                   // [M, N] T
  float* workspace;          // [splits, M, n_pad] fp32 partials (splits > 1)
  int* counters;             // [m_blocks * n_strips], zero between launches
  int M, N, K;
  int n_pad, n_strips, k_steps, n_stages;
  int m_blocks, splits;
  int group_log2;            // log2(k-steps per group); kPerChannelLog2 when per-channel
  bool evict_first;
};

template <typename T, typename ScaleT, int MT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) int4_gpu_gemm_kernel(const Params p) {
  using P = Plan<T, ScaleT, MT>;
  using D = Dtype<T>;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int s_is_last;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  // M-blocks vary fastest so that, when M > 64, the CTAs sharing a weight tile run together
  // and the second one reads it from L2.
  int bid = blockIdx.x;
  const int mb = bid % p.m_blocks;
  bid /= p.m_blocks;
  const int strip = bid % p.n_strips;
  const int split = bid / p.n_strips;
  const int st_begin = split_stage_begin(split, p.splits, p.n_stages);
  const int st_end = split_stage_begin(split + 1, p.splits, p.n_stages);
  const int n_st = st_end - st_begin;
  const int step_end = min(st_end * kStageSteps, p.k_steps);
  const int row0 = mb * P::kBM;
  const int gmask = (1 << p.group_log2) - 1;
  const uint64_t policy = make_l2_policy(p.evict_first);  // the weight stream's
  const T* x = static_cast<const T*>(p.x);
  const uint8_t* scale_bytes = static_cast<const uint8_t*>(p.scale);

  auto load_stage = [&](int st, int buf) {
    uint8_t* sB = smem + buf * P::kStageBytes;
    uint8_t* sA = sB + P::kBBytes;
    uint8_t* sS = sA + P::kABytes;
    uint8_t* sZ = sS + P::kSBytes;
    const int s0 = st * kStageSteps;
    const int nsteps = min(kStageSteps, p.k_steps - s0);
    // Weights: the stage's nsteps KiB are contiguous in the prepacked layout.
    const uint8_t* gB = reinterpret_cast<const uint8_t*>(
        p.qweight + (static_cast<int64_t>(strip) * p.k_steps + s0) * kWordsPerStep);
#pragma unroll
    for (int i = 0; i < P::kBBytes / 16 / kThreads; ++i) {
      const int c = tid + i * kThreads;
      if (c < nsteps * (kWordsPerStep * 4 / 16)) cp_async16_hint(sB + 16 * c, gB + 16 * c, policy);
    }
    // Activations: rows >= M and chunks past K are zero-filled (zeros, not stale data: a NaN
    // bit pattern left in a padding row would only reach that row's discarded outputs, but
    // zeros keep every accumulator finite and the kernel easy to reason about).
#pragma unroll
    for (int i = 0; i < P::kBM * 16 / kThreads; ++i) {
      const int c = tid + i * kThreads;
      const int r = c >> 4;
      const int ch = c & 15;
      const int grow = row0 + r;
      const bool valid = grow < p.M && ch < 2 * nsteps;
      const T* src = valid ? x + static_cast<int64_t>(grow) * p.K + s0 * kStepK + 8 * ch : x;
      cp_async16_zfill(sA + r * P::kARowBytes + 16 * ch, src, valid);
    }
    // Scales and zero points of the groups this stage touches (<= 4 rows of 128 columns).
    const int g0 = s0 >> p.group_log2;
    const int g1 = (s0 + nsteps - 1) >> p.group_log2;
    const int n_groups = g1 - g0 + 1;
    constexpr int kSChunks = P::kSRowBytes / 16;
    if (tid < n_groups * kSChunks) {
      const int r = tid / kSChunks;
      const int cc = tid % kSChunks;
      const uint8_t* src =
          scale_bytes + ((static_cast<int64_t>(g0 + r) * p.n_pad + strip * kStripN) * sizeof(ScaleT)) + 16 * cc;
      cp_async16(sS + r * P::kSRowBytes + 16 * cc, src);
    }
    if (p.zero_point != nullptr) {
      constexpr int kZChunks = kStripN / 16;
      const int zt = tid - kThreads / 2;  // the other half of the CTA
      if (zt >= 0 && zt < n_groups * kZChunks) {
        const int r = zt / kZChunks;
        const int cc = zt % kZChunks;
        const int8_t* src = p.zero_point + static_cast<int64_t>(g0 + r) * p.n_pad + strip * kStripN + 16 * cc;
        cp_async16(sZ + r * kStripN + 16 * cc, src);
      }
    }
  };

  float acc[MT][2][4];  // scaled sums of finished groups
  float tmp[MT][2][4];  // unscaled sum of the current group: sum_k x_k (W_int - z)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][j][e] = tmp[mt][j][e] = 0.0f;

  uint32_t add[2][2];  // zero-point constants of the current group (Dtype::zero_consts)
  D::zero_consts(0, 0, add);

  // Which steps of a stage end a group: with g = 32 / 64 / 128 (2 / 4 / 8 k-steps) and stages
  // aligned to 8 steps the pattern is the same in every stage; longer groups (and per-channel,
  // group_log2 = 30) end at most at the stage's last step. Computed once, tested per step as a
  // bit with a compile-time index: no per-step index arithmetic.
  const uint32_t small_group_ends = p.group_log2 == 1 ? 0xAAu : p.group_log2 == 2 ? 0x88u : 0x80u;
  const bool small_groups = p.group_log2 <= 3;
  const int n_b = warp * 16 + (lane >> 2);     // this lane's B-fragment column (n8 tile 0)
  const int n_c = warp * 16 + 2 * (lane & 3);  // this lane's C-fragment columns (n8 tile 0)

  // kFull: all 8 steps of the stage exist (every stage but a last one when K % 128 != 0), so
  // the step loop has no bounds checks and the compiler may hoist loads across steps.
  auto compute_stage = [&](int st, int buf, auto full_tag) {
    constexpr bool kFull = decltype(full_tag)::value;
    const uint8_t* sB = smem + buf * P::kStageBytes;
    const uint8_t* sA = sB + P::kBBytes;
    const ScaleT* sS = reinterpret_cast<const ScaleT*>(sA + P::kABytes);
    const int8_t* sZ = reinterpret_cast<const int8_t*>(sA + P::kABytes + P::kSBytes);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(sB) + warp * 32 + lane;
    const int s0 = st * kStageSteps;
    const int nsteps = kFull ? kStageSteps : p.k_steps - s0;
    const int g0 = s0 >> p.group_log2;
    uint32_t end_mask = small_groups ? small_group_ends : (((s0 + kStageSteps) & gmask) == 0 ? 0x80u : 0u);
    if (step_end - s0 <= kStageSteps) end_mask |= 1u << (step_end - 1 - s0);  // this CTA's last step
    const uint32_t start_mask = ((end_mask << 1) | 1u) & 0xFFu;  // zero points change here
    // All of the stage's weight words first (8 independent 32-bit loads in flight), except at
    // MT = 4 where 64 accumulator registers leave no room for them under the 128-register cap
    // (ptxas spills); there each step loads its own word.
    constexpr bool kHoist = MT < 4;
    uint32_t q[kStageSteps];
#pragma unroll
    for (int kk = 0; kk < kStageSteps; ++kk) {
      if (kHoist && (kFull || kk < nsteps)) q[kk] = words[kk * kWordsPerStep];
    }
    // Lane l points ldmatrix at row l % 16, 8-column half l / 16 of each m16 tile.
    const uint8_t* a_ptr = sA + (lane & 15) * P::kARowBytes + (lane >> 4) * 16;
#pragma unroll
    for (int kk = 0; kk < kStageSteps; ++kk) {
      if (kFull || kk < nsteps) {
        if (p.zero_point != nullptr && (start_mask >> kk) & 1u) {
          const int grp = ((s0 + kk) >> p.group_log2) - g0;
          D::zero_consts(sZ[grp * kStripN + n_b], sZ[grp * kStripN + n_b + 8], add);
        }
        uint32_t a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], a_ptr + mt * 16 * P::kARowBytes + kk * 32);
        uint32_t b[4];
        D::dequant(kHoist ? q[kk] : words[kk * kWordsPerStep], add, b);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int j = 0; j < 2; ++j) Mma<T>::run(tmp[mt][j], a[mt], b[2 * j], b[2 * j + 1]);
        if ((end_mask >> kk) & 1u) {
          // Group (or this CTA's share of it) done: fold it in with its fp32 scale.
          const int grp = ((s0 + kk) >> p.group_log2) - g0;
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float2 s = load_scale2(sS + grp * kStripN + n_c + 8 * j);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
              acc[mt][j][0] = fmaf(s.x, tmp[mt][j][0], acc[mt][j][0]);
              acc[mt][j][1] = fmaf(s.y, tmp[mt][j][1], acc[mt][j][1]);
              acc[mt][j][2] = fmaf(s.x, tmp[mt][j][2], acc[mt][j][2]);
              acc[mt][j][3] = fmaf(s.y, tmp[mt][j][3], acc[mt][j][3]);
#pragma unroll
              for (int e = 0; e < 4; ++e) tmp[mt][j][e] = 0.0f;
            }
          }
        }
      }
    }
  };

  // ---- multi-stage cp.async pipeline ----
  // One commit group per stage, also when there is nothing left to load, so that
  // wait_group<kStages - 2> always means "the stage about to be computed has landed".
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < n_st) load_stage(st_begin + i, i);
    cp_async_commit();
  }
  for (int it = 0; it < n_st; ++it) {
    cp_async_wait<kStages - 2>();
    // Makes stage `it` visible to all warps AND guarantees every warp finished computing
    // stage it - 1, whose buffer the next load overwrites.
    __syncthreads();
    const int nxt = it + kStages - 1;
    if (nxt < n_st) load_stage(st_begin + nxt, nxt % kStages);
    cp_async_commit();
    const int st = st_begin + it;
    // MT = 4 keeps only the general path: two inlined copies of its step loop push it past the
    // 128-register cap (ptxas spills on sm_90), and with 8 mma per step the bounds checks are noise.
    if (MT < 4 && (st + 1) * kStageSteps <= p.k_steps) {
      compute_stage(st, it % kStages, std::true_type{});
    } else {
      compute_stage(st, it % kStages, std::false_type{});
    }
  }
  cp_async_wait<0>();

  // ---- epilogue ----
  // C fragment: c0, c1 = (row lane / 4, columns 2t, 2t + 1), c2, c3 = the same 8 rows below.
  const int g = lane >> 2;
  const int t = lane & 3;
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  if (p.splits == 1) {
    const bool pairs_aligned = (p.N % 2) == 0;  // y row starts stay 4-byte aligned
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row0 + mt * 16 + g + 8 * h;
          const int col = strip * kStripN + warp * 16 + 8 * j + 2 * t;
          if (row >= p.M || col >= p.N) continue;
          float v0 = acc[mt][j][2 * h];
          float v1 = acc[mt][j][2 * h + 1];
          const bool has1 = col + 1 < p.N;
          if (bias != nullptr) {
            v0 += D::to_float(bias[col]);
            if (has1) v1 += D::to_float(bias[col + 1]);
          }
          T* out = y + static_cast<int64_t>(row) * p.N + col;
          if (has1 && pairs_aligned) {
            *reinterpret_cast<typename D::T2*>(out) = D::from_float2(v0, v1);
          } else {
            out[0] = D::from_float(v0);
            if (has1) out[1] = D::from_float(v1);
          }
        }
    return;
  }

  float* ws = p.workspace + static_cast<int64_t>(split) * p.M * p.n_pad;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + mt * 16 + g + 8 * h;
        const int col = strip * kStripN + warp * 16 + 8 * j + 2 * t;
        if (row < p.M) {
          *reinterpret_cast<float2*>(ws + static_cast<int64_t>(row) * p.n_pad + col) =
              make_float2(acc[mt][j][2 * h], acc[mt][j][2 * h + 1]);
        }
      }
  // Classic "last block reduces" (CUDA threadFenceReduction sample): publish the partial
  // device-wide, then count arrivals; the last arriving CTA sees every other partial.
  __threadfence();
  __syncthreads();
  int* counter = p.counters + mb * p.n_strips + strip;
  // atomicInc wraps to 0 on the last arrival (old == splits - 1): the counter is reset in the same
  // atomic that elects the reducer, so it is zero for the next launch however this one ends.
  if (tid == 0) s_is_last = atomicInc(reinterpret_cast<unsigned int*>(counter), p.splits - 1) == p.splits - 1;
  __syncthreads();
  if (!s_is_last) return;
  __threadfence();
  const int rows = min(P::kBM, p.M - row0);
  for (int idx = tid; idx < rows * (kStripN / 4); idx += kThreads) {
    const int row = row0 + idx / (kStripN / 4);
    const int col = strip * kStripN + 4 * (idx % (kStripN / 4));
    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < p.splits; ++s) {  // fixed order: bitwise reproducible
      // ld.global.cg: other CTAs' partials are in L2; never trust a stale L1 line.
      const float4 v = __ldcg(reinterpret_cast<const float4*>(
          p.workspace + (static_cast<int64_t>(s) * p.M + row) * p.n_pad + col));
      sum.x += v.x;
      sum.y += v.y;
      sum.z += v.z;
      sum.w += v.w;
    }
    const float vals[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (col + e < p.N) {
        const float b = bias != nullptr ? D::to_float(bias[col + e]) : 0.0f;
        y[static_cast<int64_t>(row) * p.N + col + e] = D::from_float(vals[e] + b);
      }
    }
  }
}

// ---- prepack kernel ---------------------------------------------------------------------------

// One thread per output word. Runs once per layer at load time; the byte gathers are
// uncoalesced but the whole pass is a few hundred microseconds for a 7B model's layer.
__global__ void int4_gpu_prepack_kernel(const uint8_t* __restrict__ qw, uint32_t* __restrict__ out,
                                        int64_t n_rows, int64_t k_bytes, int64_t steps, int64_t total) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const int lane = static_cast<int>(i % 32);
    const int u = static_cast<int>((i / 32) % kSubTiles);
    const int64_t ps = i / kWordsPerStep;
    out[i] = prepack_word(qw, n_rows, k_bytes, ps / steps, ps % steps, u, lane);
  }
}

// ---- host side ----------------------------------------------------------------------------

// Split-K count for `tiles` output tiles of `n_stages` K-stages each on `slots` resident
// CTAs. Model: time ~ waves * (stages per CTA + fill), fill ~ 2 stages of pipeline ramp and
// the partial-sum write/read (~ kBM / 64 stages' worth of L2 traffic). Unmeasured
// constants: to be tuned on a GPU (bench/bench_int4_gemm.py).
int choose_splits(int64_t tiles, int n_stages, int64_t slots, int bm) {
  if (tiles >= 2 * slots) return 1;
  const double fill = 2.0;
  const double reduce = bm / 64.0;
  int best = 1;
  double best_cost = 1e30;
  const int max_splits = std::min(n_stages, 64);
  for (int s = 1; s <= max_splits; ++s) {
    const int64_t waves = (tiles * s + slots - 1) / slots;
    const double per_cta = (n_stages + s - 1) / s + fill + (s > 1 ? reduce : 0.0);
    const double cost = static_cast<double>(waves) * per_cta;
    if (cost < best_cost - 1e-9) {
      best_cost = cost;
      best = s;
    }
  }
  return best;
}

// Split-K arrival counters, one zeroed buffer per (device, stream): kernels on one stream
// run in order, so a tile's counter is back to zero (atomicInc wraps it on the last arrival)
// before the next launch reads it. Leaked on purpose (no destructor running after the CUDA
// context is gone at exit). During CUDA-graph capture a fresh zeroed buffer per call instead (its
// memset is a node of that graph, and `holder` keeps it until the launch is recorded; the graph's
// private pool keeps it after): a cached buffer created during a capture would only be zeroed when
// that graph replays (an eager call or another graph could use it first), and a graph holding a
// cached buffer would touch freed memory once the buffer is outgrown and replaced. Graphs still
// must not be replayed concurrently with each other (their workspaces come from the caching
// allocator as every intermediate's do).
int* split_counters(const at::Device& device, cudaStream_t stream, int64_t n, at::Tensor& holder) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone) {
    holder = at::zeros({n}, at::TensorOptions().dtype(at::kInt).device(device));
    return holder.mutable_data_ptr<int>();
  }
  static std::mutex mu;
  static auto* cache = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  at::Tensor& t = (*cache)[{device.index(), stream}];
  if (!t.defined() || t.numel() < n) {
    t = at::zeros({std::max<int64_t>(n, 4096)}, at::TensorOptions().dtype(at::kInt).device(device));
  }
  return t.mutable_data_ptr<int>();
}

struct LaunchInfo {
  int blocks_per_sm = 0;
};

template <typename T, typename ScaleT, int MT>
LaunchInfo kernel_info(int device) {
  // Per device: opt in to > 48 KiB of dynamic shared memory, then ask the occupancy API.
  static std::mutex mu;
  static std::map<int, LaunchInfo> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  auto kernel = int4_gpu_gemm_kernel<T, ScaleT, MT>;
  constexpr int smem = Plan<T, ScaleT, MT>::kSmemBytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  LaunchInfo info;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&info.blocks_per_sm, kernel, kThreads, smem));
  TORCH_CHECK(info.blocks_per_sm >= 1, "lrqat::int4_gpu_linear: the kernel does not fit on device ", device,
              " (", smem, " bytes of shared memory per CTA)");
  cache.emplace(device, info);
  return info;
}

template <typename T, typename ScaleT, int MT>
void launch(Params& p, const at::Tensor& x, int n_sms, cudaStream_t stream) {
  const int device = x.get_device();
  const LaunchInfo info = kernel_info<T, ScaleT, MT>(device);
  constexpr int bm = Plan<T, ScaleT, MT>::kBM;
  p.m_blocks = (p.M + bm - 1) / bm;
  const int64_t tiles = static_cast<int64_t>(p.m_blocks) * p.n_strips;
  p.splits = choose_splits(tiles, p.n_stages, static_cast<int64_t>(n_sms) * info.blocks_per_sm, bm);
  // Several M-blocks re-read each weight tile: keep it in L2 for them.
  p.evict_first = p.m_blocks == 1;
  at::Tensor workspace, counters;
  if (p.splits > 1) {
    workspace = at::empty({p.splits, p.M, p.n_pad}, x.options().dtype(at::kFloat));
    p.workspace = workspace.mutable_data_ptr<float>();
    p.counters = split_counters(x.device(), stream, tiles, counters);
  }
  const int64_t grid = tiles * p.splits;
  TORCH_CHECK(grid <= 0x7FFFFFFF, "lrqat::int4_gpu_linear: problem too large (", grid, " CTAs)");
  int4_gpu_gemm_kernel<T, ScaleT, MT>
      <<<static_cast<unsigned>(grid), kThreads, Plan<T, ScaleT, MT>::kSmemBytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // `workspace` (and a capture's `counters`) are freed here, but the caching allocator only reuses
  // them in stream order.
}

// Largest dynamic shared memory a CTA may opt in to on `device` (cached; 227 KiB on sm_90,
// 163 KiB on sm_80, 99 KiB on sm_86 / sm_89).
int max_smem_optin(int device) {
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cache.emplace(device, bytes);
  return bytes;
}

template <typename T, typename ScaleT>
void launch_mt(Params& p, const at::Tensor& x, int n_sms, cudaStream_t stream) {
  // BM = 16 * MT rows per CTA: 16 up to M = 16 (decode), 64 beyond 32 (more rows share each
  // dequantised weight; 4 m16 tiles is where 128 registers/thread still suffice). MT = 4 needs
  // ~110 KB of shared memory (4 stages): where a CTA may not have that (sm_86 / sm_89 allow
  // 99 KB) large M runs as 32-row blocks instead.
  const bool mt4_fits = Plan<T, ScaleT, 4>::kSmemBytes <= max_smem_optin(x.get_device());
  if (p.M <= 16) {
    launch<T, ScaleT, 1>(p, x, n_sms, stream);
  } else if (p.M <= 32 || !mt4_fits) {
    launch<T, ScaleT, 2>(p, x, n_sms, stream);
  } else {
    launch<T, ScaleT, 4>(p, x, n_sms, stream);
  }
}

at::Tensor int4_gpu_linear_cuda(const at::Tensor& x_in, const at::Tensor& qweight, const at::Tensor& scale,
                                const c10::optional<at::Tensor>& zero_point, const c10::optional<at::Tensor>& bias,
                                int64_t out_features) {
  constexpr const char* op = "int4_gpu_linear";
  check_device(x_in, c10::DeviceType::CUDA, op, "x");
  TORCH_CHECK(x_in.scalar_type() == at::kHalf || x_in.scalar_type() == at::kBFloat16, "lrqat::", op,
              ": x must be torch.float16 or torch.bfloat16, got ", dtype_name(x_in.scalar_type()));
  check_dim(x_in, 2, op, "x");
  check_device(qweight, c10::DeviceType::CUDA, op, "qweight");
  check_dtype(qweight, at::kInt, op, "qweight");
  check_dim(qweight, 3, op, "qweight");
  check_contiguous(qweight, op, "qweight");
  TORCH_CHECK(qweight.size(2) == kWordsPerStep, "lrqat::", op,
              ": qweight must be prepacked by lrqat::int4_gpu_prepack, shape [ceil(N / 128), K / 16, 256], got ",
              qweight.sizes());
  const int64_t K = x_in.size(1);
  TORCH_CHECK(qweight.size(1) * kStepK == K, "lrqat::", op, ": x must be [M, K] with K = 16 * qweight.size(1) = ",
              qweight.size(1) * kStepK, ", got shape ", x_in.sizes());
  const int64_t n_pad = qweight.size(0) * kStripN;
  TORCH_CHECK(out_features > n_pad - kStripN && out_features <= n_pad, "lrqat::", op,
              ": out_features must be in (", n_pad - kStripN, ", ", n_pad, "] for qweight of shape ", qweight.sizes(),
              ", got ", out_features);
  check_device(scale, c10::DeviceType::CUDA, op, "scale");
  check_dim(scale, 2, op, "scale");
  check_contiguous(scale, op, "scale");
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == x_in.scalar_type(), "lrqat::", op,
              ": scale must be torch.float32 or x's dtype ", dtype_name(x_in.scalar_type()), ", got ",
              dtype_name(scale.scalar_type()));
  const int64_t G = scale.size(0);
  TORCH_CHECK(scale.size(1) == n_pad && G >= 1 && K % G == 0, "lrqat::", op,
              ": scale must be [G, ceil(N / 128) * 128] = [G, ", n_pad, "] with G dividing K = ", K,
              " (see int4_gpu.prepare_scale), got ", scale.sizes());
  int group_log2 = kPerChannelLog2;
  if (G > 1) {
    const int64_t group = K / G;
    TORCH_CHECK(group >= 32 && (group & (group - 1)) == 0, "lrqat::", op,
                ": group_size (K / scale.size(0) = ", group, ") must be a power of two >= 32, or per-channel (G = 1)");
    group_log2 = 0;
    while ((int64_t{kStepK} << group_log2) < group) ++group_log2;
  }
  if (zero_point.has_value()) {
    const at::Tensor& z = *zero_point;
    check_device(z, c10::DeviceType::CUDA, op, "zero_point");
    check_dtype(z, at::kChar, op, "zero_point");
    check_contiguous(z, op, "zero_point");
    TORCH_CHECK(z.sizes() == scale.sizes(), "lrqat::", op, ": zero_point must have scale's shape ", scale.sizes(),
                ", got ", z.sizes());
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_device(b, c10::DeviceType::CUDA, op, "bias");
    check_dtype(b, x_in.scalar_type(), op, "bias");
    check_contiguous(b, op, "bias");
    TORCH_CHECK(b.dim() == 1 && b.size(0) == out_features, "lrqat::", op, ": bias must be [out_features] = [",
                out_features, "], got ", b.sizes());
  }
  const std::pair<const char*, const at::Tensor*> on_device[] = {
      {"qweight", &qweight},
      {"scale", &scale},
      {"zero_point", zero_point.has_value() ? &*zero_point : nullptr},
      {"bias", bias.has_value() ? &*bias : nullptr}};
  for (const auto& [name, t] : on_device) {
    TORCH_CHECK(t == nullptr || t->device() == x_in.device(), "lrqat::", op, ": ", name, " must be on x's device ",
                x_in.device(), ", got ", t->device());
  }
  // Row indices are int32 in the kernel, with up to 63 rows of headroom past M in a tile.
  constexpr int64_t kMaxDim = 0x7FFFFFFF - 64;
  TORCH_CHECK(K <= kMaxDim && n_pad <= kMaxDim && x_in.size(0) <= kMaxDim, "lrqat::", op,
              ": dimensions must be below 2^31 - 64, got x ", x_in.sizes(), " and N_pad ", n_pad);

  const c10::cuda::CUDAGuard guard(x_in.device());
  // cp.async moves 16-byte chunks: x rows (K * 2 bytes, K % 16 == 0) are aligned once the
  // base pointer is; a misaligned view (e.g. an odd storage offset) is copied.
  at::Tensor x = x_in.contiguous();
  if (reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 != 0) x = x.clone();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, out_features}, x.options());
  if (M == 0 || out_features == 0) return y;  // also: no strips, a zero-CTA grid would not launch
  for (const at::Tensor* t : {&scale}) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 == 0, "lrqat::", op,
                ": scale must be 16-byte aligned (call .clone())");
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(qweight.const_data_ptr()) % 16 == 0, "lrqat::", op,
              ": qweight must be 16-byte aligned (call .clone())");
  if (zero_point.has_value()) {
    TORCH_CHECK(reinterpret_cast<uintptr_t>(zero_point->const_data_ptr()) % 16 == 0, "lrqat::", op,
                ": zero_point must be 16-byte aligned (call .clone())");
  }

  Params p{};
  p.x = x.const_data_ptr();
  p.qweight = reinterpret_cast<const uint32_t*>(qweight.const_data_ptr<int32_t>());
  p.scale = scale.const_data_ptr();
  p.zero_point = zero_point.has_value() ? zero_point->const_data_ptr<int8_t>() : nullptr;
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  p.y = y.mutable_data_ptr();
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(out_features);
  p.K = static_cast<int>(K);
  p.n_pad = static_cast<int>(n_pad);
  p.n_strips = static_cast<int>(qweight.size(0));
  p.k_steps = static_cast<int>(qweight.size(1));
  p.n_stages = (p.k_steps + kStageSteps - 1) / kStageSteps;
  p.group_log2 = group_log2;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int n_sms = at::cuda::getDeviceProperties(x.get_device())->multiProcessorCount;  // cached by ATen
  const bool scale_fp32 = scale.scalar_type() == at::kFloat;
  if (x.scalar_type() == at::kHalf) {
    if (scale_fp32) {
      launch_mt<__half, float>(p, x, n_sms, stream);
    } else {
      launch_mt<__half, __half>(p, x, n_sms, stream);
    }
  } else {
    if (scale_fp32) {
      launch_mt<__nv_bfloat16, float>(p, x, n_sms, stream);
    } else {
      launch_mt<__nv_bfloat16, __nv_bfloat16>(p, x, n_sms, stream);
    }
  }
  return y;
}

at::Tensor int4_gpu_prepack_cuda(const at::Tensor& qweight) {
  check_prepack_input(qweight, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(qweight.device());
  const int64_t n_rows = qweight.size(0);
  const int64_t k_bytes = qweight.size(1);
  const int64_t strips = (n_rows + kStripN - 1) / kStripN;
  const int64_t steps = 2 * k_bytes / kStepK;
  at::Tensor out = at::empty({strips, steps, kWordsPerStep}, qweight.options().dtype(at::kInt));
  const int64_t total = out.numel();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, 65535);
  int4_gpu_prepack_kernel<<<static_cast<unsigned>(blocks), threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      qweight.const_data_ptr<uint8_t>(), reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>()), n_rows,
      k_bytes, steps, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace int4_gpu
}  // namespace lrqat

TORCH_LIBRARY_IMPL(lrqat, CUDA, m) {
  m.impl("int4_gpu_prepack", &lrqat::int4_gpu::int4_gpu_prepack_cuda);
  m.impl("int4_gpu_linear", &lrqat::int4_gpu::int4_gpu_linear_cuda);
}
