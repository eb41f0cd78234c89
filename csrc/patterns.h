// The pattern op: one class's float64 moments of one affine layer -> a_lin, a_pos, a_neg and κ.
//
// Semantics (normative, and the fallback): untangle_ext/_reference.py::layer_patterns.
// patterns.cpp validates the inputs and allocates the outputs (device-generic); each device
// file provides the fused loop (cpu/patterns.cpp) and registers the op for its dispatch key.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>

namespace untangle {

// Validated views of one layer's problem: G groups of Kg neurons with patches of Dg inputs.
struct PatternProblem {
  at::Tensor sums;    // (G, 3Kg + 1, Dg) float64, contiguous: [Σy~x~ | Σg x~ | Σg y~x~ | Σx~] per group
  at::Tensor vec;     // (3K + 1,) float64, contiguous: [Σy~ | n+ | Σg y~ | n]
  at::Tensor weight;  // K * Dg values, contiguous, any floating dtype
  at::Tensor shift;   // (G, Dg) float64, contiguous: the shift in patch space
  bool positive_mean_y = false;  // regimes use E[y | regime] (true) or E[y] over all samples (false)
  int64_t groups = 0, kg = 0, dg = 0;
};

// The outputs: a_lin, a_pos, a_neg (shaped like the weight, in the requested dtype; empty when not
// kept, and then not written) and κ = ‖a‖·‖w‖ of the (rounded) patterns, (3, K) float64, 0 where the
// pattern is 0, for all three.
struct PatternOutputs {
  at::Tensor lin, pos, neg, kappa;
};

using PatternKernel = void (*)(const PatternProblem& p, const PatternOutputs& out);

// Validate (errors name the argument and the fix), allocate, run `kernel`, return the four outputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_layer_patterns(
    const at::Tensor& sums, const at::Tensor& vec, const at::Tensor& weight, const at::Tensor& shift,
    bool positive_mean_y, at::ScalarType dtype, std::array<bool, 3> keep, PatternKernel kernel);

}  // namespace untangle
