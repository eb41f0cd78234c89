// Schemas of the untangle_ext ops; kernels are registered per device in cpu/ and cuda/.
// The conv op takes 1, 2 or 3 spatial dims: len(stride) == len(padding) == len(dilation) is the rank.
// build_info() says what this build is (torch, CUDA, archs; see untangle_ext/_native_build.py).
#include "untangle.h"

#include <torch/library.h>

TORCH_LIBRARY(untangle_ext, m) {
  m.def(
      "accumulate_linear(Tensor x, Tensor weight, Tensor shift_x, Tensor out_offset, Tensor slots, "
      "Tensor(a!) mat, Tensor(b!) vec) -> Tensor");
  m.def(
      "accumulate_conv(Tensor x, Tensor weight, Tensor shift_c, Tensor out_offset, Tensor slots, "
      "Tensor(a!) mat, Tensor(b!) vec, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  // One class's moments of one layer -> a_lin, a_pos, a_neg (shaped like weight, in dtype; an empty tensor
  // where keep is false), kappa (3, K) of all three.
  m.def(
      "layer_patterns(Tensor sums, Tensor vec, Tensor weight, Tensor shift, bool positive_mean_y, "
      "ScalarType dtype, bool[3] keep=[True, True, True]) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &untangle::build_info);
}
