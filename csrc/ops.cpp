// Schemas of the untangle_ext ops; kernels are registered per device in cpu/ and cuda/.
// The conv ops take 1, 2 or 3 spatial dims: len(stride) == len(padding) == len(dilation)
// (== len(input_size)) is the rank.
#include <torch/library.h>

TORCH_LIBRARY(untangle_ext, m) {
  m.def(
      "accumulate_linear(Tensor x, Tensor weight, Tensor shift_x, Tensor out_offset, Tensor slots, "
      "Tensor(a!) mat, Tensor(b!) vec) -> Tensor");
  m.def(
      "accumulate_conv(Tensor x, Tensor weight, Tensor shift_c, Tensor out_offset, Tensor slots, "
      "Tensor(a!) mat, Tensor(b!) vec, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  m.def("pattern_backward_linear(Tensor grad_out, Tensor patterns, Tensor slots) -> Tensor");
  m.def(
      "pattern_backward_conv(Tensor grad_out, Tensor patterns, Tensor slots, int[] input_size, "
      "int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  // One class's moments of one layer -> a_lin, a_pos, a_neg (shaped like weight, in dtype), kappa (3, K).
  m.def(
      "layer_patterns(Tensor sums, Tensor vec, Tensor weight, Tensor shift, bool positive_mean_y, "
      "ScalarType dtype) -> (Tensor, Tensor, Tensor, Tensor)");
}
