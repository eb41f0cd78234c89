// CUDA fused loops of the accumulation ops, and the CUDA registration of the ops.
// The big products run in cuBLAS/cuDNN through the device-generic driver; these
// kernels do the shift+pad gather, the design pass and the float64 accumulation.
// Nothing here synchronises with the host: slot offsets are read from device memory
// (SlotOrder::seg_dev); every grid dimension stays within CUDA's limits (grid-stride loops).
// NEVER RUN ON A GPU so far: compiled and reviewed only (see README, "GPU").
#include "../untangle.h"

#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#ifndef UNTANGLE_EXT_PTX_ARCH  // set by setup.py / the JIT build: the newest arch embedded as PTX
#define UNTANGLE_EXT_PTX_ARCH 0
#endif

namespace untangle {
namespace {

constexpr int kThreads = 256;

constexpr int64_t kMaxGridY = 65535;  // gridDim.y and gridDim.z limit

int64_t blocks_for(int64_t n) { return std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxGridY * 8); }

// The architectures this translation unit was compiled for (nvcc's list, e.g. 800,900) and its PTX.
constexpr int kArchs[] = {
#ifdef __CUDA_ARCH_LIST__
    __CUDA_ARCH_LIST__
#else
    0
#endif
};

std::string describe_build() {
  std::string archs;
  for (int a : kArchs) {
    if (a > 0) archs += (archs.empty() ? "" : ",") + std::to_string(a / 10);
  }
  return "cuda=" + std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10) +
         ";archs=" + archs + ";ptx=" + std::to_string(UNTANGLE_EXT_PTX_ARCH);
}

__global__ void probe_kernel() {}

// Once per device: this build must hold code the device runs (machine code of its architecture
// family, or PTX the driver can compile). Without this check a mismatch surfaces as "no kernel
// image is available" from the first launch, without saying how to fix it.
void check_kernel_image(const at::Tensor& t) {
  static std::mutex mutex;
  static std::vector<bool> checked;
  const int device = t.get_device();
  const std::lock_guard<std::mutex> lock(mutex);
  if (device < static_cast<int>(checked.size()) && checked[device]) return;
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, probe_kernel);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear it, so that the next CUDA call does not report it again
    int major = 0, minor = 0;
    (void)cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    (void)cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    TORCH_CHECK(false, "untangle_ext: the native CUDA kernels cannot run on ", t.device(), " (compute capability ",
                major, ".", minor, "): ", cudaGetErrorString(err), "; this build has ", describe_build(),
                ". Rebuild it for this GPU: TORCH_CUDA_ARCH_LIST=\"", major, ".", minor,
                "\" pip install --no-build-isolation -e . (or set UNTANGLE_EXT_BACKEND=torch)");
  }
  if (device >= static_cast<int>(checked.size())) checked.resize(device + 1, false);
  checked[device] = true;
}

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
  check_kernel_image(x);
  const int64_t total = out.numel();
  if (total == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const GatherDims dims{order.numel(), x.size(1),   x.size(2),   x.size(3), x.size(4), x.stride(0), x.stride(1),
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

// One block per (channel, slot), slots in a grid-stride loop over gridDim.y: the three float64
// sums of vec over the slot's rows (offsets read from device memory), and n.
template <typename w_t>
__global__ void vec_sums_kernel(const w_t* __restrict__ y, const double* __restrict__ off,
                                const int64_t* __restrict__ seg, int64_t k, int64_t p, int64_t num_slots,
                                double* __restrict__ vec) {
  constexpr int kSums = 3;
  __shared__ double part[kSums][kThreads];
  const int64_t ch = blockIdx.x;
  const w_t o = static_cast<w_t>(off[ch]);
  for (int64_t s = blockIdx.y; s < num_slots; s += gridDim.y) {
    const int64_t r0 = seg[s], rows = seg[s + 1] - r0;
    if (rows == 0) continue;  // the same s for the whole block: the barriers below stay uniform
    double acc[kSums] = {0, 0, 0};
    for (int64_t e = threadIdx.x; e < rows * p; e += blockDim.x) {
      const w_t yv = y[((r0 + e / p) * k + ch) * p + e % p];
      const double yd = yv, gd = (yv + o) > w_t(0) ? 1.0 : 0.0;
      acc[0] += yd;
      acc[1] += gd;
      acc[2] += gd * yd;
    }
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
    __syncthreads();  // part is reused by the next slot
  }
}

void design_cuda(const at::Tensor& y, const at::Tensor& off, const SlotOrder& so, int64_t groups, const at::Tensor& z,
                 const at::Tensor& design, const at::Tensor& vec) {
  const c10::cuda::CUDAGuard guard(y.device());
  check_kernel_image(y);
  const int64_t n = y.size(0), k = y.size(1), p = y.size(2), num_slots = static_cast<int64_t>(so.seg.size()) - 1;
  const int64_t m = so.seg[num_slots];
  if (n * k * p == 0) return;
  TORCH_CHECK(k <= std::numeric_limits<int32_t>::max(), "untangle_ext: ", k, " outputs exceed the CUDA grid");
  TORCH_CHECK(so.seg_dev.defined() && so.seg_dev.device() == y.device(),
              "untangle_ext: internal error, the slot offsets are not on ", y.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "untangle_design_cuda", [&] {
    using w_t = work_t<scalar_t>;
    design_kernel<w_t, scalar_t><<<blocks_for(n * k * p), kThreads, 0, stream>>>(
        y.const_data_ptr<w_t>(), off.const_data_ptr<double>(), so.order.const_data_ptr<int64_t>(), n, k, p, m,
        k / groups, z.data_ptr<scalar_t>(), design.data_ptr<w_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (m > 0) {
      const dim3 grid(static_cast<unsigned>(k), static_cast<unsigned>(std::min(num_slots, kMaxGridY)));
      vec_sums_kernel<w_t><<<grid, kThreads, 0, stream>>>(y.const_data_ptr<w_t>(), off.const_data_ptr<double>(),
                                                          so.seg_dev.const_data_ptr<int64_t>(), k, p, num_slots,
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
  check_kernel_image(dst);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "untangle_add_to_f64_cuda", [&] {
    add_kernel<scalar_t><<<blocks_for(dst.numel()), kThreads, 0, stream>>>(
        dst.data_ptr<double>(), src.const_data_ptr<scalar_t>(), dst.numel(), src.numel() / dst.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const bool registered = (register_kernels(c10::DeviceType::CUDA, {gather_shift_cuda, design_cuda, add_to_f64_cuda}),
                         register_cuda_build(describe_build()), true);

}  // namespace

TORCH_LIBRARY_IMPL(untangle_ext, CUDA, m) {
  m.impl("accumulate_linear", &accumulate_linear);
  m.impl("accumulate_conv", &accumulate_conv);
}

}  // namespace untangle
