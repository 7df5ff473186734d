// 2-D neighborhood attention, forward only (inference), on channels-first float32 maps
// q, k, v (B, heads * d, H, W), the window of a query at (i, j) the ks x ks keys starting at
// row clamp(i - ks / 2, 0, H - ks) and column clamp(j - ks / 2, 0, W - ks), as NATTEN and
// lmnet.layers.neighborhood_attention (which is the reference this is tested against):
//     logit[p] = sum_c (q[c, i, j] * scale) * k[c, key_p] + rpb[head, key_p - (i, j) + ks - 1]
//     out[c, i, j] = sum_p softmax(logit)[p] * v[c, key_p]
//
// Why by hand: written with whole-map tensor operations (the PyTorch formulation, and what an
// export to ONNX or OpenVINO contains), each of the ks * ks window positions reads and writes
// the whole map several times; LM-Net's attention at full resolution (12 heads of one channel)
// does a few multiply-adds per value read. Here one pass over a row of queries keeps its ks * ks
// logits in a small buffer, so each input is read ks * ks times from cache and the output
// written once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// exp(x) for x <= 0 (the logits less their maximum), written without a library call so that
// the loops around it vectorise: x = n ln 2 + t, |t| <= ln 2 / 2, exp(t) by its Taylor
// polynomial of degree 7 (relative error under 2e-7, within float rounding of std::exp),
// 2^n put into the exponent bits. Below -87 the result is 0 (std::exp gives a denormal there).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float t = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 5040.0f;
  p = p * t + 1.0f / 720.0f;
  p = p * t + 1.0f / 120.0f;
  p = p * t + 1.0f / 24.0f;
  p = p * t + 1.0f / 6.0f;
  p = p * t + 0.5f;
  p = p * t + 1.0f;
  p = p * t + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One row i of queries of one (batch, head): q, k, v point at the head's d channels (plane
// stride HW); logits is a ks * ks * W scratch buffer, m and s two W-float ones.
void attend_row(const float* q, const float* k, const float* v, const float* bias, float* out,
                int64_t d, int64_t H, int64_t W, int64_t ks, int64_t i, float scale,
                float* logits, float* m, float* s) {
  const int64_t HW = H * W, r = ks / 2, nb = 2 * ks - 1;
  const int64_t rs = std::clamp<int64_t>(i - r, 0, H - ks);
  const int64_t lo = std::min<int64_t>(r, W), hi = std::max<int64_t>(lo, W - r);
  // logits[p * W + j], p = a * ks + b: the interior columns [lo, hi), whose window starts at
  // j - r, as vector loops over j; the r border columns on each side one by one.
  for (int64_t a = 0; a < ks; ++a) {
    const int64_t kr = rs + a, brow = kr - i + ks - 1;
    for (int64_t b = 0; b < ks; ++b) {
      float* L = logits + (a * ks + b) * W;
      const float bc = bias ? bias[brow * nb + b + r] : 0.f;  // kc - j + ks - 1 = b + r inside
      for (int64_t j = lo; j < hi; ++j) L[j] = 0.f;
      for (int64_t c = 0; c < d; ++c) {
        const float* qr = q + c * HW + i * W;
        const float* kp = k + c * HW + kr * W + b - r;
#pragma omp simd
        for (int64_t j = lo; j < hi; ++j) L[j] += (qr[j] * scale) * kp[j];
      }
      if (bias) {
#pragma omp simd
        for (int64_t j = lo; j < hi; ++j) L[j] += bc;
      }
      for (int64_t j = 0; j < W; ++j) {
        if (j == lo) j = hi;  // the interior is done
        if (j >= W) break;
        const int64_t kc = std::clamp<int64_t>(j - r, 0, W - ks) + b;
        float acc = 0.f;
        for (int64_t c = 0; c < d; ++c) acc += (q[c * HW + i * W + j] * scale) * k[c * HW + kr * W + kc];
        L[j] = acc + (bias ? bias[brow * nb + kc - j + ks - 1] : 0.f);
      }
    }
  }
  // softmax over the window, per column
  const int64_t P = ks * ks;
  for (int64_t j = 0; j < W; ++j) m[j] = logits[j];
  for (int64_t p = 1; p < P; ++p) {
    const float* L = logits + p * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) m[j] = std::max(m[j], L[j]);
  }
  for (int64_t j = 0; j < W; ++j) s[j] = 0.f;
  for (int64_t p = 0; p < P; ++p) {
    float* L = logits + p * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      L[j] = exp_nonpositive(L[j] - m[j]);
      s[j] += L[j];
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < W; ++j) s[j] = 1.f / s[j];
  for (int64_t p = 0; p < P; ++p) {
    float* L = logits + p * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) L[j] *= s[j];
  }
  // out = sum over the window of weight * value
  for (int64_t c = 0; c < d; ++c) {
    float* o = out + c * HW + i * W;
    for (int64_t j = 0; j < W; ++j) o[j] = 0.f;
    for (int64_t a = 0; a < ks; ++a) {
      const int64_t kr = rs + a;
      for (int64_t b = 0; b < ks; ++b) {
        const float* L = logits + (a * ks + b) * W;
        const float* vp = v + c * HW + kr * W + b - r;
#pragma omp simd
        for (int64_t j = lo; j < hi; ++j) o[j] += L[j] * vp[j];
        for (int64_t j = 0; j < W; ++j) {
          if (j == lo) j = hi;
          if (j >= W) break;
          const int64_t kc = std::clamp<int64_t>(j - r, 0, W - ks) + b;
          o[j] += L[j] * v[c * HW + kr * W + kc];
        }
      }
    }
  }
}

at::Tensor neighborhood_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                          const at::Tensor& v_in,
                                          const c10::optional<at::Tensor>& rpb_in,
                                          int64_t heads, int64_t ks, double scale) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.sizes() == k_in.sizes() && q_in.sizes() == v_in.sizes(),
              "lmnet neighborhood_attention_forward: q, k and v must be (B, C, H, W) of one shape");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat &&
                  v_in.scalar_type() == at::kFloat && q_in.device().is_cpu(),
              "lmnet neighborhood_attention_forward: float32 CPU tensors only");
  const int64_t B = q_in.size(0), C = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  TORCH_CHECK(ks >= 1 && ks % 2 == 1 && H >= ks && W >= ks,
              "lmnet neighborhood_attention_forward: the window must be odd and fit the map");
  TORCH_CHECK(heads >= 1 && C % heads == 0,
              "lmnet neighborhood_attention_forward: the channels do not split into the heads");
  at::Tensor rpb;
  if (rpb_in.has_value() && rpb_in->defined()) {
    rpb = rpb_in->contiguous();
    TORCH_CHECK(rpb.scalar_type() == at::kFloat && rpb.dim() == 3 && rpb.size(0) == heads &&
                    rpb.size(1) == 2 * ks - 1 && rpb.size(2) == 2 * ks - 1,
                "lmnet neighborhood_attention_forward: the bias must be (heads, 2k - 1, 2k - 1)");
  }
  const auto q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  auto out = at::empty({B, C, H, W}, q.options());
  const int64_t d = C / heads, HW = H * W, nb = 2 * ks - 1;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* bp = rpb.defined() ? rpb.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * heads * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((ks * ks + 2) * W);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % H, bh = row / H, h = bh % heads;
      const int64_t base = bh * d * HW;  // (b, h * d) plane
      attend_row(qp + base, kp + base, vp + base, bp ? bp + h * nb * nb : nullptr, op + base, d,
                 H, W, ks, i, sc, scratch.data(), scratch.data() + ks * ks * W,
                 scratch.data() + (ks * ks + 1) * W);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmnet_native, m) {
  m.def("neighborhood_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? rpb, int heads, "
        "int ks, float scale) -> Tensor",
        &neighborhood_attention_forward);
}
