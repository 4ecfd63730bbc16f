// CPU impl of lrqat::binary_linear_cpu (schema in csrc/registration.cpp; layout and numerics in
// binary_cpu.h; kernels in binary_cpu_<isa>.cpp).
//
// This file holds everything that needs ATen: argument checks, instruction-set selection, the
// split over output columns, and the portable scalar kernel. Instruction set (every call): the
// op argument `isa` if not "auto", else LRQAT_CPU_ISA if set and not "auto", else the best the
// CPU supports (avx512 > avx2 > scalar); asking for one the CPU or build lacks is an error
// naming what is available (a forced path that silently ran another kernel would make its test
// meaningless). The AVX-512 kernel needs avx512f only.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

#include "binary_cpu/binary_cpu.h"
#include "checks.h"

#ifndef LRQAT_HAVE_AVX512
#define LRQAT_HAVE_AVX512 0
#endif
#ifndef LRQAT_HAVE_AVX2
#define LRQAT_HAVE_AVX2 0
#endif

namespace lrqat {
namespace binary_cpu {
namespace {

constexpr const char* kOp = "binary_linear_cpu";

enum class Isa { kScalar, kAvx2, kAvx512 };

bool cpu_has_avx512() {
#if LRQAT_HAVE_AVX512 && (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f");
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

Isa resolve_isa(std::string req) {
  for (char& c : req) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  std::string source = "isa argument";
  if (req.empty() || req == "auto") {
    const char* env = std::getenv("LRQAT_CPU_ISA");
    req = env ? std::string(env) : std::string();
    for (char& c : req) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    source = "LRQAT_CPU_ISA";
  }
  if (req.empty() || req == "auto") {
    if (cpu_has_avx512()) return Isa::kAvx512;
    if (cpu_has_avx2()) return Isa::kAvx2;
    return Isa::kScalar;
  }
  if (req == "scalar") return Isa::kScalar;
  if (req == "avx2" || req == "avx512") {
    const bool ok = req == "avx2" ? cpu_has_avx2() : cpu_has_avx512();
    TORCH_CHECK(ok, "lrqat::", kOp, ": instruction set '", req, "' requested (", source,
                ") but it is not available (CPU or build); available: ", available_isas(), " (or 'auto')");
    return req == "avx2" ? Isa::kAvx2 : Isa::kAvx512;
  }
  TORCH_CHECK(false, "lrqat::", kOp, ": unknown instruction set '", req, "' (", source,
              "); expected one of auto, scalar, avx2, avx512");
  return Isa::kScalar;
}

void gemm_scalar(const GemmParams& p) {
  for (int64_t m = 0; m < p.M; ++m) {
    const float* x = p.x + m * p.ldx;
    for (int64_t n = p.n0; n < p.n1; ++n) {
      const uint8_t* w = p.w + n * p.ldw;
      float P = 0.0f;
      for (int64_t k = 0; k < p.K; ++k)
        if ((w[k >> 3] >> (k & 7)) & 1) P += x[k];
      const float b = p.bias ? p.bias[n] : 0.0f;
      p.y[m * p.ldy + n] = p.scale[n * p.scale_stride] * (2.0f * P - p.rowsum[m]) + b;
    }
  }
}

at::Tensor binary_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                             const std::optional<at::Tensor>& bias, int64_t in_features, c10::string_view isa) {
  check_device(x, c10::kCPU, kOp, "x");
  check_dtype(x, at::kFloat, kOp, "x");
  check_dim(x, 2, kOp, "x");
  check_contiguous(x, kOp, "x");
  check_device(packed, c10::kCPU, kOp, "packed");
  check_dtype(packed, at::kByte, kOp, "packed");
  check_dim(packed, 2, kOp, "packed");
  check_contiguous(packed, kOp, "packed");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(in_features == K, "lrqat::", kOp, ": in_features (", in_features, ") must equal x.size(1) = ", K);
  TORCH_CHECK(packed.size(1) == (K + 7) / 8, "lrqat::", kOp, ": packed must be [N, ceil(K / 8)] = [N, ",
              (K + 7) / 8, "] for K = ", K, ", got shape ", packed.sizes());
  check_device(scale, c10::kCPU, kOp, "scale");
  check_dtype(scale, at::kFloat, kOp, "scale");
  TORCH_CHECK(scale.dim() == 1 && (scale.size(0) == 1 || scale.size(0) == N), "lrqat::", kOp,
              ": scale must be [1] or [N] = [", N, "], got shape ", scale.sizes());
  at::Tensor s = scale.contiguous();
  at::Tensor b;
  if (bias.has_value()) {
    check_device(*bias, c10::kCPU, kOp, "bias");
    check_dtype(*bias, at::kFloat, kOp, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "lrqat::", kOp, ": bias must be [N] = [", N,
                "], got shape ", bias->sizes());
    b = bias->contiguous();
  }
  const Isa chosen = resolve_isa(std::string(isa));
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  at::Tensor rowsum = at::sum(x, {1});
  GemmParams p{x.data_ptr<float>(), K, M, K, packed.data_ptr<uint8_t>(), packed.size(1),
               rowsum.data_ptr<float>(), s.data_ptr<float>(), s.size(0) == 1 ? 0 : 1,
               b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(), N, 0, N};
  // Columns split across threads: each reads only its rows of the (small) packed weight.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, M * ((K + 63) / 64)));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    GemmParams q = p;
    q.n0 = n0;
    q.n1 = n1;
    switch (chosen) {
#if LRQAT_HAVE_AVX512
      case Isa::kAvx512: gemm_avx512(q); break;
#endif
#if LRQAT_HAVE_AVX2
      case Isa::kAvx2: gemm_avx2(q); break;
#endif
      default: gemm_scalar(q); break;
    }
  });
  return y;
}

}  // namespace
}  // namespace binary_cpu
}  // namespace lrqat

TORCH_LIBRARY_IMPL(lrqat, CPU, m) {
  m.impl("binary_linear_cpu", &lrqat::binary_cpu::binary_linear_cpu);
}
