// Input checks shared by every native op (CPU and CUDA).
//
// One helper per rule, so every op rejects bad input with the same wording:
//   "lrqat::<op>: <arg> must be <what is allowed>, got <what was passed>".
// The Python fake impls (lrqat_kernels/ops/*.py) raise the same messages, so a test's
// `match=` holds for eager and compiled calls alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace lrqat {

// Python spelling of a dtype ("torch.int8", not c10's "Char"), so messages read like torch's.
inline std::string dtype_name(at::ScalarType dtype) {
  return "torch." + std::string(c10::getDtypeNames(dtype).first);
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* arg) {
  TORCH_CHECK(t.scalar_type() == dtype, "lrqat::", op, ": ", arg, " must be ", dtype_name(dtype),
              ", got ", dtype_name(t.scalar_type()));
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* arg) {
  TORCH_CHECK(t.dim() == dim, "lrqat::", op, ": ", arg, " must be ", dim, "-D, got shape ",
              t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK(t.is_contiguous(), "lrqat::", op, ": ", arg,
              " must be contiguous (call .contiguous() first), got strides ", t.strides(),
              " for shape ", t.sizes());
}

inline void check_device(const at::Tensor& t, c10::DeviceType device_type, const char* op,
                         const char* arg) {
  // The dispatcher already routes by device; this guards direct calls of the impl functions.
  TORCH_CHECK(t.device().type() == device_type, "lrqat::", op, ": ", arg, " must be on ",
              device_type, ", got ", t.device());
}

// flash-attention style: CHECK_SHAPE(x, d0, d1, ...) compares the full shape.
#define LRQAT_CHECK_SHAPE(op, x, ...)                                                        \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), "lrqat::", op, ": ", #x,        \
              " must have shape (" #__VA_ARGS__ "), got ", (x).sizes())

}  // namespace lrqat
