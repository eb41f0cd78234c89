// Helpers shared by the device-generic drivers: slot grouping, scratch buffers, kernel registry.
#include "untangle.h"

#include <ATen/ops/argsort.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <map>
#include <string>
#include <tuple>

namespace untangle {

SlotOrder slot_order(const at::Tensor& slots, int64_t num_slots) {
  const int64_t n = slots.numel();
  SlotOrder so;
  so.seg.assign(num_slots + 1, 0);
  if (slots.is_cpu()) {  // counting sort: two passes over n integers
    at::Tensor s = slots.contiguous();
    const int64_t* sp = s.data_ptr<int64_t>();
    std::vector<int64_t> start(num_slots + 2, 0);
    auto key = [&](int64_t i) { return (sp[i] >= 0 && sp[i] < num_slots) ? sp[i] : num_slots; };
    for (int64_t i = 0; i < n; ++i) ++start[key(i) + 1];
    for (int64_t k = 0; k <= num_slots; ++k) start[k + 1] += start[k];
    for (int64_t k = 0; k <= num_slots; ++k) so.seg[k] = start[k];
    so.order = at::empty({n}, slots.options());
    int64_t* op = so.order.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) op[start[key(i)]++] = i;
    return so;
  }
  at::Tensor key = slots.masked_fill(slots.lt(0).logical_or(slots.ge(num_slots)), num_slots);
  so.order = at::argsort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  at::Tensor counts = at::bincount(key, {}, num_slots + 1).cpu();  // the one host sync
  const int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t k = 0; k < num_slots; ++k) so.seg[k + 1] = so.seg[k] + cp[k];
  return so;
}

namespace {
std::map<c10::DeviceType, DeviceKernels>& registry() {
  static std::map<c10::DeviceType, DeviceKernels> r;
  return r;
}
}  // namespace

void register_kernels(c10::DeviceType device, DeviceKernels kernels) { registry()[device] = kernels; }

const DeviceKernels& kernels_for(const at::Tensor& t) {
  auto it = registry().find(t.device().type());
  TORCH_CHECK(it != registry().end(), "untangle_ext: no native kernels for device ", t.device(),
              "; use the PyTorch backend (UNTANGLE_EXT_BACKEND=torch)");
  return it->second;
}

at::Tensor scratch(const char* role, const at::Tensor& like, at::ScalarType dtype, at::IntArrayRef shape) {
  using Key = std::tuple<std::string, c10::DeviceType, c10::DeviceIndex, at::ScalarType>;
  thread_local std::map<Key, at::Tensor> cache;
  const int64_t numel = numel_of(shape);
  at::Tensor& buf = cache[Key(role, like.device().type(), like.device().index(), dtype)];
  if (!buf.defined() || buf.numel() < numel) {
    buf = at::Tensor();  // release the old block before allocating the larger one
    buf = at::empty({numel}, like.options().dtype(dtype));
  }
  return buf.narrow(0, 0, numel).view(shape);
}

ConvGeometry::ConvGeometry(const char* op, at::IntArrayRef stride_, at::IntArrayRef padding_,
                           at::IntArrayRef dilation_, int64_t groups_)
    : stride(stride_.vec()), padding(padding_.vec()), dilation(dilation_.vec()), zeros(stride_.size(), 0),
      groups(groups_) {
  const size_t nd = stride.size();
  TORCH_CHECK(nd >= 1 && nd <= 3, "untangle_ext.", op, ": stride must have 1, 2 or 3 entries (one per spatial dim), got ",
              stride_);
  TORCH_CHECK(padding.size() == nd && dilation.size() == nd, "untangle_ext.", op, ": stride ", stride_, ", padding ",
              padding_, " and dilation ", dilation_, " must have one entry per spatial dim each");
  for (size_t i = 0; i < nd; ++i) {
    TORCH_CHECK(stride[i] > 0, "untangle_ext.", op, ": stride must be positive, got ", stride_);
    TORCH_CHECK(padding[i] >= 0, "untangle_ext.", op, ": padding must be non-negative, got ", padding_);
    TORCH_CHECK(dilation[i] > 0, "untangle_ext.", op, ": dilation must be positive, got ", dilation_);
  }
  TORCH_CHECK(groups > 0, "untangle_ext.", op, ": groups must be positive, got ", groups);
}

std::vector<int64_t> ConvGeometry::padded_size(at::IntArrayRef input) const {
  std::vector<int64_t> out(input.begin(), input.end());
  for (size_t i = 0; i < out.size(); ++i) out[i] += 2 * padding[i];
  return out;
}

std::vector<int64_t> ConvGeometry::output_size(at::IntArrayRef input, at::IntArrayRef kernel) const {
  std::vector<int64_t> out = padded_size(input);
  for (size_t i = 0; i < out.size(); ++i) out[i] = (out[i] - dilation[i] * (kernel[i] - 1) - 1) / stride[i] + 1;
  return out;
}

void ConvGeometry::check_fits(const char* op, at::IntArrayRef input, at::IntArrayRef kernel) const {
  const std::vector<int64_t> padded = padded_size(input);
  for (size_t i = 0; i < padded.size(); ++i) {
    TORCH_CHECK(padded[i] >= dilation[i] * (kernel[i] - 1) + 1, "untangle_ext.", op, ": the padded input ", padded,
                " is smaller than the dilated kernel (kernel ", kernel, ", dilation ", dilation, ")");
  }
}

Dims3 ConvGeometry::pad_3d() const {
  Dims3 pad{0, 0, 0};
  std::copy(padding.begin(), padding.end(), pad.end() - padding.size());
  return pad;
}

std::vector<int64_t> shape_of(std::initializer_list<int64_t> lead, at::IntArrayRef rest) {
  std::vector<int64_t> shape(lead);
  shape.insert(shape.end(), rest.begin(), rest.end());
  return shape;
}

int64_t numel_of(at::IntArrayRef sizes) {
  int64_t n = 1;
  for (int64_t d : sizes) n *= d;
  return n;
}

at::Tensor as_5d(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2 && x.dim() <= 5, "untangle_ext: internal error, as_5d needs 2 to 5 dims, got ", x.sizes());
  at::Tensor out = x;
  while (out.dim() < 5) out = out.unsqueeze(2);
  return out;
}

at::ScalarType work_dtype(at::ScalarType input) {
  return (input == at::kHalf || input == at::kBFloat16) ? at::kFloat : input;
}

}  // namespace untangle
