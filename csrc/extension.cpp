// bert_fast._C: the Python module and the schemas of every op in the `bert_fast` namespace.
// Implementations register per device with TORCH_LIBRARY_IMPL in their own files
// (bias_gelu.cpp for CPU, bias_gelu_cuda.cpp for CUDA), so torch.compile and torch.export
// see ordinary torch.ops.bert_fast.* operators.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(bert_fast, m) {
  m.def("bias_gelu(Tensor x, Tensor bias, bool approximate_tanh) -> Tensor");
  m.def("bias_gelu_backward(Tensor grad, Tensor x, Tensor bias, bool approximate_tanh) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bert_fast C++/CUDA extension; ops live under torch.ops.bert_fast";
  m.def("with_cuda", []() {
#ifdef BERT_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether this build contains the CUDA kernels.");
}
