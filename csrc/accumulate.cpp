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
// xs, y (linear) and design are scratch (untangle.h: reused on CPU, PyTorch's caching allocator
// elsewhere); a batch whose scratch would exceed the scratch limit runs in chunks of sorted rows.
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
// positions) per weight-grad call (float64 work: one call), each chunk then added to the float64
// accumulator: the float32 rounding grows with the summation length (LeNet's second conv at batch 256,
// 16,384 positions per call: a_lin 8.4e-6 from float64; 512: 3.5e-7). Mirrored by
// untangle_ext._reference.CHUNK_SAMPLES. Linear products go straight into the float64 accumulator
// (dgemm with beta=1): exact, and at most ~1.5x an fp32 product plus a pass over the accumulator.
constexpr int64_t kChunkSamples = 512;
// Conv layers with several slots in a batch use one per-row product call while the per-row
// products fit in this many bytes (small layers, where per-call overhead dominates).
constexpr int64_t kPerRowBytes = 32 << 20;
// Float64 work on the CPU (small layers' exact products, compute_dtype=float64) runs ATen's
// im2col convolutions, whose buffers are allocated per call and grow with the window: a window
// of this many scratch bytes keeps them in cache (LeNet's first conv, batch 256, one thread:
// 33 ms per batch, as fast as its float32 products; 58-93 ms with a 512 MiB scratch window).
constexpr int64_t kCpuDoubleWindowBytes = 4 << 20;

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

// One op call's layer and accumulators; add() takes the batch in chunks of sorted rows.
struct Layer {
  const at::Tensor& x;  // (N, C, *sp) for a conv with geometry g, or (N, D) for Linear (g.nd() == 0)
  const ConvGeometry& g;
  at::Tensor& mat;
  at::Tensor& vec;
  at::Tensor w, shift, off, z;  // weight (K, D) or (K, C/groups, *kernel) and shift in the work dtype; output
  at::ScalarType wt;
  const DeviceKernels& dev;
  std::vector<int64_t> kernel, padded, out;
  int64_t c, k, kg, dk, dg, p;

  Layer(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& shift_, const at::Tensor& out_offset,
        at::Tensor& mat_, at::Tensor& vec_, const ConvGeometry& g_)
      : x(x_), g(g_), mat(mat_), vec(vec_), wt(work_dtype(x_.scalar_type())), dev(kernels_for(x_)) {
    kernel = weight.sizes().slice(2).vec();
    padded = g.padded_size(x.sizes().slice(2));
    out = g.output_size(x.sizes().slice(2), kernel);
    c = x.size(1), k = weight.size(0), kg = k / g.groups, dk = g.groups * (3 * kg + 1);
    dg = weight.numel() / k, p = numel_of(out);
    w = weight.to(wt), shift = shift_.to(wt).contiguous(), off = out_offset.to(at::kDouble).contiguous();
    z = at::empty(shape_of({x.size(0), k}, out), x.options());
  }

  // Rows of one chunk need their padded input, output and design rows: at most the scratch limit together.
  int64_t rows_per_chunk() const {
    const int64_t row_bytes = static_cast<int64_t>(c10::elementSize(wt)) * (c * numel_of(padded) + (k + dk) * p);
    const int64_t scratch = scratch_limit(x.device());
    const int64_t limit = wt == at::kDouble && x.is_cpu() ? std::min(scratch, kCpuDoubleWindowBytes) : scratch;
    return std::max<int64_t>(1, limit / std::max<int64_t>(1, row_bytes));
  }

  // Accumulate the rows of `so` (a window of the batch's sorted rows) and write their outputs into z.
  void add(const SlotOrder& so) {
    const bool linear = g.nd() == 0;
    const int64_t n = so.order.size(0), num_slots = mat.size(0), m = so.seg[num_slots];
    at::Tensor xs = scratch("xs", x, wt, shape_of({n, c}, padded));
    dev.gather_shift(as_5d(x), shift, so.order, g.pad_3d(), xs);
    at::Tensor y;
    if (linear) {
      y = scratch("y", x, wt, {n, k});
      at::mm_out(y, xs, w.t());
    } else {
      y = at::convolution(xs, w, c10::nullopt, g.stride, g.zeros, g.dilation, false, g.zeros, g.groups).contiguous();
    }
    at::Tensor design = scratch("design", x, wt, shape_of({m, dk}, out));
    dev.design(y.view({n, k, p}), off, so, g.groups, z.view({z.size(0), k, p}), design.view({m, dk, p}), vec);
    int64_t segments = 0;
    for (int64_t s = 0; s < num_slots; ++s) segments += so.seg[s + 1] > so.seg[s];
    if (!linear && segments > 1 && m * dk * dg * static_cast<int64_t>(c10::elementSize(wt)) <= kPerRowBytes) {
      per_row_products(so, xs, design);
      return;
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
      at::Tensor wshape = scratch("wshape", x, wt, shape_of({dk, w.size(1)}, kernel));
      for (int64_t r0 = m0; r0 < m0 + rows; r0 += chunk) {
        const int64_t r = std::min(chunk, m0 + rows - r0);
        dev.add_to_f64(mat.select(0, s),
                       std::get<1>(at::convolution_backward(design.narrow(0, r0, r), xs.narrow(0, r0, r), wshape,
                                                            c10::nullopt, g.stride, g.zeros, g.dilation, false,
                                                            g.zeros, g.groups, {false, true, false}))
                           .contiguous());
      }
    }
  }

  // Many small slot segments: ONE grouped weight-grad call with the rows folded into the
  // groups gives every row's own product; each slot then sums its rows in float64.
  void per_row_products(const SlotOrder& so, const at::Tensor& xs, const at::Tensor& design) {
    const int64_t m = so.seg[mat.size(0)];
    at::Tensor wshape = scratch("wshape", x, wt, shape_of({m * dk, w.size(1)}, kernel));
    at::Tensor per_row = std::get<1>(at::convolution_backward(
        design.view(shape_of({1, m * dk}, out)), xs.narrow(0, 0, m).view(shape_of({1, m * c}, padded)), wshape,
        c10::nullopt, g.stride, g.zeros, g.dilation, false, g.zeros, g.groups * m, {false, true, false}));
    per_row = per_row.contiguous().view({m, dk * dg});
    for (int64_t s = 0; s < mat.size(0); ++s) {
      if (so.seg[s + 1] > so.seg[s]) {
        dev.add_to_f64(mat.select(0, s), per_row.narrow(0, so.seg[s], so.seg[s + 1] - so.seg[s]));
      }
    }
  }
};

at::Tensor accumulate(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift,
                      const at::Tensor& out_offset, const at::Tensor& slots, at::Tensor& mat, at::Tensor& vec,
                      const ConvGeometry& g) {
  Layer layer(x, weight, shift, out_offset, mat, vec, g);
  const int64_t n = x.size(0);
  if (n == 0) return layer.z;
  const SlotOrder so = slot_order(slots, mat.size(0));
  const int64_t chunk = layer.rows_per_chunk();
  for (int64_t r0 = 0; r0 < n; r0 += chunk) layer.add(so.rows(r0, std::min(chunk, n - r0)));
  return layer.z;
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
