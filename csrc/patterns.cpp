// Device-generic driver of the pattern op: input checks and output allocation (see patterns.h).
#include "patterns.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace untangle {
namespace {

constexpr const char* kOp = "untangle_ext.layer_patterns";

void check_float64(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.dim() == dim && t.is_contiguous(), kOp, ": ", name,
              " must be a contiguous float64 tensor with ", dim, " dims (the moments' layout, "
              "untangle_ext.moments), got ", t.scalar_type(), " ", t.sizes(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_layer_patterns(
    const at::Tensor& sums, const at::Tensor& vec, const at::Tensor& weight, const at::Tensor& shift,
    bool positive_mean_y, at::ScalarType dtype, std::array<bool, 3> keep, PatternKernel kernel) {
  check_float64(sums, "sums", 3);
  check_float64(vec, "vec", 1);
  check_float64(shift, "shift", 2);
  const int64_t groups = sums.size(0), rows = sums.size(1), dg = sums.size(2);
  TORCH_CHECK(rows >= 4 && (rows - 1) % 3 == 0, kOp, ": sums must hold 3 Kg + 1 rows per group (Kg >= 1), got ",
              rows);
  const int64_t kg = (rows - 1) / 3, k = groups * kg;
  TORCH_CHECK(vec.size(0) == 3 * k + 1, kOp, ": vec must hold 3 K + 1 = ", 3 * k + 1, " values for K = ", k,
              " neurons, got ", vec.size(0));
  TORCH_CHECK(shift.size(0) == groups && shift.size(1) == dg, kOp, ": shift must be (", groups, ", ", dg,
              ") like one patch per group, got ", shift.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()) && weight.dim() >= 2 && weight.size(0) == k &&
                  weight.numel() == k * dg,
              kOp, ": weight must be a floating tensor of ", k, " neurons with ", dg, " inputs each, got ",
              weight.scalar_type(), " ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(dtype), kOp, ": dtype must be a floating dtype, got ", dtype);
  for (const auto* t : {&vec, &weight, &shift}) {
    TORCH_CHECK(t->device() == sums.device(), kOp, ": all tensors must be on the device of sums (",
                sums.device(), "), found one on ", t->device());
  }
  PatternProblem p{sums, vec, weight.contiguous(), shift, positive_mean_y, groups, kg, dg};
  const auto opts = weight.options().dtype(dtype);
  const auto pattern = [&](bool kept) { return kept ? at::empty(weight.sizes(), opts) : at::empty({0}, opts); };
  PatternOutputs out{pattern(keep[0]), pattern(keep[1]), pattern(keep[2]), at::empty({3, k}, sums.options())};
  if (weight.numel() > 0) {
    kernel(p, out);
  } else {
    out.kappa.zero_();  // no inputs: every pattern is empty, κ = 0
  }
  return {out.lin, out.pos, out.neg, out.kappa};
}

}  // namespace untangle
