// CPU loop of the pattern op (semantics: untangle_ext/_reference.py::layer_patterns) and its registration.
//
// One task per block of neurons (at::parallel_for). Per neuron, pass 1 reads its three float64
// sum rows, the group's Σx~ and shift rows (shared, in cache) and its weight row once, forms the
// three regimes' covariances into a thread-local buffer (L2/L3) and accumulates w·cov, ‖cov‖²
// and ‖w‖²; pass 2 divides by w·cov, rounds once to the store dtype, writes the three patterns
// and accumulates ‖a‖² of the rounded values for κ. Main-memory traffic: 3 float64 reads,
// one weight read and 3 pattern writes per weight.
#include "../patterns.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace untangle {
namespace {

// Relative size below which w·cov counts as zero (a dead neuron): patterns.py's _DEAD.
constexpr double kDead = 1e-12;
// Neurons per task: at least this many weights, so that a task outweighs its scheduling.
constexpr int64_t kGrainWeights = 1 << 15;

// One regime's per-neuron scalars: cov = s_xy / n1 - (s_x / n1) ey (+ shift * delta).
struct Regime {
  double n1, ey, delta;
  bool alive;
};

// The three regimes of neuron k (lin, pos, neg), from vec = [Σy~ | n+ | Σg y~ | n].
void regimes(const double* vec, int64_t k, int64_t nk, bool positive, Regime out[3]) {
  const double n = vec[3 * nk], npos = vec[nk + k], sy = vec[k], psy = vec[2 * nk + k];
  const double ey_all = sy / std::max(n, 1.0);
  out[0] = {std::max(n, 1.0), ey_all, 0.0, n > 1};
  const double cnt[2] = {npos, n - npos}, sy_r[2] = {psy, sy - psy};
  for (int r = 0; r < 2; ++r) {
    const double n1 = std::max(cnt[r], 1.0), ey = sy_r[r] / n1;
    out[r + 1] = positive ? Regime{n1, ey, 0.0, cnt[r] > 0} : Regime{n1, ey_all, ey - ey_all, cnt[r] > 0};
  }
}

// Pass 1 over one neuron: covariances into c[0..2] (dg each); returns w·cov[3], ‖cov‖²[3], ‖w‖².
template <bool kDelta, typename w_t>
void covariances(const double* sxy, const double* spx, const double* spxy, const double* sx, const double* sh,
                 const w_t* w, int64_t dg, const Regime* rg, double* c, double den[3], double cn[3],
                 double& wn) {
  double d0 = 0, d1 = 0, d2 = 0, q0 = 0, q1 = 0, q2 = 0, ww = 0;
  const double n0 = rg[0].n1, n1 = rg[1].n1, n2 = rg[2].n1, e0 = rg[0].ey, e1 = rg[1].ey, e2 = rg[2].ey;
  const double t1 = rg[1].delta, t2 = rg[2].delta;
  double *c0 = c, *c1 = c + dg, *c2 = c + 2 * dg;
#pragma omp simd reduction(+ : d0, d1, d2, q0, q1, q2, ww)
  for (int64_t i = 0; i < dg; ++i) {
    const double wi = static_cast<double>(w[i]), dxy = sxy[i] - spxy[i], dx = sx[i] - spx[i];
    double v0 = sxy[i] / n0 - (sx[i] / n0) * e0;
    double v1 = spxy[i] / n1 - (spx[i] / n1) * e1;
    double v2 = dxy / n2 - (dx / n2) * e2;
    if (kDelta) {
      v1 = v1 + sh[i] * t1;
      v2 = v2 + sh[i] * t2;
    }
    c0[i] = v0;
    c1[i] = v1;
    c2[i] = v2;
    d0 += wi * v0;
    d1 += wi * v1;
    d2 += wi * v2;
    q0 += v0 * v0;
    q1 += v1 * v1;
    q2 += v2 * v2;
    ww += wi * wi;
  }
  den[0] = d0, den[1] = d1, den[2] = d2, cn[0] = q0, cn[1] = q1, cn[2] = q2, wn = ww;
}

// Pass 2 for one regime: a = cov / den rounded to out_t (0 for a dead neuron); returns ‖a‖² of the stored values.
template <typename out_t>
double normalise(const double* c, int64_t dg, bool ok, double den, out_t* a) {
  if (!ok) {
    std::fill(a, a + dg, static_cast<out_t>(0));
    return 0.0;
  }
  double an = 0;
#pragma omp simd reduction(+ : an)
  for (int64_t i = 0; i < dg; ++i) {
    const out_t v = static_cast<out_t>(c[i] / den);
    a[i] = v;
    an += static_cast<double>(v) * static_cast<double>(v);
  }
  return an;
}

template <bool kDelta, typename w_t, typename out_t>
void patterns_loop(const PatternProblem& p, const PatternOutputs& out) {
  const int64_t kg = p.kg, dg = p.dg, nk = p.groups * kg, rows = 3 * kg + 1;
  const double* sums = p.sums.const_data_ptr<double>();
  const double* vec = p.vec.const_data_ptr<double>();
  const double* shift = p.shift.const_data_ptr<double>();
  const w_t* weight = p.weight.const_data_ptr<w_t>();
  out_t* dst[3] = {out.lin.data_ptr<out_t>(), out.pos.data_ptr<out_t>(), out.neg.data_ptr<out_t>()};
  double* kappa = out.kappa.data_ptr<double>();
  at::parallel_for(0, nk, std::max<int64_t>(1, kGrainWeights / dg), [&](int64_t k0, int64_t k1) {
    std::vector<double> buf(3 * dg);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t g = k / kg, r = k % kg;
      const double* s = sums + g * rows * dg;
      Regime rg[3];
      regimes(vec, k, nk, p.positive_mean_y, rg);
      double den[3], cn[3], wn;
      covariances<kDelta>(s + r * dg, s + (kg + r) * dg, s + (2 * kg + r) * dg, s + 3 * kg * dg, shift + g * dg,
                          weight + k * dg, dg, rg, buf.data(), den, cn, wn);
      const double w_norm = std::sqrt(wn);
      for (int e = 0; e < 3; ++e) {
        const bool ok = rg[e].alive && std::isfinite(den[e]) &&
                        std::abs(den[e]) > kDead * (w_norm * std::sqrt(cn[e])) && den[e] != 0;
        const double an = normalise(buf.data() + e * dg, dg, ok, den[e], dst[e] + k * dg);
        kappa[e * nk + k] = std::sqrt(an) * w_norm;
      }
    }
  });
}

void patterns_cpu(const PatternProblem& p, const PatternOutputs& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.weight.scalar_type(), "untangle_patterns_w", [&] {
    using w_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.lin.scalar_type(), "untangle_patterns", [&] {
      if (p.positive_mean_y) {
        patterns_loop<false, w_t, scalar_t>(p, out);
      } else {
        patterns_loop<true, w_t, scalar_t>(p, out);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_patterns_cpu(
    const at::Tensor& sums, const at::Tensor& vec, const at::Tensor& weight, const at::Tensor& shift,
    bool positive_mean_y, at::ScalarType dtype) {
  return run_layer_patterns(sums, vec, weight, shift, positive_mean_y, dtype, patterns_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(untangle_ext, CPU, m) {
  m.impl("layer_patterns", &layer_patterns_cpu);
}

}  // namespace untangle
