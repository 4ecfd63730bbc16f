// CPU impls of lrqat::int4_linear, lrqat::int4_prepack_cpu, lrqat::int4_linear_prepacked_cpu
// (schemas in csrc/registration.cpp; layout, kernels and numerics in int4_cpu.h and the
// int4_cpu_<isa>.cpp files).
//
// This file holds everything that needs ATen: argument checks, the prepack, instruction-set
// selection, the split into parallel tasks, and the portable scalar kernel. The ISA kernels
// are plain functions over raw pointers, called only after a runtime CPU check.
//
// Instruction-set selection (every call): the op argument `isa` of int4_linear_prepacked_cpu
// if it is not "auto", else the environment variable LRQAT_CPU_ISA if set and not "auto",
// else the best the CPU supports (avx512 > avx2 > scalar). Asking for an instruction set
// the CPU (or this build) lacks is an error that names what is available: a forced path
// that silently ran another kernel would make a test of that path meaningless.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "int4_cpu/int4_cpu.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#ifndef LRQAT_HAVE_AVX512
#define LRQAT_HAVE_AVX512 0
#endif
#ifndef LRQAT_HAVE_AVX2
#define LRQAT_HAVE_AVX2 0
#endif

namespace lrqat {
namespace int4_cpu {
namespace {

constexpr int kMR = 6;                // rows of the large-M micro-kernels

enum class Isa { kScalar, kAvx2, kAvx512 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

bool cpu_has_avx512() {
#if LRQAT_HAVE_AVX512 && (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
         __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if LRQAT_HAVE_AVX2 && (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::string available_isas() {
  std::string s = "scalar";
  if (cpu_has_avx2()) s += ", avx2";
  if (cpu_has_avx512()) s += ", avx512";
  return s;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

Isa resolve_isa(const std::string& requested, const char* op) {
  std::string req = lower(requested);
  std::string source = "isa argument";
  if (req.empty() || req == "auto") {
    const char* env = std::getenv("LRQAT_CPU_ISA");
    req = env ? lower(env) : std::string();
    source = "LRQAT_CPU_ISA";
  }
  if (req.empty() || req == "auto") {
    if (cpu_has_avx512()) return Isa::kAvx512;
    if (cpu_has_avx2()) return Isa::kAvx2;
    return Isa::kScalar;
  }
  if (req == "scalar") return Isa::kScalar;
  if (req == "avx2") {
    TORCH_CHECK(cpu_has_avx2(), "lrqat::", op, ": instruction set 'avx2' requested (", source,
                ") but it is not available: the CPU lacks avx2/fma",
                LRQAT_HAVE_AVX2 ? "" : " or this build has no AVX2 kernels (not x86-64)",
                "; available: ", available_isas(), " (or 'auto')");
    return Isa::kAvx2;
  }
  if (req == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "lrqat::", op, ": instruction set 'avx512' requested (", source,
                ") but it is not available: the kernel needs avx512f, avx512bw, avx512vl, "
                "avx512bf16 and fma",
                LRQAT_HAVE_AVX512 ? "" : ", and this build has no AVX-512 kernels (not x86-64)",
                "; available: ", available_isas(), " (or 'auto')");
    return Isa::kAvx512;
  }
  TORCH_CHECK(false, "lrqat::", op, ": unknown instruction set '", req, "' (", source,
              "); expected one of auto, scalar, avx2, avx512");
  return Isa::kScalar;
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

bool is_int_dtype(at::ScalarType t) {
  return t == at::kChar || t == at::kByte || t == at::kShort || t == at::kInt || t == at::kLong;
}

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Ask for transparent huge pages on the 2 MiB-aligned interior of a fresh (untouched) buffer.
// The kernels stream the packed weights once per call; with 4 KiB pages every 4 KiB is a new
// TLB entry, which cost 6 % at M = 16 with DRAM-resident weights (measured). Best effort:
// a no-op where THP is off ("never") or outside Linux.
void advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (e > b) (void)madvise(reinterpret_cast<void*>(b), e - b, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

// Number of scale groups G for in_features K; validates group_size (-1 or K: per channel).
int64_t num_groups(int64_t K, int64_t group_size, const char* op) {
  if (group_size == -1 || group_size == K) return 1;
  TORCH_CHECK(group_size > 0, "lrqat::", op, ": group_size must be positive, or -1 for per-channel scales, got ",
              group_size);
  TORCH_CHECK(K % group_size == 0, "lrqat::", op, ": group_size (", group_size,
              ") must divide in_features K (", K, ")");
  TORCH_CHECK(group_size % 8 == 0, "lrqat::", op, ": group_size must be a multiple of 8 (or -1 / K for ",
              "per-channel scales), got ", group_size);
  return K / group_size;
}

void check_x(const at::Tensor& x, const char* op) {
  check_device(x, c10::DeviceType::CPU, op, "x");
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "lrqat::", op,
              ": x must be torch.float32, torch.bfloat16 or torch.float16, got ", dtype_name(x.scalar_type()));
  TORCH_CHECK(x.dim() == 2, "lrqat::", op, ": x must be 2-D [M, K] (flatten leading dims first), got shape ",
              x.sizes());
  TORCH_CHECK(x.size(1) % 2 == 0, "lrqat::", op, ": in_features K = x.size(1) must be even (two nibbles per ",
              "byte), got ", x.size(1));
}

void check_bias(const c10::optional<at::Tensor>& bias, int64_t N, const char* op) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  check_device(b, c10::DeviceType::CPU, op, "bias");
  TORCH_CHECK(is_float_dtype(b.scalar_type()), "lrqat::", op,
              ": bias must be torch.float32, torch.bfloat16 or torch.float16, got ", dtype_name(b.scalar_type()));
  TORCH_CHECK(b.dim() == 1 && b.size(0) == N, "lrqat::", op, ": bias must have shape [N] = [", N, "], got ",
              b.sizes());
}

// Checks of the standard-layout arguments (shared by int4_linear and int4_prepack_cpu).
// Returns G.
int64_t check_standard_weight(const at::Tensor& qweight, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& zero_point, int64_t group_size, const char* op) {
  check_device(qweight, c10::DeviceType::CPU, op, "qweight");
  check_dtype(qweight, at::kByte, op, "qweight");
  TORCH_CHECK(qweight.dim() == 2, "lrqat::", op, ": qweight must be 2-D [N, K / 2] (pack_nibbles layout), got shape ",
              qweight.sizes());
  const int64_t N = qweight.size(0);
  const int64_t K = 2 * qweight.size(1);
  const int64_t G = num_groups(K, group_size, op);
  check_device(scale, c10::DeviceType::CPU, op, "scale");
  TORCH_CHECK(is_float_dtype(scale.scalar_type()), "lrqat::", op,
              ": scale must be torch.float32, torch.bfloat16 or torch.float16, got ", dtype_name(scale.scalar_type()));
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == G, "lrqat::", op,
              ": scale must have shape [N, K / group_size] = [", N, ", ", G, "] (", G == 1 ? "per channel" : "per group",
              ", K = ", K, ", group_size = ", group_size, "), got ", scale.sizes());
  if (zero_point.has_value()) {
    const at::Tensor& z = *zero_point;
    check_device(z, c10::DeviceType::CPU, op, "zero_point");
    TORCH_CHECK(is_int_dtype(z.scalar_type()), "lrqat::", op, ": zero_point must have an integer dtype, got ",
                dtype_name(z.scalar_type()));
    TORCH_CHECK(z.dim() == 2 && z.size(0) == N && z.size(1) == G, "lrqat::", op,
                ": zero_point must have the shape of scale, [N, K / group_size] = [", N, ", ", G, "], got ", z.sizes());
    if (z.numel() > 0) {
      auto mm = at::aminmax(z.to(at::kLong));
      const int64_t lo = std::get<0>(mm).item<int64_t>();
      const int64_t hi = std::get<1>(mm).item<int64_t>();
      TORCH_CHECK(lo >= -8 && hi <= 7, "lrqat::", op, ": zero_point values must be in [-8, 7] (the int4 grid), got [",
                  lo, ", ", hi, "]");
    }
  }
  return G;
}

// ---------------------------------------------------------------------------------------
// Prepack

// Standard layout -> prepacked layout (int4_cpu.h). Arguments already checked; G = groups.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prepack_checked(const at::Tensor& qweight_in, const at::Tensor& scale_in,
                                                               const c10::optional<at::Tensor>& zero_point,
                                                               int64_t G) {
  const at::Tensor qweight = qweight_in.contiguous();
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  const int64_t N = qweight.size(0);
  const int64_t Kb = qweight.size(1);  // bytes per row = K / 2
  const int64_t K = 2 * Kb;
  const int64_t Kp = round_up(K, kKBlock);
  const int64_t Np = (N + kPanel - 1) / kPanel;
  const int64_t nkb = Kp / kKBlock;

  at::Tensor pw = at::empty({Np, nkb, kBlockBytes}, qweight.options());
  advise_huge_pages(pw.mutable_data_ptr(), pw.numel());
  at::Tensor ps = at::empty({Np, G, kPanel}, scale.options());
  at::Tensor pz;
  const bool has_zp = zero_point.has_value();
  at::Tensor z32;
  if (has_zp) {
    z32 = zero_point->to(at::kInt).contiguous();
    pz = at::empty({Np, G, kPanel}, z32.options());
  } else {
    pz = at::empty({0}, qweight.options().dtype(at::kInt));
  }
  if (Np == 0) return {pw, ps, pz};

  const uint8_t* qw = qweight.const_data_ptr<uint8_t>();
  const float* sc = scale.const_data_ptr<float>();
  const int32_t* zin = has_zp ? z32.const_data_ptr<int32_t>() : nullptr;
  uint32_t* w = reinterpret_cast<uint32_t*>(pw.mutable_data_ptr<uint8_t>());
  float* so = ps.mutable_data_ptr<float>();
  int32_t* zo = has_zp ? pz.mutable_data_ptr<int32_t>() : nullptr;

  // Four standard bytes (k = 8 kb .. 8 kb + 7 of one row; byte j = k 2j low | k 2j+1 high) ->
  // one word: the low nibbles gathered into bits 0..15, the high nibbles into 16..31, each
  // XOR 8 (offset-binary u = w_int + 8). Padding (rows >= N, k >= K) is w_int = 0.
  auto word_of = [](uint32_t v) -> uint32_t {
    uint32_t lo = v & 0x0F0F0F0Fu, hi = (v >> 4) & 0x0F0F0F0Fu;
    lo = (lo | (lo >> 4)) & 0x00FF00FFu;
    hi = (hi | (hi >> 4)) & 0x00FF00FFu;
    lo = (lo | (lo >> 8)) & 0xFFFFu;
    hi = (hi | (hi >> 8)) & 0xFFFFu;
    return (lo | (hi << 16)) ^ 0x88888888u;
  };
  const int64_t full_kb = Kb / 4;  // k blocks with all 4 bytes inside the row
  at::parallel_for(0, Np, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      // Lane by lane: each row is read sequentially. (Reading 64 rows a line at a time would
      // thrash L1: rows of K / 2 = 2 KiB map to the same sets.)
      for (int64_t lane = 0; lane < kPanel; ++lane) {
        const int64_t n = p * kPanel + lane;
        const bool valid = n < N;
        const uint8_t* row = valid ? qw + n * Kb : qw;
        uint32_t* wl = w + p * nkb * kPanel + lane;
        for (int64_t kb = 0; kb < nkb; ++kb) {
          uint32_t v = 0;  // bytes kb*4 .. kb*4+3, byte j in bits 8j.. (one load on little-endian)
          if (valid) {
            const uint8_t* b = row + kb * 4;
            if (kb < full_kb) {
              v = b[0] | (static_cast<uint32_t>(b[1]) << 8) | (static_cast<uint32_t>(b[2]) << 16) |
                  (static_cast<uint32_t>(b[3]) << 24);
            } else {
              for (int64_t j = 0; j < 4 && kb * 4 + j < Kb; ++j) v |= static_cast<uint32_t>(b[j]) << (8 * j);
            }
          }
          wl[kb * kPanel] = word_of(v);
        }
        for (int64_t g = 0; g < G; ++g) {
          so[(p * G + g) * kPanel + lane] = valid ? sc[n * G + g] : 0.0f;
          if (has_zp) {
            const int32_t off = 8 + (valid ? zin[n * G + g] : 0);
            zo[(p * G + g) * kPanel + lane] = off | (off << 16);
          }
        }
      }
    }
  });
  return {pw, ps, pz};
}

// ---------------------------------------------------------------------------------------
// Portable kernel: same chunked structure as the vector kernels, plain loops (the compiler
// may auto-vectorise them for the baseline ISA). fp32 x, fp32 y.
void gemm_scalar(const GemmParams& p, int64_t p0, int64_t p1, int64_t m0, int64_t m1, float* scratch) {
  float* buf = scratch;
  float* C = scratch + kKChunk * kPanel;
  const int64_t rows = m1 - m0;
  const int64_t nkb = p.Kp / kKBlock;
  const float* x = static_cast<const float*>(p.x);
  float* y = static_cast<float*>(p.y);
  for (int64_t panel = p0; panel < p1; ++panel) {
    std::fill(C, C + rows * kPanel, 0.0f);
    for (int64_t k0 = 0; k0 < p.Kp; k0 += kKChunk) {
      const int64_t k1 = std::min(k0 + kKChunk, p.Kp);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t kb = k / kKBlock;
        const int j = static_cast<int>(k % kKBlock);
        const int shift = (j & 1) * 16 + (j >> 1) * 4;
        const int64_t g = k / p.group_k;
        const uint32_t* wk = p.w + (panel * nkb + kb) * kPanel;
        const float* sk = p.scale + (panel * p.G + g) * kPanel;
        const int32_t* zk = p.zz ? p.zz + (panel * p.G + g) * kPanel : nullptr;
        float* b = buf + (k - k0) * kPanel;
        for (int64_t n = 0; n < kPanel; ++n) {
          const int32_t u = static_cast<int32_t>((wk[n] >> shift) & 0xFu);
          const int32_t off = zk ? (zk[n] & 0xFFFF) : 8;
          b[n] = sk[n] * static_cast<float>(u - off);  // scale * (w_int - z), as the reference
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + (m0 + r) * p.ldx;
        float* c = C + r * kPanel;
        for (int64_t k = k0; k < k1; ++k) {
          const float xv = xr[k];
          const float* b = buf + (k - k0) * kPanel;
          for (int64_t n = 0; n < kPanel; ++n) c[n] += xv * b[n];
        }
      }
    }
    const int64_t n0 = panel * kPanel;
    const int64_t nn = std::min(kPanel, p.N - n0);
    for (int64_t r = 0; r < rows; ++r) {
      float* yr = y + (m0 + r) * p.ldy + n0;
      const float* c = C + r * kPanel;
      for (int64_t j = 0; j < nn; ++j) yr[j] = c[j] + (p.bias ? p.bias[n0 + j] : 0.0f);
    }
  }
}

void run_kernel(Isa isa, const GemmParams& p, int64_t p0, int64_t p1, int64_t m0, int64_t m1, float* scratch) {
  switch (isa) {
#if LRQAT_HAVE_AVX512
    case Isa::kAvx512: gemm_avx512(p, p0, p1, m0, m1, scratch); return;
#endif
#if LRQAT_HAVE_AVX2
    case Isa::kAvx2: gemm_avx2(p, p0, p1, m0, m1, scratch); return;
#endif
    default: gemm_scalar(p, p0, p1, m0, m1, scratch); return;
  }
}

// ---------------------------------------------------------------------------------------
// GEMM on prepacked weights

at::Tensor linear_prepacked(const at::Tensor& x_in, const at::Tensor& packed_weight, const at::Tensor& packed_scale,
                            const c10::optional<at::Tensor>& packed_zero, int64_t out_features, int64_t group_size,
                            const c10::optional<at::Tensor>& bias, const std::string& isa_req, const char* op) {
  check_x(x_in, op);
  const int64_t M = x_in.size(0);
  const int64_t K = x_in.size(1);
  const int64_t Kp = round_up(K, kKBlock);
  const int64_t N = out_features;
  const int64_t G = num_groups(K, group_size, op);

  check_device(packed_weight, c10::DeviceType::CPU, op, "packed_weight");
  check_dtype(packed_weight, at::kByte, op, "packed_weight");
  TORCH_CHECK(packed_weight.dim() == 3 && packed_weight.size(1) == Kp / kKBlock && packed_weight.size(2) == kBlockBytes,
              "lrqat::", op, ": packed_weight must have shape [ceil(N / 64), ceil(K / 8), 256] = [*, ", Kp / kKBlock,
              ", 256] for K = ", K, " (from lrqat::int4_prepack_cpu), got ", packed_weight.sizes());
  check_contiguous(packed_weight, op, "packed_weight");
  const int64_t Np = packed_weight.size(0);
  TORCH_CHECK(N >= 0 && (N + kPanel - 1) / kPanel == Np, "lrqat::", op, ": out_features (", N,
              ") does not match packed_weight, which holds ", Np, " panels of 64 columns");
  check_device(packed_scale, c10::DeviceType::CPU, op, "packed_scale");
  check_dtype(packed_scale, at::kFloat, op, "packed_scale");
  LRQAT_CHECK_SHAPE(op, packed_scale, Np, G, kPanel);
  check_contiguous(packed_scale, op, "packed_scale");
  const bool has_zp = packed_zero.has_value() && packed_zero->numel() > 0;
  if (has_zp) {
    check_device(*packed_zero, c10::DeviceType::CPU, op, "packed_zero");
    check_dtype(*packed_zero, at::kInt, op, "packed_zero");
    TORCH_CHECK(packed_zero->sizes() == packed_scale.sizes(), "lrqat::", op,
                ": packed_zero must have the shape of packed_scale ", packed_scale.sizes(), ", got ",
                packed_zero->sizes());
    check_contiguous(*packed_zero, op, "packed_zero");
  }
  check_bias(bias, N, op);

  const Isa isa = resolve_isa(isa_req, op);
  const at::ScalarType out_dtype = x_in.scalar_type();
  at::Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) {  // empty sum: y = bias (or 0)
    y.zero_();
    if (bias.has_value()) y.add_(*bias);
    return y;
  }

  // Activations as the kernel reads them: bf16 only for the AVX-512 dot-product path.
  at::Tensor x = x_in;
  const bool x_bf16 = isa == Isa::kAvx512 && out_dtype == at::kBFloat16;
  if (!x_bf16 && x.scalar_type() != at::kFloat) x = x.to(at::kFloat);
  if (Kp != K) x = at::constant_pad_nd(x, {0, Kp - K}, 0);  // zero columns meet w_int = 0 padding
  x = x.contiguous();
  // The vector kernels write fp32 / bf16 / fp16 (AVX-512) or fp32 (AVX2, scalar) output.
  const bool direct_out = isa == Isa::kAvx512 || out_dtype == at::kFloat;
  at::Tensor y_k = direct_out ? y : at::empty({M, N}, x_in.options().dtype(at::kFloat));
  at::Tensor b32;
  if (bias.has_value()) b32 = bias->to(at::kFloat).contiguous();

  GemmParams p;
  p.x = x.const_data_ptr();
  p.ldx = Kp;
  p.M = M;
  p.Kp = Kp;
  p.group_k = G == 1 ? Kp : K / G;
  p.G = G;
  p.w = reinterpret_cast<const uint32_t*>(packed_weight.const_data_ptr<uint8_t>());
  p.scale = packed_scale.const_data_ptr<float>();
  p.zz = has_zp ? packed_zero->const_data_ptr<int32_t>() : nullptr;
  p.bias = bias.has_value() ? b32.const_data_ptr<float>() : nullptr;
  p.y = y_k.mutable_data_ptr();
  p.ldy = N;
  p.N = N;
  p.x_type = x_bf16 ? kXBF16 : kXF32;
  p.y_type = y_k.scalar_type() == at::kFloat ? kYF32 : (y_k.scalar_type() == at::kBFloat16 ? kYBF16 : kYF16);

  // Tasks: (panel, block of rows). Rows stay together as long as there are panels enough
  // to keep every thread busy, because each task dequantises its panel once for its rows.
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t rows_per_task = M;
  if (M > kSmallMaxRows) {
    int64_t m_tasks = (M + kMaxRowsPerTask - 1) / kMaxRowsPerTask;
    if (Np < nthreads) m_tasks = std::max(m_tasks, (nthreads + Np - 1) / Np);
    rows_per_task = round_up((M + m_tasks - 1) / m_tasks, kMR);
    rows_per_task = std::min(rows_per_task, std::max<int64_t>(M, 1));
  }
  const int64_t m_tasks = (M + rows_per_task - 1) / rows_per_task;
  const int64_t n_tasks = Np * m_tasks;
  const int64_t scratch_n = scratch_floats(rows_per_task);
  // Tasks are handed out dynamically (an atomic counter) rather than as one static slice per
  // thread: on a shared machine one core may be time-sliced with another process, and a
  // static split would make every call wait for that core's slice.
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min(nthreads, n_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> storage(static_cast<size_t>(scratch_n) + 16);
    float* scratch = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t t = next.fetch_add(1, std::memory_order_relaxed); t < n_tasks;
           t = next.fetch_add(1, std::memory_order_relaxed)) {
        const int64_t panel = t / m_tasks;
        const int64_t m0 = (t % m_tasks) * rows_per_task;
        run_kernel(isa, p, panel, panel + 1, m0, std::min(M, m0 + rows_per_task), scratch);
      }
    }
  });
  if (!direct_out) y.copy_(y_k);
  return y;
}

// ---------------------------------------------------------------------------------------
// Op entry points

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& zero_point, int64_t group_size,
                           const c10::optional<at::Tensor>& bias) {
  constexpr const char* op = "int4_linear";
  check_x(x, op);
  const int64_t G = check_standard_weight(qweight, scale, zero_point, group_size, op);
  TORCH_CHECK(x.size(1) == 2 * qweight.size(1), "lrqat::", op, ": x's in_features K = ", x.size(1),
              " must equal 2 * qweight.size(1) (qweight is uint8 [N, K / 2], two nibbles per byte), got qweight of ",
              "shape ", qweight.sizes());
  auto packed = prepack_checked(qweight, scale, zero_point, G);
  const at::Tensor& pz = std::get<2>(packed);
  return linear_prepacked(x, std::get<0>(packed), std::get<1>(packed),
                          pz.numel() > 0 ? c10::optional<at::Tensor>(pz) : c10::nullopt, qweight.size(0), group_size,
                          bias, "auto", op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_prepack_cpu(const at::Tensor& qweight, const at::Tensor& scale,
                                                                const c10::optional<at::Tensor>& zero_point,
                                                                int64_t group_size) {
  const int64_t G = check_standard_weight(qweight, scale, zero_point, group_size, "int4_prepack_cpu");
  return prepack_checked(qweight, scale, zero_point, G);
}

at::Tensor int4_linear_prepacked_cpu(const at::Tensor& x, const at::Tensor& packed_weight,
                                     const at::Tensor& packed_scale, const c10::optional<at::Tensor>& packed_zero,
                                     int64_t out_features, int64_t group_size, const c10::optional<at::Tensor>& bias,
                                     c10::string_view isa) {
  return linear_prepacked(x, packed_weight, packed_scale, packed_zero, out_features, group_size, bias,
                          std::string(isa.data(), isa.size()), "int4_linear_prepacked_cpu");
}

}  // namespace
}  // namespace int4_cpu
}  // namespace lrqat

TORCH_LIBRARY_IMPL(lrqat, CPU, m) {
  m.impl("int4_linear", &lrqat::int4_cpu::int4_linear_cpu);
  m.impl("int4_prepack_cpu", &lrqat::int4_cpu::int4_prepack_cpu);
  m.impl("int4_linear_prepacked_cpu", &lrqat::int4_cpu::int4_linear_prepacked_cpu);
}
