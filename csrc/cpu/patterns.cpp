// CPU loop of the pattern op (semantics: untangle_ext/_reference.py::layer_patterns) and its registration.
//
// One task per block of neurons (at::parallel_for). Per neuron, pass 1 reads its three float64
// sum rows, the group's Σx~ and shift rows (shared, in cache) and its weight row once, forms the
// three regimes' (scaled) covariances into a thread-local buffer (L2/L3) and accumulates w·cov,
// ‖cov‖² and ‖w‖²; pass 2 scales by 1/(w·cov), rounds once to the store dtype, writes the
// kept patterns and accumulates ‖a‖² of the rounded values for κ (of all three). Main-memory traffic:
// 3 float64 reads, one weight read and one write per kept pattern per weight.
#include "../patterns.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

namespace untangle {
namespace {

// Relative size below which w·cov counts as zero (a dead neuron): _reference.DEAD.
constexpr double kDead = 1e-12;
// Neurons per task: at least this many weights, so that a task outweighs its scheduling.
constexpr int64_t kGrainWeights = 1 << 15;

// One regime's per-neuron scalars. cov = s_xy/n1 - (s_x/n1) ey (+ shift * delta) is formed as
// u = n1 * cov = s_xy - s_x ey (+ shift * (delta n1)): a = u / (w·u) = cov / (w·cov) and the
// dead-neuron test |w·u| > kDead ‖w‖‖u‖ are invariant to the positive factor n1, so no element
// is divided (the PyTorch code's nine divisions per weight made this loop compute-bound).
struct Regime {
  double ey, shift_coef;
  bool alive;
};

// The three regimes of neuron k (lin, pos, neg), from vec = [Σy~ | n+ | Σg y~ | n].
void regimes(const double* vec, int64_t k, int64_t nk, bool positive, Regime out[3]) {
  const double n = vec[3 * nk], npos = vec[nk + k], sy = vec[k], psy = vec[2 * nk + k];
  const double ey_all = sy / std::max(n, 1.0);
  out[0] = {ey_all, 0.0, n > 1};
  const double cnt[2] = {npos, n - npos}, sy_r[2] = {psy, sy - psy};
  for (int r = 0; r < 2; ++r) {
    const double n1 = std::max(cnt[r], 1.0), ey = sy_r[r] / n1;
    out[r + 1] = positive ? Regime{ey, 0.0, cnt[r] > 0} : Regime{ey_all, (ey - ey_all) * n1, cnt[r] > 0};
  }
}

// Pass 1 over one neuron: u of the three regimes into c[0..2] (dg each); w·u[3], ‖u‖²[3], ‖w‖².
template <bool kDelta, typename w_t>
inline void scaled_covariances(const double* sxy, const double* spx, const double* spxy, const double* sx,
                               const double* sh, const w_t* w, int64_t dg, const Regime* rg, double* c,
                               double den[3], double un[3], double& wn) {
  double d0 = 0, d1 = 0, d2 = 0, q0 = 0, q1 = 0, q2 = 0, ww = 0;
  const double e0 = rg[0].ey, e1 = rg[1].ey, e2 = rg[2].ey, t1 = rg[1].shift_coef, t2 = rg[2].shift_coef;
  double *c0 = c, *c1 = c + dg, *c2 = c + 2 * dg;
#pragma omp simd reduction(+ : d0, d1, d2, q0, q1, q2, ww)
  for (int64_t i = 0; i < dg; ++i) {
    const double wi = static_cast<double>(w[i]);
    const double v0 = sxy[i] - sx[i] * e0;
    double v1 = spxy[i] - spx[i] * e1;
    double v2 = (sxy[i] - spxy[i]) - (sx[i] - spx[i]) * e2;
    if (kDelta) {
      v1 += sh[i] * t1;
      v2 += sh[i] * t2;
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
  den[0] = d0;
  den[1] = d1;
  den[2] = d2;
  un[0] = q0;
  un[1] = q1;
  un[2] = q2;
  wn = ww;
}

// Pass 2 for one regime: a = u * (1 / w·u) rounded to out_t (0 for a dead neuron), written to `a` unless
// it is null (a pattern not kept); returns ‖a‖² of the rounded values.
template <typename out_t>
inline double normalise(const double* c, int64_t dg, bool ok, double den, out_t* a) {
  if (!ok) {
    if (a != nullptr) std::fill(a, a + dg, static_cast<out_t>(0));
    return 0.0;
  }
  const double inv = 1.0 / den;
  double an = 0;
  if (a == nullptr) {
#pragma omp simd reduction(+ : an)
    for (int64_t i = 0; i < dg; ++i) {
      const double v = static_cast<double>(static_cast<out_t>(c[i] * inv));
      an += v * v;
    }
    return an;
  }
#pragma omp simd reduction(+ : an)
  for (int64_t i = 0; i < dg; ++i) {
    const out_t v = static_cast<out_t>(c[i] * inv);
    a[i] = v;
    an += static_cast<double>(v) * static_cast<double>(v);
  }
  return an;
}

// Pointers of one call, shared by the tasks.
template <typename w_t, typename out_t>
struct Views {
  const double *sums, *vec, *shift;
  const w_t* weight;
  out_t* dst[3];
  double* kappa;
  int64_t kg, dg, nk;
  bool positive;
};

// Neurons [k0, k1) with the thread's buffer (3 dg doubles).
template <bool kDelta, typename w_t, typename out_t>
inline void neurons(const Views<w_t, out_t>& v, int64_t k0, int64_t k1, double* buf) {
  const int64_t kg = v.kg, dg = v.dg, rows = 3 * kg + 1;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t g = k / kg, r = k % kg;
    const double* s = v.sums + g * rows * dg;
    Regime rg[3];
    regimes(v.vec, k, v.nk, v.positive, rg);
    double den[3], un[3], wn;
    scaled_covariances<kDelta>(s + r * dg, s + (kg + r) * dg, s + (2 * kg + r) * dg, s + 3 * kg * dg,
                               v.shift + g * dg, v.weight + k * dg, dg, rg, buf, den, un, wn);
    const double w_norm = std::sqrt(wn);
    for (int e = 0; e < 3; ++e) {
      const bool ok = rg[e].alive && std::isfinite(den[e]) &&
                      std::abs(den[e]) > kDead * (w_norm * std::sqrt(un[e])) && den[e] != 0;
      const double an = normalise(buf + e * dg, dg, ok, den[e], v.dst[e] ? v.dst[e] + k * dg : nullptr);
      v.kappa[e * v.nk + k] = std::sqrt(an) * w_norm;
    }
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
// The same loops compiled for AVX2 (flatten inlines them here), chosen at run time. Without FMA on
// purpose: every element is rounded as in the PyTorch code, so a regime whose covariance vanishes
// exactly there (one sample with mean_y="positive") vanishes here too instead of leaving an FMA's
// exact rounding residue as a "pattern".
template <bool kDelta, typename w_t, typename out_t>
__attribute__((target("avx2"), flatten)) void neurons_avx2(const Views<w_t, out_t>& v, int64_t k0, int64_t k1,
                                                                 double* buf) {
  neurons<kDelta>(v, k0, k1, buf);
}
const bool kHasAvx2 = __builtin_cpu_supports("avx2");
#endif

// Where a pattern goes: its data, or null when it is not kept (an empty output).
template <typename out_t>
out_t* kept(const at::Tensor& t) {
  return t.numel() > 0 ? t.data_ptr<out_t>() : nullptr;
}

template <bool kDelta, typename w_t, typename out_t>
void patterns_loop(const PatternProblem& p, const PatternOutputs& out) {
  const Views<w_t, out_t> v{p.sums.const_data_ptr<double>(), p.vec.const_data_ptr<double>(),
                            p.shift.const_data_ptr<double>(), p.weight.const_data_ptr<w_t>(),
                            {kept<out_t>(out.lin), kept<out_t>(out.pos), kept<out_t>(out.neg)},
                            out.kappa.data_ptr<double>(), p.kg, p.dg, p.groups * p.kg, p.positive_mean_y};
  at::parallel_for(0, v.nk, std::max<int64_t>(1, kGrainWeights / v.dg), [&](int64_t k0, int64_t k1) {
    const std::unique_ptr<double[]> buf(new double[3 * v.dg]);
#if defined(__GNUC__) && defined(__x86_64__)
    if (kHasAvx2) return neurons_avx2<kDelta>(v, k0, k1, buf.get());
#endif
    neurons<kDelta>(v, k0, k1, buf.get());
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
    bool positive_mean_y, at::ScalarType dtype, std::array<bool, 3> keep) {
  return run_layer_patterns(sums, vec, weight, shift, positive_mean_y, dtype, keep, patterns_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(untangle_ext, CPU, m) {
  m.impl("layer_patterns", &layer_patterns_cpu);
}

}  // namespace untangle
