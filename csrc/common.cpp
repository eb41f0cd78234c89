// Helpers of the device-generic driver: slot grouping, scratch buffers, kernel registry, build info.
#include "untangle.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <optional>
#include <string>
#include <tuple>

namespace untangle {

namespace {

SlotOrder sort_slots(const at::Tensor& slots, int64_t num_slots) {
  SlotOrder so;
  const at::Tensor key = slots.masked_fill(slots.lt(0).logical_or(slots.ge(num_slots)), num_slots);
  at::Tensor sorted;
  std::tie(sorted, so.order) = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  // seg[s] = the number of keys below s: a search, no atomics and no host-side bincount.
  so.seg_dev = at::searchsorted(sorted, at::arange(num_slots + 1, key.options()));
  const at::Tensor host = so.seg_dev.to(at::kCPU);  // CUDA: the one host sync (cached per slots tensor)
  so.seg.assign(host.const_data_ptr<int64_t>(), host.const_data_ptr<int64_t>() + num_slots + 1);
  return so;
}

}  // namespace

SlotOrder slot_order(const at::Tensor& slots, int64_t num_slots) {
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Cached {
    std::optional<WeakImpl> slots;  // weak: the cache keeps no batch alive
    uint32_t version = 0;
    int64_t num_slots = -1;
    SlotOrder so;
  };
  if (slots.is_inference()) return sort_slots(slots, num_slots);  // no version counter to key a cache on
  thread_local Cached cached;
  const bool hit = cached.slots && cached.num_slots == num_slots && cached.version == slots._version() &&
                   cached.slots->lock().get() == slots.unsafeGetTensorImpl();
  if (!hit) {
    cached.so = sort_slots(slots, num_slots);
    cached.slots.emplace(slots.getIntrusivePtr());
    cached.version = slots._version();
    cached.num_slots = num_slots;
  }
  return cached.so;
}

SlotOrder SlotOrder::rows(int64_t r0, int64_t len) const {
  SlotOrder out;
  out.order = order.narrow(0, r0, len);
  out.seg.resize(seg.size());
  for (size_t s = 0; s < seg.size(); ++s) out.seg[s] = std::clamp<int64_t>(seg[s] - r0, 0, len);
  if (seg_dev.defined()) out.seg_dev = (r0 == 0 && len >= seg.back()) ? seg_dev : seg_dev.sub(r0).clamp(0, len);
  return out;
}

namespace {
std::map<c10::DeviceType, DeviceKernels>& registry() {
  static std::map<c10::DeviceType, DeviceKernels> r;
  return r;
}
}  // namespace

void register_kernels(c10::DeviceType device, DeviceKernels kernels) { registry()[device] = kernels; }

namespace {
std::string& cuda_build() {
  static std::string info = "cuda=;archs=;ptx=0";  // replaced by cuda/kernels.cu when it is built
  return info;
}
}  // namespace

void register_cuda_build(std::string info) { cuda_build() = std::move(info); }

std::string build_info() { return std::string("torch=") + TORCH_VERSION + ";" + cuda_build(); }

const DeviceKernels& kernels_for(const at::Tensor& t) {
  auto it = registry().find(t.device().type());
  TORCH_CHECK(it != registry().end(), "untangle_ext: no native kernels for device ", t.device(),
              "; use the PyTorch backend (UNTANGLE_EXT_BACKEND=torch)");
  return it->second;
}

at::Tensor scratch(const char* role, const at::Tensor& like, at::ScalarType dtype, at::IntArrayRef shape) {
  if (!like.is_cpu()) return at::empty(shape, like.options().dtype(dtype));
  using Key = std::tuple<std::string, at::ScalarType>;
  thread_local std::map<Key, at::Tensor> cache;
  const int64_t numel = numel_of(shape);
  at::Tensor& buf = cache[Key(role, dtype)];
  if (!buf.defined() || buf.numel() < numel) {
    buf = at::Tensor();  // release the old block before allocating the larger one
    buf = at::empty({numel}, like.options().dtype(dtype));
  }
  return buf.narrow(0, 0, numel).view(shape);
}

int64_t scratch_limit(const at::Device& device) {
  const char* env = std::getenv("UNTANGLE_EXT_SCRATCH_MB");
  const int64_t mb = env && *env ? std::atoll(env) : (device.is_cpu() ? 128 : 512);
  TORCH_CHECK(mb > 0, "untangle_ext: UNTANGLE_EXT_SCRATCH_MB must be a positive number of MiB, got '", env, "'");
  return mb << 20;
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
