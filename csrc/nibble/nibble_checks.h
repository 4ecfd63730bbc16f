// Host-side argument checks of lrqat::pack_nibbles / lrqat::unpack_nibbles, shared by the
// CPU and CUDA impls. The fakes in lrqat_kernels/ops/nibble.py raise the same messages.
#pragma once

#include "checks.h"

namespace lrqat {
namespace nibble {

inline void check_pack_input(const at::Tensor& w_int, c10::DeviceType device_type) {
  constexpr const char* op = "pack_nibbles";
  check_device(w_int, device_type, op, "w_int");
  check_dtype(w_int, at::kChar, op, "w_int");
  check_dim(w_int, 2, op, "w_int");
  TORCH_CHECK(w_int.size(1) % 2 == 0, "lrqat::pack_nibbles: w_int's in dimension must be even ",
              "(two nibbles per byte), got shape ", w_int.sizes());
  check_contiguous(w_int, op, "w_int");
}

inline void check_unpack_input(const at::Tensor& packed, c10::DeviceType device_type) {
  constexpr const char* op = "unpack_nibbles";
  check_device(packed, device_type, op, "packed");
  check_dtype(packed, at::kByte, op, "packed");
  check_dim(packed, 2, op, "packed");
  check_contiguous(packed, op, "packed");
}

}  // namespace nibble
}  // namespace lrqat
