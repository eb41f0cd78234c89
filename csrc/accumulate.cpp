// Device-generic driver of the moment accumulation ops (semantics: untangle_ext/_reference.py).
//
// Per batch, for N rows grouped by slot (SlotOrder), in the work dtype wt:
//   xs     (N, C, Hp, Wp)   shifted, zero-padded input in slot order       [fused gather_shift]
//   y      (N, K, Ho, Wo)   xs * W (mm / convolution)                       [ATen]
//   z      (N, K, Ho, Wo)   y + out_offset, in the caller's row order       [fused design pass]
//   design (M, G*(3Kg+1), Ho, Wo)  [y | gate | gate*y | 1] of the M accumulated rows, same pass
//   mat[s] += design_s^T xs_s per slot segment (mm / convolution weight grad, no im2col);
//            small Linear segments use an in-place float64 addmm instead
// xs, y (linear) and design live in reused scratch buffers: no large allocation per batch.
#include "untangle.h"

#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

namespace untangle {
namespace {

// Up to this many rows per slot, a Linear layer's products go straight into the float64
// accumulator (MKL/cuBLAS dgemm with beta=1): cheaper than an fp32 product plus a pass over
// the whole (3K+1, D) accumulator, and exact to float64 (measured crossover ~50-100 rows).
constexpr int64_t kDirectRows = 64;
// Conv layers with several slots in a batch use one per-row product call while the per-row
// products fit in this many bytes (small layers, where per-call overhead dominates).
constexpr int64_t kPerRowBytes = 32 << 20;

struct Geometry {
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups;
};

Geometry make_geometry(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(stride.size() == 2 && stride[0] > 0 && stride[1] > 0, "untangle_ext: stride must be two positive ints, got ",
              stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "untangle_ext: padding must be two non-negative ints, got ", padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] > 0 && dilation[1] > 0,
              "untangle_ext: dilation must be two positive ints, got ", dilation);
  TORCH_CHECK(groups > 0, "untangle_ext: groups must be positive, got ", groups);
  return {stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], groups};
}

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
                  vec.size(0) == mat.size(0) && vec.size(1) == 5 * k + 1,
              "untangle_ext: vec must be a contiguous float64 tensor of shape (", mat.size(0), ", ", 5 * k + 1,
              "), got ", vec.scalar_type(), " ", vec.sizes());
}

// x4 (N, C, H, W) (a linear input is (N, D, 1, 1)); weight (K, D) for linear, (K, Cg, kh, kw) for conv.
at::Tensor accumulate(const at::Tensor& x4, const at::Tensor& weight, const at::Tensor& shift,
                      const at::Tensor& out_offset, const at::Tensor& slots, at::Tensor& mat, at::Tensor& vec,
                      const Geometry& g, bool linear) {
  const int64_t n = x4.size(0), c = x4.size(1), k = weight.size(0), kg = k / g.groups;
  const int64_t kh = linear ? 1 : weight.size(2), kw = linear ? 1 : weight.size(3);
  const int64_t hp = x4.size(2) + 2 * g.pad_h, wp = x4.size(3) + 2 * g.pad_w;
  const int64_t ho = (hp - g.dil_h * (kh - 1) - 1) / g.stride_h + 1;
  const int64_t wo = (wp - g.dil_w * (kw - 1) - 1) / g.stride_w + 1;
  TORCH_CHECK(hp >= g.dil_h * (kh - 1) + 1 && wp >= g.dil_w * (kw - 1) + 1,
              "untangle_ext: the padded input (", hp, "x", wp, ") is smaller than the dilated kernel");
  std::vector<int64_t> zshape = linear ? std::vector<int64_t>{n, k} : std::vector<int64_t>{n, k, ho, wo};
  if (n == 0) return at::empty(zshape, x4.options());

  const auto& dev = kernels_for(x4);
  const auto wt = work_dtype(x4.scalar_type());
  const int64_t num_slots = mat.size(0), dk = g.groups * (3 * kg + 1), p = ho * wo;
  const SlotOrder so = slot_order(slots, num_slots);
  const int64_t m = so.seg[num_slots];

  at::Tensor xs = scratch("xs", x4, wt, {n, c, hp, wp});
  dev.gather_shift(x4, shift.to(wt).contiguous(), so.order, g.pad_h, g.pad_w, xs);
  at::Tensor w = weight.to(wt);
  at::Tensor y;
  if (linear) {
    y = scratch("y", x4, wt, {n, k});
    at::mm_out(y, xs.view({n, c}), w.t());
  } else {
    y = at::convolution(xs, w, c10::nullopt, {g.stride_h, g.stride_w}, {0, 0}, {g.dil_h, g.dil_w}, false, {0, 0},
                        g.groups)
            .contiguous();
  }
  at::Tensor z = at::empty(zshape, x4.options());
  at::Tensor design = scratch("design", x4, wt, {m, dk, ho, wo});
  dev.design(y.view({n, k, p}), out_offset.to(at::kDouble).contiguous(), so, g.groups, z.view({n, k, p}),
             design.view({m, dk, p}), vec);

  int64_t segments = 0;
  for (int64_t s = 0; s < num_slots; ++s) segments += so.seg[s + 1] > so.seg[s];
  const int64_t dg = weight.numel() / k;
  if (!linear && segments > 1 && m * dk * dg * static_cast<int64_t>(c10::elementSize(wt)) <= kPerRowBytes) {
    // Many small slot segments: ONE grouped weight-grad call with the rows folded into the
    // groups gives every row's own product; each slot then sums its rows in float64.
    at::Tensor wshape = scratch("wshape", x4, wt, {m * dk, weight.size(1), kh, kw});
    at::Tensor per_row = std::get<1>(at::convolution_backward(
        design.view({1, m * dk, ho, wo}), xs.narrow(0, 0, m).view({1, m * c, hp, wp}), wshape, c10::nullopt,
        {g.stride_h, g.stride_w}, {0, 0}, {g.dil_h, g.dil_w}, false, {0, 0}, g.groups * m, {false, true, false}));
    per_row = per_row.contiguous().view({m, dk * dg});
    for (int64_t s = 0; s < num_slots; ++s) {
      if (so.seg[s + 1] > so.seg[s]) dev.add_to_f64(mat.select(0, s), per_row.narrow(0, so.seg[s], so.seg[s + 1] - so.seg[s]));
    }
    return z;
  }
  for (int64_t s = 0; s < num_slots; ++s) {
    const int64_t m0 = so.seg[s], rows = so.seg[s + 1] - m0;
    if (rows == 0) continue;
    at::Tensor ds = design.narrow(0, m0, rows), xss = xs.narrow(0, m0, rows), prod;
    if (linear && rows <= kDirectRows) {  // few rows: a float64 rank-`rows` update in place, no temporary
      mat.select(0, s).view({dk, c}).addmm_(ds.view({rows, dk}).t().to(at::kDouble),
                                            xss.view({rows, c}).to(at::kDouble));
      continue;
    }
    if (linear) {
      prod = scratch("prod", x4, wt, {dk, c});
      at::mm_out(prod, ds.view({rows, dk}).t(), xss.view({rows, c}));
    } else {
      at::Tensor wshape = scratch("wshape", x4, wt, {dk, weight.size(1), kh, kw});
      prod = std::get<1>(at::convolution_backward(ds, xss, wshape, c10::nullopt, {g.stride_h, g.stride_w}, {0, 0},
                                                  {g.dil_h, g.dil_w}, false, {0, 0}, g.groups,
                                                  {false, true, false}))
                 .contiguous();
    }
    dev.add_to_f64(mat.select(0, s), prod);
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
  return accumulate(x.unsqueeze(2).unsqueeze(3), weight, shift_x, out_offset, slots, mat, vec,
                    Geometry{1, 1, 0, 0, 1, 1, 1}, /*linear=*/true);
}

at::Tensor accumulate_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift_c,
                             const at::Tensor& out_offset, const at::Tensor& slots, at::Tensor& mat,
                             at::Tensor& vec, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups) {
  const Geometry g = make_geometry(stride, padding, dilation, groups);
  TORCH_CHECK(x.dim() == 4, "untangle_ext.accumulate_conv2d: x must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) * groups == x.size(1),
              "untangle_ext.accumulate_conv2d: weight must be (K, C/groups, kh, kw) with C=", x.size(1),
              " and groups=", groups, ", got ", weight.sizes());
  check_inputs(x, weight, shift_c, out_offset, slots, mat, vec, x.size(1), groups);
  return accumulate(x, weight, shift_c, out_offset, slots, mat, vec, g, /*linear=*/false);
}

}  // namespace untangle
