// CPU fused loops of the accumulation ops, and the CPU registration of the ops.
#include "../untangle.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace untangle {
namespace {

// x is (N, C, D, H, W) with any strides; out gets the n rows order[0..n); one task per (row, channel) plane.
template <typename in_t, typename w_t>
void gather_shift_loop(const at::Tensor& x, const w_t* shift, const int64_t* order, int64_t n, Dims3 pad, w_t* out) {
  const int64_t c = x.size(1), d = x.size(2), h = x.size(3), w = x.size(4);
  const int64_t sn = x.stride(0), sc = x.stride(1), sd = x.stride(2), sh = x.stride(3), sw = x.stride(4);
  const int64_t dp = d + 2 * pad[0], hp = h + 2 * pad[1], wp = w + 2 * pad[2], plane = dp * hp * wp;
  const in_t* xp = x.const_data_ptr<in_t>();
  at::parallel_for(0, n * c, std::max<int64_t>(1, 32768 / plane), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r / c, ch = r % c;
      const in_t* src = xp + order[i] * sn + ch * sc;
      const w_t s = shift[ch];
      w_t* dst = out + r * plane;
      for (int64_t row = 0; row < dp * hp; ++row) {  // padded (depth, height) rows of length wp
        const int64_t dd = row / hp - pad[0], hh = row % hp - pad[1];
        w_t* dr = dst + row * wp;
        if (dd < 0 || dd >= d || hh < 0 || hh >= h) {
          for (int64_t b = 0; b < wp; ++b) dr[b] = -s;
          continue;
        }
        for (int64_t b = 0; b < pad[2]; ++b) dr[b] = -s;
        const in_t* sr = src + dd * sd + hh * sh;
        for (int64_t b = 0; b < w; ++b) dr[pad[2] + b] = static_cast<w_t>(sr[b * sw]) - s;
        for (int64_t b = pad[2] + w; b < wp; ++b) dr[b] = -s;
      }
    }
  });
}

void gather_shift_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& order, Dims3 pad,
                      const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "untangle_gather_shift", [&] {
    using w_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    gather_shift_loop<scalar_t, w_t>(x, shift.const_data_ptr<w_t>(), order.const_data_ptr<int64_t>(),
                                     order.numel(), pad, out.data_ptr<w_t>());
  });
}

// Parallel over output channels: each thread owns its channels' sums, so vec needs no atomics.
template <typename w_t, typename out_t>
void design_loop(const at::Tensor& y, const double* off, const SlotOrder& so, int64_t groups, out_t* z, w_t* design,
                 double* vec) {
  const int64_t n = y.size(0), k = y.size(1), p = y.size(2), kg = k / groups, dk = groups * (3 * kg + 1);
  const int64_t num_slots = static_cast<int64_t>(so.seg.size()) - 1, m = so.seg[num_slots], vs = 3 * k + 1;
  const w_t* yp = y.const_data_ptr<w_t>();
  const int64_t* order = so.order.const_data_ptr<int64_t>();
  at::parallel_for(0, k, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, n * p)), [&](int64_t k0, int64_t k1) {
    for (int64_t ch = k0; ch < k1; ++ch) {
      const w_t o = static_cast<w_t>(off[ch]);
      const int64_t grp = ch / kg, kk = ch % kg, col = grp * (3 * kg + 1);
      for (int64_t s = 0; s < num_slots; ++s) {
        double sy = 0, sg = 0, sgy = 0;
        for (int64_t i = so.seg[s]; i < so.seg[s + 1]; ++i) {
          const w_t* yr = yp + (i * k + ch) * p;
          out_t* zr = z + (order[i] * k + ch) * p;
          w_t* dy = design + (i * dk + col + kk) * p;
          w_t* dg = dy + kg * p;
          w_t* dgy = dg + kg * p;
#pragma omp simd reduction(+ : sy, sg, sgy)
          for (int64_t q = 0; q < p; ++q) {
            const w_t yv = yr[q], zv = yv + o, gate = zv > w_t(0) ? w_t(1) : w_t(0);
            zr[q] = static_cast<out_t>(zv);
            dy[q] = yv;
            dg[q] = gate;
            dgy[q] = gate * yv;
            const double yd = yv, gd = gate;
            sy += yd;
            sg += gd;
            sgy += gd * yd;
          }
          if (kk == 0) {
            w_t* ones = design + (i * dk + col + 3 * kg) * p;
            for (int64_t q = 0; q < p; ++q) ones[q] = w_t(1);
          }
        }
        if (so.seg[s + 1] == so.seg[s]) continue;
        double* v = vec + s * vs;
        v[ch] += sy;
        v[k + ch] += sg;
        v[2 * k + ch] += sgy;
        if (ch == 0) v[3 * k] += static_cast<double>((so.seg[s + 1] - so.seg[s]) * p);
      }
      for (int64_t i = m; i < n; ++i) {  // skipped rows: output only
        const w_t* yr = yp + (i * k + ch) * p;
        out_t* zr = z + (order[i] * k + ch) * p;
        for (int64_t q = 0; q < p; ++q) zr[q] = static_cast<out_t>(yr[q] + o);
      }
    }
  });
}

void design_cpu(const at::Tensor& y, const at::Tensor& off, const SlotOrder& so, int64_t groups, const at::Tensor& z,
                const at::Tensor& design, const at::Tensor& vec) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "untangle_design", [&] {
    using w_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    design_loop<w_t, scalar_t>(y, off.const_data_ptr<double>(), so, groups, z.data_ptr<scalar_t>(),
                               design.data_ptr<w_t>(), vec.data_ptr<double>());
  });
}

template <typename w_t>
void add_loop(double* dst, const w_t* src, int64_t numel, int64_t rows) {
  at::parallel_for(0, numel, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < rows; ++r) {
      const w_t* sr = src + r * numel;
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) dst[i] += static_cast<double>(sr[i]);
    }
  });
}

void add_to_f64_cpu(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous() && dst.numel() > 0 && src.numel() % dst.numel() == 0,
              "untangle_ext: internal error, add_to_f64 needs contiguous tensors, src a multiple of dst");
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "untangle_add_to_f64", [&] {
    add_loop<scalar_t>(dst.data_ptr<double>(), src.const_data_ptr<scalar_t>(), dst.numel(),
                       src.numel() / dst.numel());
  });
}

const bool registered = (register_kernels(c10::DeviceType::CPU, {gather_shift_cpu, design_cpu, add_to_f64_cpu}), true);

}  // namespace

TORCH_LIBRARY_IMPL(untangle_ext, CPU, m) {
  m.impl("accumulate_linear", &accumulate_linear);
  m.impl("accumulate_conv", &accumulate_conv);
}

}  // namespace untangle
