// Host-side argument checks of the lrqat::int4_gpu_* ops, shared by the CPU and CUDA impls.
// The fakes in lrqat_kernels/ops/int4_gpu.py raise the same messages.
#pragma once

#include "checks.h"
#include "int4_gpu/int4_gpu.h"

namespace lrqat {
namespace int4_gpu {

// qweight: the standard packed W_int (formats.py), uint8 [N, K / 2], K % 16 == 0.
inline void check_prepack_input(const at::Tensor& qweight, c10::DeviceType device_type) {
  constexpr const char* op = "int4_gpu_prepack";
  check_device(qweight, device_type, op, "qweight");
  check_dtype(qweight, at::kByte, op, "qweight");
  check_dim(qweight, 2, op, "qweight");
  TORCH_CHECK(qweight.size(0) >= 1 && qweight.size(1) >= 1,
              "lrqat::int4_gpu_prepack: qweight must be non-empty, got shape ", qweight.sizes());
  TORCH_CHECK((2 * qweight.size(1)) % kStepK == 0,
              "lrqat::int4_gpu_prepack: in_features (2 * qweight.size(1)) must be a multiple of 16 "
              "(one mma k-step), got shape ", qweight.sizes(),
              "; use backend='triton' or 'dequant' for such shapes");
  check_contiguous(qweight, op, "qweight");
}

}  // namespace int4_gpu
}  // namespace lrqat
