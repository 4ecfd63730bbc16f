// CUDA impls of lrqat::pack_nibbles / lrqat::unpack_nibbles (schemas in csrc/registration.cpp).
//
// Only c10/cuda headers are used (no ATen/cuda/CUDAContext.h, which drags in cuBLAS and
// cuSPARSE headers that a bare CUDA toolkit may not ship).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "nibble/nibble.h"
#include "nibble/nibble_checks.h"

namespace lrqat {
namespace nibble {
namespace {

constexpr int kThreads = 256;
// A grid-stride loop with a capped grid: enough blocks to fill any current GPU many times
// over, and no 32-bit grid-size overflow for huge matrices.
constexpr int64_t kMaxBlocks = 65535;

int64_t num_blocks(int64_t n) {
  return std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
}

// Both kernels are pure bandwidth and run once per layer (convert / load), so they stay
// scalar: consecutive threads touch consecutive bytes, which the coalescer merges into
// full 32 B sectors, and vector loads would need an alignment check (a tensor's storage
// offset can be odd) for little gain. The index is 64-bit: out * in can pass 2^31.
__global__ void pack_nibbles_kernel(const int8_t* __restrict__ src, uint8_t* __restrict__ dst,
                                    int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    dst[i] = pack2(src[2 * i], src[2 * i + 1]);
  }
}

__global__ void unpack_nibbles_kernel(const uint8_t* __restrict__ src, int8_t* __restrict__ dst,
                                      int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const uint8_t byte = src[i];
    dst[2 * i] = unpack_lo(byte);
    dst[2 * i + 1] = unpack_hi(byte);
  }
}

// Unlike the CPU impl, the value range of w_int is NOT checked here: that would need a
// device-to-host sync (fatal inside CUDA graphs / torch.compile). Out-of-range values keep
// their low 4 bits. Callers produce w_int by clamping to [-8, 7] first.
at::Tensor pack_nibbles_cuda(const at::Tensor& w_int) {
  check_pack_input(w_int, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(w_int.device());
  at::Tensor packed = at::empty({w_int.size(0), w_int.size(1) / 2}, w_int.options().dtype(at::kByte));
  const int64_t n = packed.numel();
  if (n == 0) return packed;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  pack_nibbles_kernel<<<num_blocks(n), kThreads, 0, stream>>>(
      w_int.const_data_ptr<int8_t>(), packed.mutable_data_ptr<uint8_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return packed;
}

at::Tensor unpack_nibbles_cuda(const at::Tensor& packed) {
  check_unpack_input(packed, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor w_int = at::empty({packed.size(0), 2 * packed.size(1)}, packed.options().dtype(at::kChar));
  const int64_t n = packed.numel();
  if (n == 0) return w_int;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  unpack_nibbles_kernel<<<num_blocks(n), kThreads, 0, stream>>>(
      packed.const_data_ptr<uint8_t>(), w_int.mutable_data_ptr<int8_t>(), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w_int;
}

}  // namespace
}  // namespace nibble
}  // namespace lrqat

TORCH_LIBRARY_IMPL(lrqat, CUDA, m) {
  m.impl("pack_nibbles", &lrqat::nibble::pack_nibbles_cuda);
  m.impl("unpack_nibbles", &lrqat::nibble::unpack_nibbles_cuda);
}
