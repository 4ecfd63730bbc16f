// The one place where lrqat's operator schemas are declared.
//
// Every native op of lrqat_kernels is a dispatcher op `torch.ops.lrqat.<name>`:
//   * its schema is declared here, in TORCH_LIBRARY(lrqat, m), and nowhere else;
//   * its device impls live beside its kernels, one folder per op family
//     (csrc/<family>/<family>_cpu.cpp: TORCH_LIBRARY_IMPL(lrqat, CPU, m),
//      csrc/<family>/<family>_cuda.cu:  TORCH_LIBRARY_IMPL(lrqat, CUDA, m));
//   * its fake (meta) impl, which torch.compile traces with, is Python, in the module
//     named by m.set_python_module() just before its defs. torch checks that name
//     against the module that calls torch.library.register_fake, and
//     lrqat_kernels._ext imports these modules right after loading this library.
// setup.py globs csrc/**/*.cpp and csrc/**/*.cu, so a new family needs no build edits.
//
// Note: no <torch/extension.h> (pybind11) is needed anywhere: ops reach Python through the
// dispatcher. The module below only makes the .so importable as `lrqat_kernels._C`;
// importing it runs the static registrations.

#include <Python.h>
#include <torch/library.h>

extern "C" {
// A bare Python module named _C. Importing it loads this shared library, which runs the
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL static initializers of every translation unit.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                             // m_name
      "Native ops of lrqat_kernels; they live in torch.ops.lrqat.",  // m_doc
      -1,                                                               // m_size
      nullptr,                                                          // m_methods
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(lrqat, m) {
  // ---- nibble: signed 4-bit packing (NUMERICS.md "packed_int"); csrc/nibble/ ----------
  m.set_python_module("lrqat_kernels.ops.nibble");
  // w_int: int8 [out, in], values in [-8, 7], in even -> uint8 [out, in / 2];
  // column 2j -> low nibble, column 2j + 1 -> high nibble (two's complement).
  m.def("pack_nibbles(Tensor w_int) -> Tensor", {at::Tag::pt2_compliant_tag});
  // packed: uint8 [out, in / 2] -> int8 [out, in] (sign-extended).
  m.def("unpack_nibbles(Tensor packed) -> Tensor", {at::Tag::pt2_compliant_tag});

  // ---- int4_gpu: W4A16 GEMM for GPUs (tensor cores, magic-number dequant); csrc/int4_gpu/ --
  m.set_python_module("lrqat_kernels.ops.int4_gpu");
  // qweight: uint8 [N, K / 2] (packed_int nibbles), K % 16 == 0 -> int32 [ceil(N / 128), K / 16, 256]
  // in the kernel's layout (csrc/int4_gpu/int4_gpu.h). CPU and CUDA.
  m.def("int4_gpu_prepack(Tensor qweight) -> Tensor", {at::Tag::pt2_compliant_tag});
  // y = x @ (scale * (W_int - zero_point))^T + bias. x fp16/bf16 [M, K]; qweight from
  // int4_gpu_prepack; scale fp32 or x.dtype [G, N_pad] (G = 1 per-channel, else K / G a power of
  // two >= 32); zero_point int8 [G, N_pad] with values in [-8, 7] (exact only there; not checked
  // here, that would need a device sync: int4_gpu.prepack_int4_gpu checks it); bias x.dtype [N].
  // CUDA only.
  m.def("int4_gpu_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? zero_point, Tensor? bias, "
        "int out_features) -> Tensor", {at::Tag::pt2_compliant_tag});
  // Test hook: the kernel's magic-number dequantisation of int32 words, emulated on CPU ->
  // dtype [n, 8] in register order. CPU only.
  m.def("int4_gpu_dequant_words(Tensor words, ScalarType dtype, int zero_point) -> Tensor");

  // ---- int4_cpu: deployment INT4 GEMM, y = x @ (scale * (W_int - zero_point))^T + bias; csrc/int4_cpu/ --
  m.set_python_module("lrqat_kernels.ops.int4_linear_fakes");
  // Device-generic: x fp32/bf16/fp16 [M, K] (output in x.dtype); qweight uint8 [N, K / 2]
  // (pack_nibbles layout); scale fp32/bf16/fp16 [N, G] (G = 1: per channel, group_size -1 or K;
  // else G = K / group_size); zero_point integer [N, G] in [-8, 7]; bias [N]. CPU impl here.
  m.def("int4_linear(Tensor x, Tensor qweight, Tensor scale, Tensor? zero_point, int group_size, "
        "Tensor? bias=None) -> Tensor", {at::Tag::pt2_compliant_tag});
  // CPU prepack -> (packed_weight uint8 [ceil(N/64), ceil(K/8), 256], packed_scale fp32
  // [ceil(N/64), G, 64], packed_zero int32 [ceil(N/64), G, 64] or [0]); csrc/int4_cpu/int4_cpu.h.
  m.def("int4_prepack_cpu(Tensor qweight, Tensor scale, Tensor? zero_point, int group_size) "
        "-> (Tensor, Tensor, Tensor)", {at::Tag::pt2_compliant_tag});
  // GEMM on int4_prepack_cpu's output; isa: auto|scalar|avx2|avx512 (auto: LRQAT_CPU_ISA, else best).
  m.def("int4_linear_prepacked_cpu(Tensor x, Tensor packed_weight, Tensor packed_scale, "
        "Tensor? packed_zero, int out_features, int group_size, Tensor? bias=None, str isa=\"auto\") "
        "-> Tensor", {at::Tag::pt2_compliant_tag});

  // ---- binary_cpu: pQuant's 1-bit GEMM, y = scale * x @ S^T + bias, S = +-1; csrc/binary_cpu/ --
  m.set_python_module("lrqat_kernels.pquant");
  // x fp32 [M, K] contiguous; packed uint8 [N, ceil(K / 8)] (pquant.pack_signs: LSB-first along
  // k, bit 1 = +1); scale fp32 [1] or [N]; bias fp32 [N]; isa: auto|scalar|avx2|avx512. CPU only.
  m.def("binary_linear_cpu(Tensor x, Tensor packed, Tensor scale, Tensor? bias, int in_features, "
        "str isa=\"auto\") -> Tensor", {at::Tag::pt2_compliant_tag});
}
