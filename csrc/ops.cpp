// Schemas of the untangle_ext ops; kernels are registered per device in cpu/ and cuda/.
#include <torch/library.h>

TORCH_LIBRARY(untangle_ext, m) {
  m.def(
      "accumulate_linear(Tensor x, Tensor weight, Tensor shift_x, Tensor out_offset, Tensor slots, "
      "Tensor(a!) mat, Tensor(b!) vec) -> Tensor");
  m.def(
      "accumulate_conv2d(Tensor x, Tensor weight, Tensor shift_c, Tensor out_offset, Tensor slots, "
      "Tensor(a!) mat, Tensor(b!) vec, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("pattern_backward_linear(Tensor grad_out, Tensor patterns, Tensor slots) -> Tensor");
  m.def(
      "pattern_backward_conv2d(Tensor grad_out, Tensor patterns, Tensor slots, int[] input_hw, "
      "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
}
