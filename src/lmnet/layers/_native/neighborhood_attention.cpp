// 2-D neighborhood attention, forward and backward, on channels-first float32 maps
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
#include <ATen/ATen.h>
#include <torch/library.h>
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

// The softmax weights of row i of queries of one (batch, head) over their windows: q, k point at
// the head's d channels (plane stride HW); w[p * W + j], p = a * ks + b, receives the weight of
// window position (a, b) of query (i, j); m and s are two W-float scratch buffers.
void row_weights(const float* q, const float* k, const float* bias, int64_t d, int64_t H,
                 int64_t W, int64_t ks, int64_t i, float scale, float* w, float* m, float* s) {
  const int64_t HW = H * W, r = ks / 2, nb = 2 * ks - 1;
  const int64_t rs = std::clamp<int64_t>(i - r, 0, H - ks);
  const int64_t lo = std::min<int64_t>(r, W), hi = std::max<int64_t>(lo, W - r);
  // the logits: the interior columns [lo, hi), whose window starts at j - r, as vector loops
  // over j; the r border columns on each side one by one.
  for (int64_t a = 0; a < ks; ++a) {
    const int64_t kr = rs + a, brow = kr - i + ks - 1;
    for (int64_t b = 0; b < ks; ++b) {
      float* L = w + (a * ks + b) * W;
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
  for (int64_t j = 0; j < W; ++j) m[j] = w[j];
  for (int64_t p = 1; p < P; ++p) {
    const float* L = w + p * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) m[j] = std::max(m[j], L[j]);
  }
  for (int64_t j = 0; j < W; ++j) s[j] = 0.f;
  for (int64_t p = 0; p < P; ++p) {
    float* L = w + p * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) {
      L[j] = exp_nonpositive(L[j] - m[j]);
      s[j] += L[j];
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < W; ++j) s[j] = 1.f / s[j];
  for (int64_t p = 0; p < P; ++p) {
    float* L = w + p * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) L[j] *= s[j];
  }
}

// dst[j] += a[j] * src[kr, kc], over a row j of queries, kc = clamp(j - r, 0, W - ks) + b the
// column of their window's position b; src is one channel's (H, W) plane. The interior columns
// as one vector loop (their window starts at j - r), the r border columns on each side one by one.
inline void add_window_products(float* dst, const float* a, const float* src, int64_t kr,
                                int64_t b, int64_t W, int64_t ks) {
  const int64_t r = ks / 2;
  const int64_t lo = std::min<int64_t>(r, W), hi = std::max<int64_t>(lo, W - r);
  const float* sp = src + kr * W + b - r;
#pragma omp simd
  for (int64_t j = lo; j < hi; ++j) dst[j] += a[j] * sp[j];
  for (int64_t j = 0; j < W; ++j) {
    if (j == lo) j = hi;
    if (j >= W) break;
    dst[j] += a[j] * src[kr * W + std::clamp<int64_t>(j - r, 0, W - ks) + b];
  }
}

// Row i of the output: out = sum over the window of weight * value, v and out as q above.
void attend_row(const float* q, const float* k, const float* v, const float* bias, float* out,
                int64_t d, int64_t H, int64_t W, int64_t ks, int64_t i, float scale,
                float* w, float* m, float* s) {
  row_weights(q, k, bias, d, H, W, ks, i, scale, w, m, s);
  const int64_t HW = H * W;
  const int64_t rs = std::clamp<int64_t>(i - ks / 2, 0, H - ks);
  for (int64_t c = 0; c < d; ++c) {
    float* o = out + c * HW + i * W;
    for (int64_t j = 0; j < W; ++j) o[j] = 0.f;
    for (int64_t a = 0; a < ks; ++a)
      for (int64_t b = 0; b < ks; ++b)
        add_window_products(o, w + (a * ks + b) * W, v + c * HW, rs + a, b, W, ks);
  }
}

// The backward of row i (training): the weights w recomputed from q and k (cheaper than keeping
// a ks * ks map per head from the forward and reading it back), then with g = d out:
//     dw[p] = sum_c g[c] v[c, key_p]            dl[p] = w[p] (dw[p] - sum_p' w[p'] dw[p'])
//     dq[c] = scale sum_p dl[p] k[c, key_p]     dk[c, key_p] += scale q[c] dl[p]
//     dv[c, key_p] += w[p] g[c]                 dbias[key_p - (i, j) + ks - 1] += dl[p]
// dq's row is written, dk and dv accumulate into the plane (the caller zero-fills them; one
// thread owns a plane), dbias into the plane's nb * nb doubles. dl is a ks * ks * W buffer.
void attend_row_backward(const float* q, const float* k, const float* v, const float* bias,
                         const float* g, float* dq, float* dk, float* dv, double* dbias,
                         int64_t d, int64_t H, int64_t W, int64_t ks, int64_t i, float scale,
                         float* w, float* dl, float* m, float* s) {
  row_weights(q, k, bias, d, H, W, ks, i, scale, w, m, s);
  const int64_t HW = H * W, r = ks / 2, nb = 2 * ks - 1, P = ks * ks;
  const int64_t rs = std::clamp<int64_t>(i - r, 0, H - ks);
  const int64_t lo = std::min<int64_t>(r, W), hi = std::max<int64_t>(lo, W - r);
  // dw into dl
  for (int64_t a = 0; a < ks; ++a) {
    for (int64_t b = 0; b < ks; ++b) {
      float* D = dl + (a * ks + b) * W;
      for (int64_t j = 0; j < W; ++j) D[j] = 0.f;
      for (int64_t c = 0; c < d; ++c)
        add_window_products(D, g + c * HW + i * W, v + c * HW, rs + a, b, W, ks);
    }
  }
  // the softmax's backward: dl = w (dw - sum_p w dw)
  for (int64_t j = 0; j < W; ++j) m[j] = 0.f;
  for (int64_t p = 0; p < P; ++p) {
    const float* L = w + p * W;
    const float* D = dl + p * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) m[j] += L[j] * D[j];
  }
  for (int64_t p = 0; p < P; ++p) {
    const float* L = w + p * W;
    float* D = dl + p * W;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) D[j] = L[j] * (D[j] - m[j]);
  }
  // the bias: one table entry per window position inside, the border's column by column
  if (dbias) {
    for (int64_t a = 0; a < ks; ++a) {
      const int64_t brow = rs + a - i + ks - 1;
      for (int64_t b = 0; b < ks; ++b) {
        const float* D = dl + (a * ks + b) * W;
        float inner = 0.f;
#pragma omp simd reduction(+ : inner)
        for (int64_t j = lo; j < hi; ++j) inner += D[j];
        dbias[brow * nb + b + r] += inner;
        for (int64_t j = 0; j < W; ++j) {
          if (j == lo) j = hi;
          if (j >= W) break;
          const int64_t kc = std::clamp<int64_t>(j - r, 0, W - ks) + b;
          dbias[brow * nb + kc - j + ks - 1] += D[j];
        }
      }
    }
  }
  // dq, dk and dv, channel by channel
  for (int64_t c = 0; c < d; ++c) {
    const float* qr = q + c * HW + i * W;
    const float* gr = g + c * HW + i * W;
    float* dqr = dq + c * HW + i * W;
    for (int64_t j = 0; j < W; ++j) dqr[j] = 0.f;
    for (int64_t a = 0; a < ks; ++a) {
      const int64_t kr = rs + a;
      for (int64_t b = 0; b < ks; ++b) {
        const float* L = w + (a * ks + b) * W;
        const float* D = dl + (a * ks + b) * W;
        const int64_t off = c * HW + kr * W + b - r;
        const float* kp = k + off;
        float* dkp = dk + off;
        float* dvp = dv + off;
#pragma omp simd
        for (int64_t j = lo; j < hi; ++j) {
          dqr[j] += D[j] * kp[j];
          dkp[j] += D[j] * (qr[j] * scale);
          dvp[j] += L[j] * gr[j];
        }
        for (int64_t j = 0; j < W; ++j) {
          if (j == lo) j = hi;
          if (j >= W) break;
          const int64_t at = c * HW + kr * W + std::clamp<int64_t>(j - r, 0, W - ks) + b;
          dqr[j] += D[j] * k[at];
          dk[at] += D[j] * (qr[j] * scale);
          dv[at] += L[j] * gr[j];
        }
      }
    }
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) dqr[j] *= scale;
  }
}

// The inputs' checks, shared by the forward and the backward; returns the bias, contiguous
// (undefined where there is none).
at::Tensor check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const c10::optional<at::Tensor>& rpb_in,
                        int64_t heads, int64_t ks) {
  TORCH_CHECK(q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(), "lmnet ", op,
              ": q, k and v must be (B, C, H, W) of one shape");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat && q.device().is_cpu() && k.device().is_cpu() &&
                  v.device().is_cpu(),
              "lmnet ", op, ": float32 CPU tensors only");
  const int64_t C = q.size(1), H = q.size(2), W = q.size(3);
  TORCH_CHECK(ks >= 1 && ks % 2 == 1 && H >= ks && W >= ks, "lmnet ", op,
              ": the window must be odd and fit the map");
  TORCH_CHECK(heads >= 1 && C % heads == 0, "lmnet ", op,
              ": the channels do not split into the heads");
  at::Tensor rpb;
  if (rpb_in.has_value() && rpb_in->defined()) {
    rpb = rpb_in->contiguous();
    TORCH_CHECK(rpb.scalar_type() == at::kFloat && rpb.device().is_cpu() && rpb.dim() == 3 &&
                    rpb.size(0) == heads && rpb.size(1) == 2 * ks - 1 &&
                    rpb.size(2) == 2 * ks - 1,
                "lmnet ", op, ": the bias must be (heads, 2k - 1, 2k - 1)");
  }
  return rpb;
}

// t itself where each batch element's (C, H, W) block is contiguous (a slice of channels of a
// larger map too, such as q, k and v cut from one qkv projection), else a contiguous copy; the
// kernels index a batch element by the tensor's own batch stride.
at::Tensor planes(const at::Tensor& t) {
  const int64_t H = t.size(2), W = t.size(3);
  if (t.stride(3) == 1 && t.stride(2) == W && t.stride(1) == H * W) return t;
  return t.contiguous();
}

at::Tensor neighborhood_attention_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                          const at::Tensor& v_in,
                                          const c10::optional<at::Tensor>& rpb_in,
                                          int64_t heads, int64_t ks, double scale) {
  const at::Tensor rpb = check_inputs("neighborhood_attention_forward", q_in, k_in, v_in, rpb_in,
                                      heads, ks);
  const int64_t B = q_in.size(0), C = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const auto q = planes(q_in), k = planes(k_in), v = planes(v_in);
  auto out = at::empty({B, C, H, W}, q.options());
  const int64_t sq = q.stride(0), sk = k.stride(0), sv = v.stride(0);
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
      const int64_t i = row % H, bh = row / H, h = bh % heads, b = bh / heads;
      const int64_t hp = h * d * HW;  // (b, h * d) plane
      attend_row(qp + b * sq + hp, kp + b * sk + hp, vp + b * sv + hp,
                 bp ? bp + h * nb * nb : nullptr, op + bh * d * HW, d,
                 H, W, ks, i, sc, scratch.data(), scratch.data() + ks * ks * W,
                 scratch.data() + (ks * ks + 1) * W);
    }
  });
  return out;
}

// The gradients of neighborhood_attention_forward's inputs given that of its output: dq, dk, dv
// (B, C, H, W) and the bias's (heads, 2k - 1, 2k - 1), empty where there is no bias. One thread
// owns a (batch, head) plane, whose keys and values only its own queries read, so dk and dv
// accumulate without contention; the bias's gradient is summed per plane in double, then over
// the batch in a fixed order, so the bits do not depend on the thread count. one_tensor: dq, dk
// and dv are the three channel slices of one (B, 3C, H, W) tensor, returned fifth (the gradient
// of a qkv map that q, k and v were cut from); else the fifth is empty.
std::vector<at::Tensor> neighborhood_attention_backward(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const c10::optional<at::Tensor>& rpb_in, int64_t heads, int64_t ks,
    double scale, bool one_tensor) {
  const at::Tensor rpb = check_inputs("neighborhood_attention_backward", q_in, k_in, v_in, rpb_in,
                                      heads, ks);
  TORCH_CHECK(grad_in.sizes() == q_in.sizes() && grad_in.scalar_type() == at::kFloat &&
                  grad_in.device().is_cpu(),
              "lmnet neighborhood_attention_backward: the gradient must be float32 of q's shape");
  const int64_t B = q_in.size(0), C = q_in.size(1), H = q_in.size(2), W = q_in.size(3);
  const auto q = planes(q_in), k = planes(k_in), v = planes(v_in);
  const auto g = grad_in.contiguous();
  at::Tensor dq, dk, dv, dqkv = at::empty({0}, q.options());
  if (one_tensor) {
    dqkv = at::zeros({B, 3 * C, H, W}, q.options());
    dq = dqkv.narrow(1, 0, C);
    dk = dqkv.narrow(1, C, C);
    dv = dqkv.narrow(1, 2 * C, C);
  } else {
    dq = at::empty({B, C, H, W}, q.options());
    dk = at::zeros({B, C, H, W}, q.options());
    dv = at::zeros({B, C, H, W}, q.options());
  }
  const int64_t sq = q.stride(0), sk = k.stride(0), sv = v.stride(0), sd = dq.stride(0);
  const int64_t d = C / heads, HW = H * W, nb = 2 * ks - 1, P = ks * ks;
  std::vector<double> dbias(rpb.defined() ? B * heads * nb * nb : 0, 0.0);
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  const float* bp = rpb.defined() ? rpb.data_ptr<float>() : nullptr;
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk.data_ptr<float>();
  float* dvp = dv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch((2 * P + 2) * W);
    float* w = scratch.data();
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t h = bh % heads, b = bh / heads, hp = h * d * HW, od = b * sd + hp;
      double* db = bp ? dbias.data() + bh * nb * nb : nullptr;
      for (int64_t i = 0; i < H; ++i)
        attend_row_backward(qp + b * sq + hp, kp + b * sk + hp, vp + b * sv + hp,
                            bp ? bp + h * nb * nb : nullptr, gp + bh * d * HW, dqp + od,
                            dkp + od, dvp + od, db, d, H, W, ks, i, sc, w, w + P * W,
                            w + 2 * P * W, w + (2 * P + 1) * W);
    }
  });
  at::Tensor drpb = at::empty({0}, q.options());
  if (bp) {
    drpb = at::empty({heads, nb, nb}, q.options());
    float* out = drpb.data_ptr<float>();
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t e = 0; e < nb * nb; ++e) {
        double acc = 0.0;
        for (int64_t b = 0; b < B; ++b) acc += dbias[(b * heads + h) * nb * nb + e];
        out[h * nb * nb + e] = static_cast<float>(acc);
      }
  }
  return {dq, dk, dv, drpb, dqkv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmnet_native, m) {
  m.def("neighborhood_attention_forward(Tensor q, Tensor k, Tensor v, Tensor? rpb, int heads, "
        "int ks, float scale) -> Tensor",
        &neighborhood_attention_forward);
  m.def("neighborhood_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor? rpb, "
        "int heads, int ks, float scale, bool one_tensor=False) -> Tensor[]",
        &neighborhood_attention_backward);
}
