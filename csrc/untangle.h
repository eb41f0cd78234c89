// Shared declarations of the untangle_ext native ops.
//
// The op drivers (accumulate.cpp, pattern_backward.cpp) are device-generic: they
// call ATen for the big products (oneDNN/MKL on CPU, cuDNN/cuBLAS on CUDA) and the
// per-device fused loops below (cpu/kernels.cpp, cuda/kernels.cu) for everything
// else, so the CPU and CUDA semantics cannot drift apart.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace untangle {

// Rows grouped by class slot: order[i] is the original row at sorted position i;
// rows of slot s occupy [seg[s], seg[s+1]); rows with a slot outside [0, S)
// come last, from seg[S] (the number of accumulated rows) to N.
struct SlotOrder {
  at::Tensor order;          // (N,) int64, on the slots' device
  std::vector<int64_t> seg;  // S + 1 offsets, on the host
};

SlotOrder slot_order(const at::Tensor& slots, int64_t num_slots);

// The fused loops every device provides (shapes in the comments of accumulate.cpp).
struct DeviceKernels {
  // out[i] = zero_pad(x[order[i]]) - shift (per channel), in out's dtype.
  void (*gather_shift)(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& order,
                       int64_t pad_h, int64_t pad_w, const at::Tensor& out);
  // z[order[i]] = y[i] + off; design rows [y | gate | gate*y | 1] per group and the
  // per-slot sums of vec for the accumulated rows, in one pass over y.
  void (*design)(const at::Tensor& y, const at::Tensor& off, const SlotOrder& so, int64_t groups,
                 const at::Tensor& z, const at::Tensor& design, const at::Tensor& vec);
  // dst (float64) += the sum of src's rows (src holds rows * dst.numel() values), elementwise
  // in float64, without a float64 temporary.
  void (*add_to_f64)(const at::Tensor& dst, const at::Tensor& src);
};

void register_kernels(c10::DeviceType device, DeviceKernels kernels);
const DeviceKernels& kernels_for(const at::Tensor& t);

// A reused scratch tensor for `role` on t's device and `dtype`, viewed as `shape`.
// Grows on demand and is never shrunk, so steady-state batches allocate nothing.
at::Tensor scratch(const char* role, const at::Tensor& like, at::ScalarType dtype, at::IntArrayRef shape);

// Products are formed in float32 for half/bfloat16 inputs, else in the input dtype.
at::ScalarType work_dtype(at::ScalarType input);

// The ops (schemas in ops.cpp).
at::Tensor accumulate_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift_x,
                             const at::Tensor& out_offset, const at::Tensor& slots, at::Tensor& mat,
                             at::Tensor& vec);
at::Tensor accumulate_conv2d(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& shift_c,
                             const at::Tensor& out_offset, const at::Tensor& slots, at::Tensor& mat,
                             at::Tensor& vec, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation, int64_t groups);
at::Tensor pattern_backward_linear(const at::Tensor& grad_out, const at::Tensor& patterns,
                                   const at::Tensor& slots);
at::Tensor pattern_backward_conv2d(const at::Tensor& grad_out, const at::Tensor& patterns,
                                   const at::Tensor& slots, at::IntArrayRef input_hw, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

}  // namespace untangle
