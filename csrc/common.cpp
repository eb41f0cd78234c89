// Helpers shared by the device-generic drivers: slot grouping, scratch buffers, kernel registry.
#include "untangle.h"

#include <ATen/ops/argsort.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

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
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  at::Tensor& buf = cache[Key(role, like.device().type(), like.device().index(), dtype)];
  if (!buf.defined() || buf.numel() < numel) {
    buf = at::Tensor();  // release the old block before allocating the larger one
    buf = at::empty({numel}, like.options().dtype(dtype));
  }
  return buf.narrow(0, 0, numel).view(shape);
}

at::ScalarType work_dtype(at::ScalarType input) {
  return (input == at::kHalf || input == at::kBFloat16) ? at::kFloat : input;
}

}  // namespace untangle
