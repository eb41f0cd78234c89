// CUDA fused loops of the accumulation ops, and the CUDA registration of all four ops.
// The big products run in cuBLAS/cuDNN through the device-generic drivers; these
// kernels do the shift+pad gather, the design pass and the float64 accumulation.
#include "../untangle.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <type_traits>

namespace untangle {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8); }

template <typename w_t>
using work_t = std::conditional_t<std::is_same_v<w_t, double>, double, float>;

// The (N, C, D, H, W) input's sizes and strides and the padding, passed by value.
struct GatherDims {
  int64_t n, c, d, h, w, sn, sc, sd, sh, sw, pd, ph, pw;
};

template <typename in_t, typename w_t>
__global__ void gather_shift_kernel(const in_t* __restrict__ x, const w_t* __restrict__ shift,
                                    const int64_t* __restrict__ order, GatherDims g, w_t* __restrict__ out) {
  const int64_t dp = g.d + 2 * g.pd, hp = g.h + 2 * g.ph, wp = g.w + 2 * g.pw, total = g.n * g.c * dp * hp * wp;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * blockDim.x) {
    int64_t rest = idx;
    const int64_t b = rest % wp - g.pw;
    rest /= wp;
    const int64_t a = rest % hp - g.ph;
    rest /= hp;
    const int64_t e = rest % dp - g.pd;
    rest /= dp;
    const int64_t ch = rest % g.c, i = rest / g.c;
    const bool inside = e >= 0 && e < g.d && a >= 0 && a < g.h && b >= 0 && b < g.w;
    const w_t v = inside ? static_cast<w_t>(x[order[i] * g.sn + ch * g.sc + e * g.sd + a * g.sh + b * g.sw]) : w_t(0);
    out[idx] = v - shift[ch];
  }
}

void gather_shift_cuda(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& order, Dims3 pad,
                       const at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t total = out.numel();
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const GatherDims dims{x.size(0),   x.size(1),   x.size(2),   x.size(3), x.size(4), x.stride(0), x.stride(1),
                        x.stride(2), x.stride(3), x.stride(4), pad[0],    pad[1],    pad[2]};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "untangle_gather_shift_cuda", [&] {
    using w_t = work_t<scalar_t>;
    gather_shift_kernel<scalar_t, w_t><<<blocks_for(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), shift.const_data_ptr<w_t>(), order.const_data_ptr<int64_t>(), dims,
        out.data_ptr<w_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// One thread per element of y: the output z (in caller row order) and the design rows.
template <typename w_t, typename out_t>
__global__ void design_kernel(const w_t* __restrict__ y, const double* __restrict__ off,
                              const int64_t* __restrict__ order, int64_t n, int64_t k, int64_t p, int64_t m,
                              int64_t kg, out_t* __restrict__ z, w_t* __restrict__ design) {
  const int64_t total = n * k * p, dk = (k / kg) * (3 * kg + 1);
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total; idx += (int64_t)gridDim.x * blockDim.x) {
    const int64_t q = idx % p, ch = (idx / p) % k, i = idx / (p * k);
    const w_t yv = y[idx], zv = yv + static_cast<w_t>(off[ch]);
    z[(order[i] * k + ch) * p + q] = static_cast<out_t>(zv);
    if (i >= m) continue;
    const w_t gate = zv > w_t(0) ? w_t(1) : w_t(0);
    const int64_t grp = ch / kg, kk = ch % kg;
    w_t* base = design + (i * dk + grp * (3 * kg + 1)) * p + q;
    base[kk * p] = yv;
    base[(kg + kk) * p] = gate;
    base[(2 * kg + kk) * p] = gate * yv;
    if (kk == 0) base[3 * kg * p] = w_t(1);
  }
}

// One block per (channel, slot): the three float64 sums of vec over the slot's rows, and n.
template <typename w_t>
__global__ void vec_sums_kernel(const w_t* __restrict__ y, const double* __restrict__ off,
                                const int64_t* __restrict__ seg, int64_t k, int64_t p, double* __restrict__ vec) {
  constexpr int kSums = 3;
  const int64_t ch = blockIdx.x, s = blockIdx.y, r0 = seg[s], rows = seg[s + 1] - r0;
  if (rows == 0) return;
  const w_t o = static_cast<w_t>(off[ch]);
  double acc[kSums] = {0, 0, 0};
  for (int64_t e = threadIdx.x; e < rows * p; e += blockDim.x) {
    const w_t yv = y[((r0 + e / p) * k + ch) * p + e % p];
    const double yd = yv, gd = (yv + o) > w_t(0) ? 1.0 : 0.0;
    acc[0] += yd;
    acc[1] += gd;
    acc[2] += gd * yd;
  }
  __shared__ double part[kSums][kThreads];
  for (int f = 0; f < kSums; ++f) part[f][threadIdx.x] = acc[f];
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) {
      for (int f = 0; f < kSums; ++f) part[f][threadIdx.x] += part[f][threadIdx.x + half];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double* v = vec + s * (kSums * k + 1);
    for (int f = 0; f < kSums; ++f) v[f * k + ch] += part[f][0];
    if (ch == 0) v[kSums * k] += static_cast<double>(rows * p);
  }
}

void design_cuda(const at::Tensor& y, const at::Tensor& off, const SlotOrder& so, int64_t groups, const at::Tensor& z,
                 const at::Tensor& design, const at::Tensor& vec) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t n = y.size(0), k = y.size(1), p = y.size(2), num_slots = static_cast<int64_t>(so.seg.size()) - 1;
  const int64_t m = so.seg[num_slots];
  if (n * k * p == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor seg_host = at::empty({num_slots + 1}, at::kLong);
  std::copy(so.seg.begin(), so.seg.end(), seg_host.data_ptr<int64_t>());
  const at::Tensor seg = seg_host.to(y.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "untangle_design_cuda", [&] {
    using w_t = work_t<scalar_t>;
    design_kernel<w_t, scalar_t><<<blocks_for(n * k * p), kThreads, 0, stream>>>(
        y.const_data_ptr<w_t>(), off.const_data_ptr<double>(), so.order.const_data_ptr<int64_t>(), n, k, p, m,
        k / groups, z.data_ptr<scalar_t>(), design.data_ptr<w_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (m > 0) {
      vec_sums_kernel<w_t><<<dim3(k, num_slots), kThreads, 0, stream>>>(
          y.const_data_ptr<w_t>(), off.const_data_ptr<double>(), seg.const_data_ptr<int64_t>(), k, p,
          vec.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

template <typename w_t>
__global__ void add_kernel(double* __restrict__ dst, const w_t* __restrict__ src, int64_t n, int64_t rows) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    double acc = dst[i];
    for (int64_t r = 0; r < rows; ++r) acc += static_cast<double>(src[r * n + i]);
    dst[i] = acc;
  }
}

void add_to_f64_cuda(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.is_contiguous() && src.is_contiguous() && dst.numel() > 0 && src.numel() % dst.numel() == 0,
              "untangle_ext: internal error, add_to_f64 needs contiguous tensors, src a multiple of dst");
  const c10::cuda::CUDAGuard guard(dst.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "untangle_add_to_f64_cuda", [&] {
    add_kernel<scalar_t><<<blocks_for(dst.numel()), kThreads, 0, stream>>>(
        dst.data_ptr<double>(), src.const_data_ptr<scalar_t>(), dst.numel(), src.numel() / dst.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const bool registered =
    (register_kernels(c10::DeviceType::CUDA, {gather_shift_cuda, design_cuda, add_to_f64_cuda}), true);

}  // namespace

TORCH_LIBRARY_IMPL(untangle_ext, CUDA, m) {
  m.impl("accumulate_linear", &accumulate_linear);
  m.impl("accumulate_conv", &accumulate_conv);
  m.impl("pattern_backward_linear", &pattern_backward_linear);
  m.impl("pattern_backward_conv", &pattern_backward_conv);
}

}  // namespace untangle
