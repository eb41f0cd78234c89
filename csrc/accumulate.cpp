// Device-generic driver of the moment accumulation ops (semantics: untangle_ext/_reference.py).
//
// Per batch, for N rows grouped by slot (SlotOrder), in the work dtype wt, with `sp` the
// spatial dims of a ConvNd (1 to 3 of them; none for Linear):
//   xs     (N, C, *sp_padded)  shifted, zero-padded input in slot order    [fused gather_shift]
//   y      (N, K, *sp_out)     xs * W (mm / convolution)                    [ATen]
//   z      (N, K, *sp_out)     y + out_offset, in the caller's row order    [fused design pass]
//   design (M, G*(3Kg+1), *sp_out)  [y | gate | gate*y | 1] of the M accumulated rows, same pass
//   mat[s] += design_s^T xs_s per slot segment: Linear as an in-place float64 addmm; conv as
//            float32 weight grads (no im2col) over chunks of at most kChunkSamples samples
//   vec[s] += [sum y | sum gate | sum gate*y | n]   (3K + 1), same pass
// xs, y (linear) and design live in reused scratch buffers: no large allocation per batch.
#include "untangle.h"

#include <algorithm>

#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

namespace untangle {
namespace {

// A conv layer's float32 products are summed over at most this many samples (rows x output
// positions) per weight-grad call (float64 work: one call), each chunk then added to the float64 accumulator: the
// float32 rounding grows with the summation length (LeNet's second conv at batch 256, 16,384
// positions per call: a_lin 8.4e-6 from float64; 512: 3.5e-7). Mirrored by
// untangle_ext._reference.CHUNK_SAMPLES. Linear products go straight into the float64 accumulator
// (dgemm with beta=1): exact, and at most ~1.5x an fp32 product plus a pass over the accumulator.
constexpr int64_t kChunkSamples = 512;
// Conv layers with several slots in a batch use one per-row product call while the per-row
// products fit in this many bytes (small layers, where per-call overhead dominates).
constexpr int64_t kPerRowBytes = 32 << 20;

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift, const at::Tensor& out_offset,
                  const at::Tensor& slots, const at::Tensor& mat, const at::Tensor& vec, int64_t in_features,
                  int64_t groups) {
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "untangle_ext: x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "untangle_ext: weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type(), "; cast the model or the input");
  const auto dev = x.device();
  for (const auto* t : {&weight, &shift, &out_offset, &slots, &mat, &vec}) {
    TORCH_CHECK(t->device() == dev, "untangle_ext: all tensors must be on x's device ", dev, ", found one on ",
                t->device());
  }
  const int64_t k = weight.size(0), dg = k ? weight.numel() / k : 0;
  TORCH_CHECK(k > 0, "untangle_ext: weight has no outputs");
  TORCH_CHECK(k % groups == 0, "untangle_ext: weight has ", k, " outputs, not divisible by groups=", groups);
  TORCH_CHECK(at::isFloatingType(shift.scalar_type()) && shift.numel() == in_features,
              "untangle_ext: shift must be a floating tensor with ", in_features, " entries, got ", shift.sizes());
  TORCH_CHECK(at::isFloatingType(out_offset.scalar_type()) && out_offset.numel() == k,
              "untangle_ext: out_offset must be a floating tensor with ", k, " entries, got ", out_offset.sizes());
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.size(0) == x.size(0),
              "untangle_ext: slots must be int64 of shape (", x.size(0), ",), got ", slots.scalar_type(), " ",
              slots.sizes());
  const int64_t kg = k / groups;
  TORCH_CHECK(mat.scalar_type() == at::kDouble && mat.is_contiguous() && mat.dim() == 4 && mat.size(1) == groups &&
                  mat.size(2) == 3 * kg + 1 && mat.size(3) == dg,
              "untangle_ext: mat must be a contiguous float64 tensor of shape (S, ", groups, ", ", 3 * kg + 1, ", ", dg,
              "), got ", mat.scalar_type(), " ", mat.sizes());
  TORCH_CHECK(vec.scalar_type() == at::kDouble && vec.is_contiguous() && vec.dim() == 2 &&
                  vec.size(0) == mat.size(0) && vec.size(1) == 3 * k + 1,
              "untangle_ext: vec must be a contiguous float64 tensor of shape (", mat.size(0), ", ", 3 * k + 1,
              "), got ", vec.scalar_type(), " ", vec.sizes());
}

// x (N, C, *sp) for a conv with geometry g, or (N, D) for Linear (g.nd() == 0); weight (K, D) or
// (K, C/groups, *kernel).
at::Tensor accumulate(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift,
                      const at::Tensor& out_offset, const at::Tensor& slots, at::Tensor& mat, at::Tensor& vec,
                      const ConvGeometry& g) {
  const bool linear = g.nd() == 0;
  const int64_t n = x.size(0), c = x.size(1), k = weight.size(0), kg = k / g.groups;
  const at::IntArrayRef kernel = weight.sizes().slice(2), in = x.sizes().slice(2);
  const std::vector<int64_t> padded = g.padded_size(in), out = g.output_size(in, kernel);
  const std::vector<int64_t> zshape = shape_of({n, k}, out);
  if (n == 0) return at::empty(zshape, x.options());

  const auto& dev = kernels_for(x);
  const auto wt = work_dtype(x.scalar_type());
  const int64_t num_slots = mat.size(0), dk = g.groups * (3 * kg + 1), p = numel_of(out);
  const SlotOrder so = slot_order(slots, num_slots);
  const int64_t m = so.seg[num_slots];

  at::Tensor xs = scratch("xs", x, wt, shape_of({n, c}, padded));
  dev.gather_shift(as_5d(x), shift.to(wt).contiguous(), so.order, g.pad_3d(), xs);
  at::Tensor w = weight.to(wt);
  at::Tensor y;
  if (linear) {
    y = scratch("y", x, wt, {n, k});
    at::mm_out(y, xs, w.t());
  } else {
    y = at::convolution(xs, w, c10::nullopt, g.stride, g.zeros, g.dilation, false, g.zeros, g.groups).contiguous();
  }
  at::Tensor z = at::empty(zshape, x.options());
  at::Tensor design = scratch("design", x, wt, shape_of({m, dk}, out));
  dev.design(y.view({n, k, p}), out_offset.to(at::kDouble).contiguous(), so, g.groups, z.view({n, k, p}),
             design.view({m, dk, p}), vec);

  int64_t segments = 0;
  for (int64_t s = 0; s < num_slots; ++s) segments += so.seg[s + 1] > so.seg[s];
  const int64_t dg = weight.numel() / k;
  if (!linear && segments > 1 && m * dk * dg * static_cast<int64_t>(c10::elementSize(wt)) <= kPerRowBytes) {
    // Many small slot segments: ONE grouped weight-grad call with the rows folded into the
    // groups gives every row's own product; each slot then sums its rows in float64.
    at::Tensor wshape = scratch("wshape", x, wt, shape_of({m * dk, weight.size(1)}, kernel));
    at::Tensor per_row = std::get<1>(at::convolution_backward(
        design.view(shape_of({1, m * dk}, out)), xs.narrow(0, 0, m).view(shape_of({1, m * c}, padded)), wshape,
        c10::nullopt, g.stride, g.zeros, g.dilation, false, g.zeros, g.groups * m, {false, true, false}));
    per_row = per_row.contiguous().view({m, dk * dg});
    for (int64_t s = 0; s < num_slots; ++s) {
      if (so.seg[s + 1] > so.seg[s]) dev.add_to_f64(mat.select(0, s), per_row.narrow(0, so.seg[s], so.seg[s + 1] - so.seg[s]));
    }
    return z;
  }
  const int64_t chunk = wt == at::kDouble ? n : std::max<int64_t>(1, kChunkSamples / std::max<int64_t>(1, p));
  for (int64_t s = 0; s < num_slots; ++s) {
    const int64_t m0 = so.seg[s], rows = so.seg[s + 1] - m0;
    if (rows == 0) continue;
    if (linear) {  // a float64 rank-`rows` update in place
      mat.select(0, s).view({dk, c}).addmm_(design.narrow(0, m0, rows).t().to(at::kDouble),
                                            xs.narrow(0, m0, rows).to(at::kDouble));
      continue;
    }
    at::Tensor wshape = scratch("wshape", x, wt, shape_of({dk, weight.size(1)}, kernel));
    for (int64_t r0 = m0; r0 < m0 + rows; r0 += chunk) {
      const int64_t r = std::min(chunk, m0 + rows - r0);
      at::Tensor prod = std::get<1>(at::convolution_backward(design.narrow(0, r0, r), xs.narrow(0, r0, r), wshape,
                                                             c10::nullopt, g.stride, g.zeros, g.dilation, false,
                                                             g.zeros, g.groups, {false, true, false}));
      dev.add_to_f64(mat.select(0, s), prod.contiguous());
    }
  }
  return z;
}

}  // namespace

at::Tensor accumulate_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift_x,
                             const at::Tensor& out_offset, const at::Tensor& slots, at::Tensor& mat,
                             at::Tensor& vec) {
  TORCH_CHECK(x.dim() == 2, "untangle_ext.accumulate_linear: x must be (N, D), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "untangle_ext.accumulate_linear: weight must be (K, ", x.size(1), "), got ", weight.sizes());
  check_inputs(x, weight, shift_x, out_offset, slots, mat, vec, x.size(1), 1);
  return accumulate(x, weight, shift_x, out_offset, slots, mat, vec, ConvGeometry::linear());
}

at::Tensor accumulate_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift_c,
                           const at::Tensor& out_offset, const at::Tensor& slots, at::Tensor& mat, at::Tensor& vec,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           int64_t groups) {
  const char* op = "accumulate_conv";
  const ConvGeometry g(op, stride, padding, dilation, groups);
  const int64_t nd = g.nd();
  TORCH_CHECK(x.dim() == nd + 2, "untangle_ext.", op, ": x must be (N, C, ", nd,
              " spatial dims) to match the ", nd, " stride entries, got ", x.sizes());
  TORCH_CHECK(weight.dim() == nd + 2 && weight.size(1) * groups == x.size(1), "untangle_ext.", op,
              ": weight must be (K, C/groups, ", nd, " kernel dims) with C=", x.size(1), " and groups=", groups,
              ", got ", weight.sizes());
  check_inputs(x, weight, shift_c, out_offset, slots, mat, vec, x.size(1), groups);
  g.check_fits(op, x.sizes().slice(2), weight.sizes().slice(2));
  return accumulate(x, weight, shift_c, out_offset, slots, mat, vec, g);
}

}  // namespace untangle
