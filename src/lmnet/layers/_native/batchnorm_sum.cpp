// Training-mode batch normalisation of K channels-last float32 maps, summed, then an activation:
//     y = act(u),  u = sum_b (gamma_b * (z_b - mean_b) * rstd_b + beta_b),
// with per-channel batch statistics of each z_b, and its backward. K = 1 is one BatchNorm2d;
// K = 4 is the four depthwise branches of an LM-Net multi-branch block and their sum. act is
// 0 (none) or 1 (Hardswish, with the derivative torch's hardswish_backward uses); the backward
// recomputes u (and so du = act'(u) dy) from the z_b it reads anyway, in each of its two passes,
// so neither u nor du is ever stored. (GELU is not fused here: scalar erf and exp cost more than
// the memory traffic saved; PyTorch's vectorised GELU runs.)
//
// On a CPU whose memory bandwidth limits these full-resolution maps, the gain is in memory
// traffic: the forward reads every z_b twice and writes y once (PyTorch: K normalisations and
// K - 1 additions, each a read and a write of whole maps), the backward reads dy and the z_b
// twice and writes each dz_b once, whatever the activation. Statistics are summed in double, in
// a fixed order of fixed chunks, so the result does not depend on the number of threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace {

// Statistics are summed over this many chunks of pixels (fewer for tiny maps), whatever the
// number of threads: the same inputs give the same bits on one thread or sixteen.
constexpr int64_t kChunks = 64;

void check_map(const at::Tensor& z, const at::Tensor& like) {
  TORCH_CHECK(z.dim() == 4 && z.scalar_type() == at::kFloat && z.device().is_cpu(),
              "lmnet batchnorm_sum: maps must be 4-D float32 CPU tensors");
  TORCH_CHECK(z.is_contiguous(at::MemoryFormat::ChannelsLast),
              "lmnet batchnorm_sum: maps must be channels-last");
  TORCH_CHECK(z.sizes() == like.sizes(), "lmnet batchnorm_sum: maps differ in shape");
}

int64_t chunk_count(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(rows, kChunks)); }

inline float activate(float u, int64_t act) {
  return act == 1 ? u * std::min(std::max(u + 3.f, 0.f), 6.f) / 6.f : u;
}

// d act / d u, as torch's hardswish_backward computes it
inline float activate_grad(float u, int64_t act) {
  return act == 1 ? (u < -3.f ? 0.f : (u <= 3.f ? u / 3.f + 0.5f : 1.f)) : 1.f;
}

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

// u of pixel p (C values, written to out)
inline void normalized_sum(float* out, const std::vector<const float*>& zp, int64_t p,
                           const std::vector<float>& scale, const std::vector<float>& shift,
                           int64_t C) {
  const float* z0 = zp[0] + p * C;
  const float* s0 = scale.data();
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) out[c] = z0[c] * s0[c] + shift[c];
  for (size_t b = 1; b < zp.size(); ++b) {
    const float* z = zp[b] + p * C;
    const float* s = scale.data() + b * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) out[c] += z[c] * s[c];
  }
}

}  // namespace

// Returns (y, mean (K, C), invstd (K, C), var (K, C), unbiased): var is the biased variance
// used to normalise; the caller updates running statistics with var * M / (M - 1).
std::vector<at::Tensor> bn_sum_forward(const std::vector<at::Tensor>& zs, const at::Tensor& gamma,
                                       const at::Tensor& beta, double eps, int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "lmnet batchnorm_sum: unknown activation");
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
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t p0 = P * chunk / chunks, p1 = P * (chunk + 1) / chunks;
      for (int64_t b = 0; b < K; ++b) {
        double* s1 = sums.data() + ((chunk * K + b) * 2) * C;
        double* s2 = s1 + C;
        const float* pv = pivot.data() + b * C;
        std::vector<float> f1(C, 0.f), f2(C, 0.f);  // float partials over a few pixels
        int64_t in_block = 0;
        for (int64_t p = p0; p < p1; ++p) {
          const float* z = zp[b] + p * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const float d = z[c] - pv[c];
            f1[c] += d;
            f2[c] += d * d;
          }
          if (++in_block == 64) {  // fold into double every 64 pixels: fp32 error stays small
            for (int64_t c = 0; c < C; ++c) {
              s1[c] += f1[c];
              s2[c] += f2[c];
              f1[c] = f2[c] = 0.f;
            }
            in_block = 0;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          s1[c] += f1[c];
          s2[c] += f2[c];
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
  at::parallel_for(0, P, 256, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* out = yp + p * C;
      normalized_sum(out, zp, p, scale, shift, C);
      if (act != 0) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) out[c] = activate(out[c], act);
      }
    }
  });
  return {y, mean, invstd, var};
}

// Returns (dz_0, ..., dz_{K-1}, dgamma (K, C), dbeta (K, C)).
std::vector<at::Tensor> bn_sum_backward(const at::Tensor& dy_in, const std::vector<at::Tensor>& zs,
                                        const at::Tensor& gamma, const at::Tensor& beta,
                                        const at::Tensor& mean, const at::Tensor& invstd,
                                        int64_t act) {
  TORCH_CHECK(act == 0 || act == 1, "lmnet batchnorm_sum: unknown activation");
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
  const int64_t chunks = chunk_count(P);
  // per chunk: sum(dy) (C), and sum(dy * z_b) (K x C)
  std::vector<double> sums(chunks * (K + 1) * C, 0.0);
  std::vector<const float*> zp(K);
  for (int64_t b = 0; b < K; ++b) zp[b] = zs[b].data_ptr<float>();
  const float* g = gamma.data_ptr<float>();
  const float* be = beta.data_ptr<float>();
  const float* mu = mean.data_ptr<float>();
  const float* rs = invstd.data_ptr<float>();
  // with an activation the kernel works on du = act'(u) * dy, with u recomputed from the z_b it
  // reads anyway (as the forward made it), pixel by pixel in both passes: du is never stored
  std::vector<float> scale, shift;
  if (act != 0) coefficients(g, be, mu, rs, K, C, scale, shift);
  const float* dyp = dy.data_ptr<float>();
  // du of pixel p: dy itself without an activation, else computed into buf
  auto du_of = [&](int64_t p, float* u, float* buf) -> const float* {
    const float* d = dyp + p * C;
    if (act == 0) return d;
    normalized_sum(u, zp, p, scale, shift, C);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) buf[c] = d[c] * activate_grad(u[c], act);
    return buf;
  };
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> u(C), buf(C);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      const int64_t p0 = P * chunk / chunks, p1 = P * (chunk + 1) / chunks;
      double* acc = sums.data() + chunk * (K + 1) * C;
      std::vector<float> f((K + 1) * C, 0.f);
      int64_t in_block = 0;
      for (int64_t p = p0; p < p1; ++p) {
        const float* d = du_of(p, u.data(), buf.data());
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) f[c] += d[c];
        for (int64_t b = 0; b < K; ++b) {
          const float* z = zp[b] + p * C;
          float* fb = f.data() + (b + 1) * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) fb[c] += d[c] * z[c];
        }
        if (++in_block == 64) {
          for (int64_t i = 0; i < (K + 1) * C; ++i) {
            acc[i] += f[i];
            f[i] = 0.f;
          }
          in_block = 0;
        }
      }
      for (int64_t i = 0; i < (K + 1) * C; ++i) acc[i] += f[i];
    }
  });
  std::vector<double> total((K + 1) * C, 0.0);
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < (K + 1) * C; ++i) total[i] += sums[chunk * (K + 1) * C + i];
  auto opts = gamma.options();
  auto dgamma = at::empty({K, C}, opts), dbeta = at::empty({K, C}, opts);
  // dz_b = a_b * dy + m_b * z_b + c_b (per channel)
  std::vector<float> a(K * C), m(K * C), cst(K * C);
  for (int64_t b = 0; b < K; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const double sdy = total[c];
      const double sdyz = total[(b + 1) * C + c];
      const double mub = mu[b * C + c], r = rs[b * C + c], gb = g[b * C + c];
      const double sdyxhat = r * (sdyz - mub * sdy);  // sum(dy * xhat_b)
      dbeta.data_ptr<float>()[b * C + c] = static_cast<float>(sdy);
      dgamma.data_ptr<float>()[b * C + c] = static_cast<float>(sdyxhat);
      const double s = gb * r;             // d y / d z_b
      const double k = sdyxhat * r / P;     // coefficient of (z_b - mean_b)
      a[b * C + c] = static_cast<float>(s);
      m[b * C + c] = static_cast<float>(-s * k);
      cst[b * C + c] = static_cast<float>(-s * sdy / P + s * k * mub);
    }
  }
  std::vector<at::Tensor> out;
  std::vector<float*> dzp(K);
  for (int64_t b = 0; b < K; ++b) {
    out.push_back(at::empty_like(zs[0], zs[0].options().memory_format(at::MemoryFormat::ChannelsLast)));
    dzp[b] = out.back().data_ptr<float>();
  }
  at::parallel_for(0, P, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> u(C), buf(C);
    for (int64_t p = begin; p < end; ++p) {
      const float* d = du_of(p, u.data(), buf.data());
      for (int64_t b = 0; b < K; ++b) {
        const float* z = zp[b] + p * C;
        float* dz = dzp[b] + p * C;
        const float* ab = a.data() + b * C;
        const float* mb = m.data() + b * C;
        const float* cb = cst.data() + b * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) dz[c] = ab[c] * d[c] + mb[c] * z[c] + cb[c];
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
