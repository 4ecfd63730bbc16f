// CPU impls of lrqat::pack_nibbles / lrqat::unpack_nibbles (schemas in csrc/registration.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "nibble/nibble.h"
#include "nibble/nibble_checks.h"

namespace lrqat {
namespace nibble {
namespace {

// Bytes per task: big enough that thread start-up is amortised over a memory-bound loop.
constexpr int64_t kGrain = 32768;

at::Tensor pack_nibbles_cpu(const at::Tensor& w_int) {
  check_pack_input(w_int, c10::DeviceType::CPU);
  const int64_t rows = w_int.size(0);
  const int64_t cols = w_int.size(1);
  at::Tensor packed = at::empty({rows, cols / 2}, w_int.options().dtype(at::kByte));
  const int64_t n = packed.numel();
  if (n == 0) return packed;

  const int8_t* src = w_int.const_data_ptr<int8_t>();
  uint8_t* dst = packed.mutable_data_ptr<uint8_t>();

  // The range check is fused into the packing pass (the data is in cache anyway): each
  // chunk ANDs a branch-free flag so the loop still vectorizes, and only a failing chunk
  // is rescanned to name the first offending element.
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  std::atomic<int64_t> first_bad{kNone};
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    bool ok = true;
    for (int64_t i = begin; i < end; ++i) {
      const int8_t lo = src[2 * i];
      const int8_t hi = src[2 * i + 1];
      ok &= in_range(lo) & in_range(hi);
      dst[i] = pack2(lo, hi);
    }
    if (ok) return;
    for (int64_t e = 2 * begin; e < 2 * end; ++e) {
      if (!in_range(src[e])) {
        int64_t seen = first_bad.load();
        while (e < seen && !first_bad.compare_exchange_weak(seen, e)) {
        }
        return;
      }
    }
  });

  const int64_t bad = first_bad.load();
  TORCH_CHECK(bad == kNone, "lrqat::pack_nibbles: w_int values must be in [-8, 7] (signed 4-bit), ",
              "got w_int[", bad / cols, ", ", bad % cols, "] = ", static_cast<int>(src[bad]));
  return packed;
}

at::Tensor unpack_nibbles_cpu(const at::Tensor& packed) {
  check_unpack_input(packed, c10::DeviceType::CPU);
  const int64_t rows = packed.size(0);
  const int64_t half = packed.size(1);
  at::Tensor w_int = at::empty({rows, 2 * half}, packed.options().dtype(at::kChar));
  const int64_t n = packed.numel();
  if (n == 0) return w_int;

  const uint8_t* src = packed.const_data_ptr<uint8_t>();
  int8_t* dst = w_int.mutable_data_ptr<int8_t>();
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const uint8_t byte = src[i];
      dst[2 * i] = unpack_lo(byte);
      dst[2 * i + 1] = unpack_hi(byte);
    }
  });
  return w_int;
}

}  // namespace
}  // namespace nibble
}  // namespace lrqat

TORCH_LIBRARY_IMPL(lrqat, CPU, m) {
  m.impl("pack_nibbles", &lrqat::nibble::pack_nibbles_cpu);
  m.impl("unpack_nibbles", &lrqat::nibble::unpack_nibbles_cpu);
}
