// CPU impls of lrqat::int4_gpu_prepack and of the test hook lrqat::int4_gpu_dequant_words
// (schemas in csrc/registration.cpp). The GEMM itself is CUDA-only (int4_gpu_cuda.cu); the
// prepack has a CPU impl so a checkpoint can be converted at load time before it is moved
// to the GPU, and so the layout is testable without a GPU.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

#include "int4_gpu/int4_gpu.h"
#include "int4_gpu/int4_gpu_checks.h"

namespace lrqat {
namespace int4_gpu {
namespace {

at::Tensor int4_gpu_prepack_cpu(const at::Tensor& qweight) {
  check_prepack_input(qweight, c10::DeviceType::CPU);
  const int64_t n_rows = qweight.size(0);
  const int64_t k_bytes = qweight.size(1);
  const int64_t strips = (n_rows + kStripN - 1) / kStripN;
  const int64_t steps = 2 * k_bytes / kStepK;
  at::Tensor out = at::empty({strips, steps, kWordsPerStep}, qweight.options().dtype(at::kInt));
  const uint8_t* src = qweight.const_data_ptr<uint8_t>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>());
  // One task per (strip, step): 256 words, each gathering 4 bytes from 8 rows.
  at::parallel_for(0, strips * steps, 64, [&](int64_t begin, int64_t end) {
    for (int64_t ps = begin; ps < end; ++ps) {
      const int64_t p = ps / steps, s = ps % steps;
      uint32_t* w = dst + ps * kWordsPerStep;
      for (int u = 0; u < kSubTiles; ++u)
        for (int lane = 0; lane < 32; ++lane)
          w[u * 32 + lane] = prepack_word(src, n_rows, k_bytes, p, s, u, lane);
    }
  });
  return out;
}

// Test hook for the magic-number dequantisation (int4_gpu.h): for each 32-bit word, the 8
// 16-bit values the kernel's registers would hold, in register order (pair a = 0..3, low
// half then high half), as float16 / bfloat16 [n, 8]. zero_point is one integer for all.
at::Tensor int4_gpu_dequant_words_cpu(const at::Tensor& words, at::ScalarType dtype, int64_t zero_point) {
  constexpr const char* op = "int4_gpu_dequant_words";
  check_device(words, c10::DeviceType::CPU, op, "words");
  check_dtype(words, at::kInt, op, "words");
  check_dim(words, 1, op, "words");
  check_contiguous(words, op, "words");
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16, "lrqat::", op,
              ": dtype must be torch.float16 or torch.bfloat16, got ", dtype_name(dtype));
  TORCH_CHECK(zero_point >= -8 && zero_point <= 7, "lrqat::", op,
              ": zero_point must be in [-8, 7], got ", zero_point);
  const int64_t n = words.size(0);
  at::Tensor out = at::empty({n, 8}, words.options().dtype(at::kShort));
  const uint32_t* src = reinterpret_cast<const uint32_t*>(words.const_data_ptr<int32_t>());
  int16_t* dst = out.mutable_data_ptr<int16_t>();
  const bool bf16 = dtype == at::kBFloat16;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t regs[4];
    dequant_word_host(src[i], bf16, static_cast<int>(zero_point), regs);
    for (int a = 0; a < 4; ++a) {
      dst[8 * i + 2 * a] = static_cast<int16_t>(regs[a] & 0xFFFFu);
      dst[8 * i + 2 * a + 1] = static_cast<int16_t>(regs[a] >> 16);
    }
  }
  return out.view(dtype);
}

}  // namespace
}  // namespace int4_gpu
}  // namespace lrqat

TORCH_LIBRARY_IMPL(lrqat, CPU, m) {
  m.impl("int4_gpu_prepack", &lrqat::int4_gpu::int4_gpu_prepack_cpu);
  m.impl("int4_gpu_dequant_words", &lrqat::int4_gpu::int4_gpu_dequant_words_cpu);
}
