// Training-mode batch normalisation of K channels-last float32 maps, summed, then an activation:
//     y = act(u),  u = sum_b (gamma_b * (z_b - mean_b) * rstd_b + beta_b),
// with per-channel batch statistics of each z_b, and its backward. K = 1 is one BatchNorm2d;
// K = 4 is the four depthwise branches of an LM-Net multi-branch block and their sum. act is
// 0 (none), 1 (Hardswish, with the derivative torch's hardswish_backward uses) or 2 (GELU, the
// exact erf form, with erf from the rational formula 7.1.26 of Abramowitz and Stegun, the one
// PyTorch's own vectorised CPU GELU uses, and exp by range reduction and a degree-7 polynomial;
// both written so the compiler vectorises them: absolute error below 5e-7 for |u| < 10). The
// backward recomputes u (and so du = act'(u) dy) from the z_b it reads anyway, in each of its two
// passes, so neither u nor du is ever stored.
//
// On a CPU whose memory bandwidth limits these full-resolution maps, the gain is in memory
// traffic: the forward reads every z_b twice and writes y once (PyTorch: K normalisations and
// K - 1 additions, each a read and a write of whole maps, then the activation's read and write),
// the backward reads dy and the z_b twice and writes each dz_b once, whatever the activation.
// Every loop runs over a run of whole pixels' contiguous values (a "span", see Span) with the
// per-channel coefficients repeated to the span's length, so it vectorises without a remainder
// instead of going C values (12 or 24 in LM-Net) a pixel at a time. Statistics are summed in
// double, in a fixed order of fixed chunks, so the result does not depend on the number of
// threads.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// Statistics are summed over this many chunks of pixels (fewer for tiny maps), whatever the
// number of threads: the same inputs give the same bits on one thread or sixteen.
constexpr int64_t kChunks = 64;

// Float partial sums fold into double at least every this many pixels (fp32 error stays small).
constexpr int64_t kFoldPixels = 64;

void check_map(const at::Tensor& z, const at::Tensor& like) {
  TORCH_CHECK(z.dim() == 4 && z.scalar_type() == at::kFloat && z.device().is_cpu(),
              "lmnet batchnorm_sum: maps must be 4-D float32 CPU tensors");
  TORCH_CHECK(z.is_contiguous(at::MemoryFormat::ChannelsLast),
              "lmnet batchnorm_sum: maps must be channels-last");
  TORCH_CHECK(z.sizes() == like.sizes(), "lmnet batchnorm_sum: maps differ in shape");
}

int64_t chunk_count(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(rows, kChunks)); }

// The unit of work: a run of whole pixels whose C values fill whole 16-float vectors (a multiple
// of lcm(C, 16) floats, about 256: 240 floats = 10 pixels at C = 24, 20 at C = 12). Per-channel
// coefficients are laid out repeated over one span (tile), so value j of any span starting at a
// pixel boundary has channel j % C: each loop is one contiguous vector loop over the span.
struct Span {
  int64_t C, floats, pixels;
  explicit Span(int64_t channels) : C(channels) {
    int64_t period = C;
    while (period % 16 != 0) period += C;
    floats = period * std::max<int64_t>(1, 256 / period);
    pixels = floats / C;
  }
  // n = the values of the span of pixels [p, end) that start at p (fewer at the end of a range)
  int64_t values(int64_t p, int64_t end) const { return std::min(pixels, end - p) * C; }
  // a per-channel array (C) repeated over the span
  std::vector<float> tile(const float* v) const {
    std::vector<float> t(floats);
    for (int64_t j = 0; j < floats; ++j) t[j] = v[j % C];
    return t;
  }
  std::vector<float> tile(const std::vector<float>& v, int64_t offset = 0) const {
    return tile(v.data() + offset);
  }
  // add a span's float partial sums (tiled) into per-channel doubles, and zero them
  void fold(float* partial, double* out) const {
    for (int64_t q = 0; q < floats; q += C)
      for (int64_t c = 0; c < C; ++c) out[c] += partial[q + c];
    std::fill(partial, partial + floats, 0.f);
  }
  // spans between folds into double
  int64_t spans_per_fold() const { return std::max<int64_t>(1, kFoldPixels / pixels); }
};

// u = sum_b scale_b * z_b + shift, the coefficients from the float statistics the forward
// returned (the backward's u equals the forward's up to the rounding of those statistics)
void coefficients(const float* g, const float* be, const float* mu, const float* rs, int64_t K,
                  int64_t C, std::vector<float>& scale, std::vector<float>& shift) {
  scale.assign(K * C, 0.f);
  shift.assign(C, 0.f);
  for (int64_t b = 0; b < K; ++b)
    for (int64_t c = 0; c < C; ++c) {
      const double r = rs[b * C + c];
      scale[b * C + c] = static_cast<float>(g[b * C + c] * r);
      shift[c] += static_cast<float>(be[b * C + c] - g[b * C + c] * r * mu[b * C + c]);
    }
}

// The K maps' normalised sum u over n values from element e (a span), with the span's tiled
// coefficients: scale_t[b] (one tile per map) and shift_t.
struct NormalizedSum {
  std::vector<const float*> zp;
  std::vector<std::vector<float>> scale_t;
  std::vector<float> shift_t;

  NormalizedSum(std::vector<const float*> maps, const std::vector<float>& scale,
                const std::vector<float>& shift, const Span& span)
      : zp(std::move(maps)), shift_t(span.tile(shift)) {
    for (size_t b = 0; b < zp.size(); ++b) scale_t.push_back(span.tile(scale, b * span.C));
  }

  void operator()(float* out, int64_t e, int64_t n) const {
    const float* z0 = zp[0] + e;
    const float* s0 = scale_t[0].data();
    const float* sh = shift_t.data();
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = z0[j] * s0[j] + sh[j];
    for (size_t b = 1; b < zp.size(); ++b) {
      const float* z = zp[b] + e;
      const float* s = scale_t[b].data();
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] += z[j] * s[j];
    }
  }
};

constexpr int64_t kNone = 0, kHardswish = 1, kGelu = 2;

void check_activation(int64_t act) {
  TORCH_CHECK(act == kNone || act == kHardswish || act == kGelu,
              "lmnet batchnorm_sum: unknown activation");
}

// exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, Cody and Waite),
// exp(r) by its Taylor polynomial of degree 7 (relative error below 6e-9 there), times 2^n built
// in the exponent bits; below -87 (exp under 1.7e-38) the input is clamped, which leaves GELU's
// values and derivative unchanged to float precision. A NaN is clamped too (the comparison is
// false), so none reaches the integer conversion; GELU's u carries it to the result.
inline float exp_nonpositive(float x) {
  x = x > -87.f ? x : -87.f;
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = std::fma(n, -0.693145751953125f, std::fma(n, -1.428606765330187e-06f, x));
  float p = 1.f / 5040.f;
  p = std::fma(p, r, 1.f / 720.f);
  p = std::fma(p, r, 1.f / 120.f);
  p = std::fma(p, r, 1.f / 24.f);
  p = std::fma(p, r, 1.f / 6.f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// The standard normal's tail Q(|u|) = P(X > |u|) = erfc(|u| / sqrt 2) / 2, with its density's
// exponential e = exp(-u^2 / 2) (the derivative needs it too): erfc(a) = poly(t) exp(-a^2),
// t = 1 / (1 + 0.3275911 a), Abramowitz and Stegun 7.1.26.
inline float normal_tail(float u, float& e) {
  const float a = std::fabs(u) * 0.70710678118654752f;
  const float t = 1.f / std::fma(0.3275911f, a, 1.f);
  float q = 1.061405429f;
  q = std::fma(q, t, -1.453152027f);
  q = std::fma(q, t, 1.421413741f);
  q = std::fma(q, t, -0.284496736f);
  q = std::fma(q, t, 0.254829592f);
  e = exp_nonpositive(-0.5f * u * u);
  return 0.5f * q * t * e;
}

// GELU's cumulative normal Phi(u): the tail itself below zero (no cancellation), 1 - tail above
inline float normal_cdf(float u, float& e) {
  const float tail = normal_tail(u, e);
  return u < 0.f ? tail : 1.f - tail;
}

inline float hardswish(float u) { return u * std::min(std::max(u + 3.f, 0.f), 6.f) / 6.f; }

// d hardswish / d u, as torch's hardswish_backward computes it
inline float hardswish_grad(float u) { return u < -3.f ? 0.f : (u <= 3.f ? u / 3.f + 0.5f : 1.f); }

// out[j] = act(out[j]) over n values (a loop per activation, so each vectorises)
void activate(float* out, int64_t n, int64_t act) {
  if (act == kHardswish) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = hardswish(out[j]);
  } else if (act == kGelu) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float e;
      out[j] = out[j] * normal_cdf(out[j], e);
    }
  }
}

// du[j] = act'(u[j]) * dy[j]; GELU: (Phi(u) + u phi(u)) dy, phi(u) = e / sqrt(2 pi)
void activation_backward(float* du, const float* dy, const float* u, int64_t n, int64_t act) {
  if (act == kHardswish) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) du[j] = dy[j] * hardswish_grad(u[j]);
  } else if (act == kGelu) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      float e;
      const float cdf = normal_cdf(u[j], e);
      du[j] = dy[j] * std::fma(u[j] * 0.39894228040143268f, e, cdf);
    }
  }
}

}  // namespace

// Returns (y, mean (K, C), invstd (K, C), var (K, C), unbiased): var is the biased variance
// used to normalise; the caller updates running statistics with var * M / (M - 1).
std::vector<at::Tensor> bn_sum_forward(const std::vector<at::Tensor>& zs, const at::Tensor& gamma,
                                       const at::Tensor& beta, double eps, int64_t act) {
  check_activation(act);
  const int64_t K = static_cast<int64_t>(zs.size());
  TORCH_CHECK(K >= 1, "lmnet batchnorm_sum: at least one map");
  for (const auto& z : zs) check_map(z, zs[0]);
  const int64_t N = zs[0].size(0), C = zs[0].size(1), H = zs[0].size(2), W = zs[0].size(3);
  TORCH_CHECK(gamma.sizes() == at::IntArrayRef({K, C}) && beta.sizes() == at::IntArrayRef({K, C}) &&
              gamma.is_contiguous() && beta.is_contiguous() &&
              gamma.scalar_type() == at::kFloat && beta.scalar_type() == at::kFloat,
              "lmnet batchnorm_sum: gamma and beta must be (K, C) float32");
  const int64_t P = N * H * W;  // pixels, each a contiguous run of C values
  TORCH_CHECK(P > 0 && C > 0, "lmnet batchnorm_sum: empty maps");
  const Span span(C);
  const int64_t chunks = chunk_count(P);
  std::vector<double> sums(chunks * K * C * 2, 0.0);
  std::vector<const float*> zp(K);
  for (int64_t b = 0; b < K; ++b) zp[b] = zs[b].data_ptr<float>();
  // sums of (z - pivot) and its square, pivot = the first pixel's value: no cancellation when a
  // channel's mean is large against its spread
  std::vector<float> pivot(K * C);
  for (int64_t b = 0; b < K; ++b)
    for (int64_t c = 0; c < C; ++c) pivot[b * C + c] = zp[b][c];
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> f1(span.floats), f2(span.floats);  // float partials over a few spans
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t p0 = P * chunk / chunks, p1 = P * (chunk + 1) / chunks;
      for (int64_t b = 0; b < K; ++b) {
        double* s1 = sums.data() + ((chunk * K + b) * 2) * C;
        double* s2 = s1 + C;
        const std::vector<float> pv = span.tile(pivot, b * C);
        std::fill(f1.begin(), f1.end(), 0.f);
        std::fill(f2.begin(), f2.end(), 0.f);
        int64_t spans = 0;
        for (int64_t p = p0; p < p1; p += span.pixels) {
          const int64_t n = span.values(p, p1);
          const float* z = zp[b] + p * C;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) {
            const float d = z[j] - pv[j];
            f1[j] += d;
            f2[j] += d * d;
          }
          if (++spans == span.spans_per_fold() || p + span.pixels >= p1) {
            span.fold(f1.data(), s1);
            span.fold(f2.data(), s2);
            spans = 0;
          }
        }
      }
    }
  });
  auto opts = gamma.options();
  auto mean = at::empty({K, C}, opts), invstd = at::empty({K, C}, opts), var = at::empty({K, C}, opts);
  const float* g = gamma.data_ptr<float>();
  const float* be = beta.data_ptr<float>();
  std::vector<float> scale(K * C, 0.f), shift(C, 0.f);
  for (int64_t b = 0; b < K; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      double s1 = 0.0, s2 = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        s1 += sums[((chunk * K + b) * 2) * C + c];
        s2 += sums[((chunk * K + b) * 2 + 1) * C + c];
      }
      const double shifted = s1 / P;
      const double v = std::max(0.0, s2 / P - shifted * shifted);
      const double m = shifted + pivot[b * C + c];
      const double r = 1.0 / std::sqrt(v + eps);
      mean.data_ptr<float>()[b * C + c] = static_cast<float>(m);
      var.data_ptr<float>()[b * C + c] = static_cast<float>(v);
      invstd.data_ptr<float>()[b * C + c] = static_cast<float>(r);
      scale[b * C + c] = static_cast<float>(g[b * C + c] * r);  // from the double statistics
      shift[c] += static_cast<float>(be[b * C + c] - g[b * C + c] * r * m);
    }
  }
  auto y = at::empty_like(zs[0], zs[0].options().memory_format(at::MemoryFormat::ChannelsLast));
  float* yp = y.data_ptr<float>();
  const NormalizedSum normalized_sum(zp, scale, shift, span);
  at::parallel_for(0, P, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; p += span.pixels) {
      const int64_t n = span.values(p, end);
      normalized_sum(yp + p * C, p * C, n);
      activate(yp + p * C, n, act);
    }
  });
  return {y, mean, invstd, var};
}

// Returns (dz_0, ..., dz_{K-1}, dgamma (K, C), dbeta (K, C)).
std::vector<at::Tensor> bn_sum_backward(const at::Tensor& dy_in, const std::vector<at::Tensor>& zs,
                                        const at::Tensor& gamma, const at::Tensor& beta,
                                        const at::Tensor& mean, const at::Tensor& invstd,
                                        int64_t act) {
  check_activation(act);
  const int64_t K = static_cast<int64_t>(zs.size());
  TORCH_CHECK(K >= 1, "lmnet batchnorm_sum: at least one map");
  for (const auto& z : zs) check_map(z, zs[0]);
  auto dy = dy_in.contiguous(at::MemoryFormat::ChannelsLast);
  check_map(dy, zs[0]);
  const int64_t N = zs[0].size(0), C = zs[0].size(1), H = zs[0].size(2), W = zs[0].size(3);
  const int64_t P = N * H * W;
  TORCH_CHECK(P > 0 && C > 0, "lmnet batchnorm_sum: empty maps");
  for (const auto* t : {&gamma, &beta, &mean, &invstd})
    TORCH_CHECK(t->sizes() == at::IntArrayRef({K, C}) && t->is_contiguous() &&
                    t->scalar_type() == at::kFloat,
                "lmnet batchnorm_sum: gamma, beta, mean and invstd must be (K, C) float32");
  const Span span(C);
  const int64_t chunks = chunk_count(P);
  // per chunk: sum(du) (C), and sum(du * z_b) (K x C)
  std::vector<double> sums(chunks * (K + 1) * C, 0.0);
  std::vector<const float*> zp(K);
  for (int64_t b = 0; b < K; ++b) zp[b] = zs[b].data_ptr<float>();
  const float* g = gamma.data_ptr<float>();
  const float* be = beta.data_ptr<float>();
  const float* mu = mean.data_ptr<float>();
  const float* rs = invstd.data_ptr<float>();
  // with an activation the kernel works on du = act'(u) * dy, with u recomputed from the z_b it
  // reads anyway (as the forward made it), a span at a time in both passes: du is never stored
  std::vector<float> scale, shift;
  coefficients(g, be, mu, rs, K, C, scale, shift);
  const NormalizedSum normalized_sum(zp, scale, shift, span);
  const float* dyp = dy.data_ptr<float>();
  // du of the n values from element e: dy itself without an activation, else computed into buf
  // (u is scratch)
  auto du_of = [&](int64_t e, int64_t n, float* u, float* buf) -> const float* {
    if (act == kNone) return dyp + e;
    normalized_sum(u, e, n);
    activation_backward(buf, dyp + e, u, n, act);
    return buf;
  };
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> u(span.floats), buf(span.floats);
    std::vector<float> f((K + 1) * span.floats);  // float partials, tiled: du, then du * z_b
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t p0 = P * chunk / chunks, p1 = P * (chunk + 1) / chunks;
      double* acc = sums.data() + chunk * (K + 1) * C;
      std::fill(f.begin(), f.end(), 0.f);
      int64_t spans = 0;
      for (int64_t p = p0; p < p1; p += span.pixels) {
        const int64_t n = span.values(p, p1);
        const float* d = du_of(p * C, n, u.data(), buf.data());
        float* f0 = f.data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) f0[j] += d[j];
        for (int64_t b = 0; b < K; ++b) {
          const float* z = zp[b] + p * C;
          float* fb = f.data() + (b + 1) * span.floats;
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) fb[j] += d[j] * z[j];
        }
        if (++spans == span.spans_per_fold() || p + span.pixels >= p1) {
          for (int64_t i = 0; i <= K; ++i) span.fold(f.data() + i * span.floats, acc + i * C);
          spans = 0;
        }
      }
    }
  });
  std::vector<double> total((K + 1) * C, 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < (K + 1) * C; ++i) total[i] += sums[chunk * (K + 1) * C + i];
  auto opts = gamma.options();
  auto dgamma = at::empty({K, C}, opts), dbeta = at::empty({K, C}, opts);
  // dz_b = a_b * du + m_b * z_b + c_b (per channel)
  std::vector<float> a(K * C), m(K * C), cst(K * C);
  for (int64_t b = 0; b < K; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const double sdy = total[c];
      const double sdyz = total[(b + 1) * C + c];
      const double mub = mu[b * C + c], r = rs[b * C + c], gb = g[b * C + c];
      const double sdyxhat = r * (sdyz - mub * sdy);  // sum(du * xhat_b)
      dbeta.data_ptr<float>()[b * C + c] = static_cast<float>(sdy);
      dgamma.data_ptr<float>()[b * C + c] = static_cast<float>(sdyxhat);
      const double s = gb * r;             // d u / d z_b
      const double k = sdyxhat * r / P;     // coefficient of (z_b - mean_b)
      a[b * C + c] = static_cast<float>(s);
      m[b * C + c] = static_cast<float>(-s * k);
      cst[b * C + c] = static_cast<float>(-s * sdy / P + s * k * mub);
    }
  }
  std::vector<std::vector<float>> a_t, m_t, c_t;  // tiled over a span, per map
  for (int64_t b = 0; b < K; ++b) {
    a_t.push_back(span.tile(a, b * C));
    m_t.push_back(span.tile(m, b * C));
    c_t.push_back(span.tile(cst, b * C));
  }
  std::vector<at::Tensor> out;
  std::vector<float*> dzp(K);
  for (int64_t b = 0; b < K; ++b) {
    out.push_back(at::empty_like(zs[0], zs[0].options().memory_format(at::MemoryFormat::ChannelsLast)));
    dzp[b] = out.back().data_ptr<float>();
  }
  at::parallel_for(0, P, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> u(span.floats), buf(span.floats);
    for (int64_t p = begin; p < end; p += span.pixels) {
      const int64_t n = span.values(p, end);
      const float* d = du_of(p * C, n, u.data(), buf.data());
      for (int64_t b = 0; b < K; ++b) {
        const float* z = zp[b] + p * C;
        float* dz = dzp[b] + p * C;
        const float* ab = a_t[b].data();
        const float* mb = m_t[b].data();
        const float* cb = c_t[b].data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) dz[j] = ab[j] * d[j] + mb[j] * z[j] + cb[j];
      }
    }
  });
  out.push_back(dgamma);
  out.push_back(dbeta);
  return out;
}

TORCH_LIBRARY(lmnet_native, m) {
  m.def("bn_sum_forward(Tensor[] zs, Tensor gamma, Tensor beta, float eps, int act) -> Tensor[]",
        &bn_sum_forward);
  m.def("bn_sum_backward(Tensor dy, Tensor[] zs, Tensor gamma, Tensor beta, Tensor mean,"
        " Tensor invstd, int act) -> Tensor[]", &bn_sum_backward);
}
