// Shared declarations of the untangle_ext native ops.
//
// The op driver (accumulate.cpp) is device-generic: they
// call ATen for the big products (oneDNN/MKL on CPU, cuDNN/cuBLAS on CUDA) and the
// per-device fused loops below (cpu/kernels.cpp, cuda/kernels.cu) for everything
// else, so the CPU and CUDA semantics cannot drift apart.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <initializer_list>
#include <cstdint>
#include <string>
#include <vector>

namespace untangle {

// Rows grouped by class slot: order[i] is the original row at sorted position i;
// rows of slot s occupy [seg[s], seg[s+1]); rows with a slot outside [0, S)
// come last, from seg[S] (the number of accumulated rows) to N.
struct SlotOrder {
  at::Tensor order;          // (N,) int64, on the slots' device
  std::vector<int64_t> seg;  // S + 1 offsets, on the host
  at::Tensor seg_dev;        // the same S + 1 offsets on the slots' device (what CUDA kernels read)

  // Sorted positions [r0, r0 + len) alone: order narrowed, offsets clamped to the window.
  SlotOrder rows(int64_t r0, int64_t len) const;
};

// A stable sort on the slots' device; reading the offsets on the host is the one host sync on
// CUDA. Cached for the last `slots` tensor seen (the same tensor with an unchanged version
// counter), so every layer of a batch after the first reuses it: one sync per batch, not per layer.
SlotOrder slot_order(const at::Tensor& slots, int64_t num_slots);

// Spatial sizes of every kernel are (D, H, W): 1-d and 2-d layouts get leading 1s.
using Dims3 = std::array<int64_t, 3>;

// Stride, padding and dilation of a ConvNd (nd = 1, 2 or 3 entries each), or of a Linear layer (nd = 0).
struct ConvGeometry {
  std::vector<int64_t> stride, padding, dilation, zeros;
  int64_t groups = 1;

  // Validated: TORCH_CHECK errors name `op` and the offending argument.
  ConvGeometry(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
               int64_t groups);
  static ConvGeometry linear() { return ConvGeometry(); }
  int64_t nd() const { return static_cast<int64_t>(stride.size()); }
  std::vector<int64_t> padded_size(at::IntArrayRef input) const;
  std::vector<int64_t> output_size(at::IntArrayRef input, at::IntArrayRef kernel) const;
  // The padded input must hold the dilated kernel in every spatial dim.
  void check_fits(const char* op, at::IntArrayRef input, at::IntArrayRef kernel) const;
  // The padding right-aligned in (D, H, W), zeros in front.
  Dims3 pad_3d() const;

 private:
  ConvGeometry() = default;
};

// {lead..., rest...}: a shape with spatial dims appended.
std::vector<int64_t> shape_of(std::initializer_list<int64_t> lead, at::IntArrayRef rest);
int64_t numel_of(at::IntArrayRef sizes);
// (N, C, *sp) with 0 to 3 spatial dims viewed as (N, C, D, H, W) with leading 1s (any strides).
at::Tensor as_5d(const at::Tensor& x);

// The fused loops every device provides (shapes in the comments of accumulate.cpp).
struct DeviceKernels {
  // out[i] = zero_pad(x[order[i]]) - shift (per channel), in out's dtype; x is (N, C, D, H, W)
  // with any strides, out (n, C, D + 2 pad[0], H + 2 pad[1], W + 2 pad[2]) contiguous, n = order.numel().
  void (*gather_shift)(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& order, Dims3 pad,
                       const at::Tensor& out);
  // z[order[i]] = y[i] + off for the n rows of y (a window of the batch: z holds all N);
  // design rows [y | gate | gate*y | 1] per group and the per-slot sums of vec
  // [sum y | sum gate | sum gate*y | n] (3K + 1) for the accumulated rows, in one pass over y.
  void (*design)(const at::Tensor& y, const at::Tensor& off, const SlotOrder& so, int64_t groups,
                 const at::Tensor& z, const at::Tensor& design, const at::Tensor& vec);
  // dst (float64) += the sum of src's rows (src holds rows * dst.numel() values), elementwise
  // in float64, without a float64 temporary.
  void (*add_to_f64)(const at::Tensor& dst, const at::Tensor& src);
};

void register_kernels(c10::DeviceType device, DeviceKernels kernels);
const DeviceKernels& kernels_for(const at::Tensor& t);

// A scratch tensor of `dtype` and `shape` on like's device. CPU: reused per `role` and thread (grows
// on demand, so steady-state batches allocate nothing; bounded by the driver's row chunks).
// Other devices: a fresh at::empty from PyTorch's caching allocator on the current stream, so
// it is stream-safe, reused by the allocator and released by torch.cuda.empty_cache().
at::Tensor scratch(const char* role, const at::Tensor& like, at::ScalarType dtype, at::IntArrayRef shape);

// Scratch buffers of one op call stay below this many bytes (the environment's UNTANGLE_EXT_SCRATCH_MB;
// default 128 MiB on the CPU, where they stay cached per thread: VGG-16 at batch 8 holds 0.38 GB less than
// with 512 MiB and is not slower; 512 MiB elsewhere): larger batches run in chunks of rows.
int64_t scratch_limit(const at::Device& device);

// What this build is, for untangle_ext/_native_build.py: "torch=X.Y.Z;cuda=...;archs=80,90;ptx=90".
std::string build_info();
// Called by the CUDA kernels' registration with their "cuda=...;archs=...;ptx=..." part.
void register_cuda_build(std::string info);

// Products are formed in float32 for half/bfloat16 inputs, else in the input dtype.
at::ScalarType work_dtype(at::ScalarType input);

// The ops (schemas in ops.cpp).
at::Tensor accumulate_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift_x,
                             const at::Tensor& out_offset, const at::Tensor& slots, at::Tensor& mat,
                             at::Tensor& vec);
at::Tensor accumulate_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift_c,
                           const at::Tensor& out_offset, const at::Tensor& slots, at::Tensor& mat, at::Tensor& vec,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           int64_t groups);

}  // namespace untangle
