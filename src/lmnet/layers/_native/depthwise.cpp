// The weight gradient of a depthwise convolution (groups == channels, stride 1) on channels-last
// float32 maps:
//     dW[c, i, j] = sum_{n, h, w} dy[n, c, h, w] * x[n, c, h - ph + i * dh, w - pw + j * dw],
// terms outside the input (zero padding) left out.
//
// Why by hand: oneDNN (PyTorch's CPU convolutions) has a depthwise kernel for the weight
// gradient of a 3 x 3 only; a 5 x 5 or 7 x 7 (LM-Net's largest branch, and every deployed
// multi-branch block) falls to its grouped convolution kernel, which works in blocks of 16 x 16
// channels of which one diagonal is used: 71 ms at 8 x 24 x 256 x 256 for the 5 x 5, against
// 4.5 ms for the 3 x 3 (docs/performance.md). Here each tap is one multiply-add per channel and
// pixel, the channels of a pixel contiguous, so the inner loop is a vector loop over channels.
//
// Rows of the output (n, h) are summed in float, each row's sums added in double into one of a
// fixed number of chunks, and the chunks added in order: the same bits on any number of threads.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunks = 64;

// Eight floats (one AVX register; GCC and Clang vector extensions, so no intrinsics and no
// instruction set is named here: -march=native picks the instructions)
typedef float v8 __attribute__((vector_size(32)));

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// One row of output (g: Wo pixels of C channels) against one input row (xr: W pixels), for the
// KW taps of one kernel row and the channels [c0, c0 + 8 * CB): a[j * C + c] += sum_wo g * x.
// The KW x CB sums stay in registers across the row's interior columns (where every tap lies in
// the input); the few border columns are summed one tap at a time.
template <int KW, int CB>
void row_block(const float* g, const float* xr, float* a, int64_t C, int64_t c0, int64_t Wo,
               int64_t W, int64_t pw, int64_t dw) {
  int64_t off[KW];
  for (int j = 0; j < KW; ++j) off[j] = j * dw - pw;  // input column = output column + off[j]
  const int64_t lo = std::min<int64_t>(Wo, std::max<int64_t>(0, -off[0]));
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(Wo, W - off[KW - 1]));
  v8 acc[KW][CB];
  for (int j = 0; j < KW; ++j)
    for (int b = 0; b < CB; ++b) acc[j][b] = v8{0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t wo = lo; wo < hi; ++wo) {
    const float* gp = g + wo * C + c0;
    v8 gv[CB];
#pragma GCC unroll 4
    for (int b = 0; b < CB; ++b) gv[b] = load8(gp + 8 * b);
#pragma GCC unroll 8
    for (int j = 0; j < KW; ++j) {
      const float* xp = xr + (wo + off[j]) * C + c0;
#pragma GCC unroll 4
      for (int b = 0; b < CB; ++b) acc[j][b] += gv[b] * load8(xp + 8 * b);
    }
  }
  for (int j = 0; j < KW; ++j)
    for (int b = 0; b < CB; ++b)
      for (int l = 0; l < 8; ++l) a[j * C + c0 + 8 * b + l] += acc[j][b][l];
  // border columns: the taps that fall inside the input
  for (int64_t wo = 0; wo < Wo; ++wo) {
    if (wo == lo) wo = hi;
    if (wo >= Wo) break;
    const float* gp = g + wo * C;
    for (int j = 0; j < KW; ++j) {
      const int64_t wi = wo + off[j];
      if (wi < 0 || wi >= W) continue;
      const float* xp = xr + wi * C;
      for (int64_t c = c0; c < c0 + 8 * CB; ++c) a[j * C + c] += gp[c] * xp[c];
    }
  }
}

// Any kernel width and channels [c0, c1), one tap at a time (the general case and the channels
// left over from the blocks of eight).
void row_plain(const float* g, const float* xr, float* a, int64_t C, int64_t c0, int64_t c1,
               int64_t kw, int64_t Wo, int64_t W, int64_t pw, int64_t dw) {
  for (int64_t j = 0; j < kw; ++j) {
    const int64_t off = j * dw - pw;
    const int64_t lo = std::max<int64_t>(0, -off), hi = std::min<int64_t>(Wo, W - off);
    float* aj = a + j * C;
    for (int64_t wo = lo; wo < hi; ++wo) {
      const float* gv = g + wo * C;
      const float* xv = xr + (wo + off) * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) aj[c] += gv[c] * xv[c];
    }
  }
}

template <int KW>
void row_all(const float* g, const float* xr, float* a, int64_t C, int64_t Wo, int64_t W,
             int64_t pw, int64_t dw) {
  const int64_t blocks = C / 8;
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) row_block<KW, 2>(g, xr, a, C, 8 * b, Wo, W, pw, dw);
  if (b < blocks) row_block<KW, 1>(g, xr, a, C, 8 * b, Wo, W, pw, dw);
  if (8 * blocks < C) row_plain(g, xr, a, C, 8 * blocks, C, KW, Wo, W, pw, dw);
}

// a (kw * C floats) += one kernel row's sums over one output row
void row_sums(const float* g, const float* xr, float* a, int64_t C, int64_t kw, int64_t Wo,
              int64_t W, int64_t pw, int64_t dw) {
  switch (kw) {
    case 1: return row_all<1>(g, xr, a, C, Wo, W, pw, dw);
    case 3: return row_all<3>(g, xr, a, C, Wo, W, pw, dw);
    case 5: return row_all<5>(g, xr, a, C, Wo, W, pw, dw);
    case 7: return row_all<7>(g, xr, a, C, Wo, W, pw, dw);
    default: return row_plain(g, xr, a, C, 0, C, kw, Wo, W, pw, dw);
  }
}

// The input gradient: for one output row of dx (W pixels of C channels, in memory `o`) and one
// kernel row of one branch (its weights w: KW taps of C channels, taps contiguous by channel),
// o[wi] += sum_j w[j] * g[wi - off[j]] with g that branch's gradient row. As in row_block, the
// KW x CB weights stay in registers across the interior columns.
template <int KW, int CB>
void in_block(const float* g, const float* w, float* o, int64_t C, int64_t c0, int64_t Wo,
              int64_t W, int64_t pw, int64_t dw) {
  int64_t off[KW];
  for (int j = 0; j < KW; ++j) off[j] = j * dw - pw;  // input column = output column + off[j]
  // dx column wi takes g[wi - off[j]]: every tap inside g for wi in [lo, hi)
  const int64_t lo = std::min<int64_t>(W, std::max<int64_t>(0, off[KW - 1]));
  const int64_t hi = std::max<int64_t>(lo, std::min<int64_t>(W, Wo + off[0]));
  v8 wv[KW][CB];
  for (int j = 0; j < KW; ++j)
    for (int b = 0; b < CB; ++b) wv[j][b] = load8(w + j * C + c0 + 8 * b);
  for (int64_t wi = lo; wi < hi; ++wi) {
    float* op = o + wi * C + c0;
    v8 acc[CB];
#pragma GCC unroll 4
    for (int b = 0; b < CB; ++b) acc[b] = load8(op + 8 * b);
#pragma GCC unroll 8
    for (int j = 0; j < KW; ++j) {
      const float* gp = g + (wi - off[j]) * C + c0;
#pragma GCC unroll 4
      for (int b = 0; b < CB; ++b) acc[b] += wv[j][b] * load8(gp + 8 * b);
    }
    for (int b = 0; b < CB; ++b) std::memcpy(op + 8 * b, &acc[b], sizeof(v8));
  }
  for (int64_t wi = 0; wi < W; ++wi) {
    if (wi == lo) wi = hi;
    if (wi >= W) break;
    float* op = o + wi * C;
    for (int j = 0; j < KW; ++j) {
      const int64_t wo = wi - off[j];
      if (wo < 0 || wo >= Wo) continue;
      const float* gp = g + wo * C;
      const float* wj = w + j * C;
      for (int64_t c = c0; c < c0 + 8 * CB; ++c) op[c] += wj[c] * gp[c];
    }
  }
}

void in_plain(const float* g, const float* w, float* o, int64_t C, int64_t c0, int64_t c1,
              int64_t kw, int64_t Wo, int64_t W, int64_t pw, int64_t dw) {
  for (int64_t j = 0; j < kw; ++j) {
    const int64_t off = j * dw - pw;
    const int64_t lo = std::max<int64_t>(0, off), hi = std::min<int64_t>(W, Wo + off);
    const float* wj = w + j * C;
    for (int64_t wi = lo; wi < hi; ++wi) {
      float* op = o + wi * C;
      const float* gp = g + (wi - off) * C;
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c) op[c] += wj[c] * gp[c];
    }
  }
}

template <int KW>
void in_all(const float* g, const float* w, float* o, int64_t C, int64_t Wo, int64_t W,
            int64_t pw, int64_t dw) {
  const int64_t blocks = C / 8;
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) in_block<KW, 2>(g, w, o, C, 8 * b, Wo, W, pw, dw);
  if (b < blocks) in_block<KW, 1>(g, w, o, C, 8 * b, Wo, W, pw, dw);
  if (8 * blocks < C) in_plain(g, w, o, C, 8 * blocks, C, KW, Wo, W, pw, dw);
}

void in_sums(const float* g, const float* w, float* o, int64_t C, int64_t kw, int64_t Wo,
             int64_t W, int64_t pw, int64_t dw) {
  switch (kw) {
    case 1: return in_all<1>(g, w, o, C, Wo, W, pw, dw);
    case 3: return in_all<3>(g, w, o, C, Wo, W, pw, dw);
    case 5: return in_all<5>(g, w, o, C, Wo, W, pw, dw);
    case 7: return in_all<7>(g, w, o, C, Wo, W, pw, dw);
    default: return in_plain(g, w, o, C, 0, C, kw, Wo, W, pw, dw);
  }
}

}  // namespace

at::Tensor depthwise_weight_grad(const at::Tensor& dy, const at::Tensor& x, int64_t kh, int64_t kw,
                                 int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  TORCH_CHECK(x.dim() == 4 && dy.dim() == 4, "lmnet depthwise_weight_grad: 4-D maps expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && dy.scalar_type() == at::kFloat && x.device().is_cpu() &&
              dy.device().is_cpu(), "lmnet depthwise_weight_grad: float32 CPU maps expected");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
              dy.is_contiguous(at::MemoryFormat::ChannelsLast),
              "lmnet depthwise_weight_grad: maps must be channels-last");
  TORCH_CHECK(kh >= 1 && kw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 && pw >= 0,
              "lmnet depthwise_weight_grad: kernel and dilation must be positive, padding >= 0");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = H + 2 * ph - dh * (kh - 1), Wo = W + 2 * pw - dw * (kw - 1);
  TORCH_CHECK(Ho > 0 && Wo > 0 && dy.size(0) == N && dy.size(1) == C && dy.size(2) == Ho &&
              dy.size(3) == Wo, "lmnet depthwise_weight_grad: dy's shape does not fit x, kernel "
              "and padding (stride 1)");
  TORCH_CHECK(N * C * H * W > 0, "lmnet depthwise_weight_grad: empty maps");
  const int64_t taps = kh * kw, rows = N * Ho;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, kChunks));
  std::vector<double> partial(chunks * taps * C, 0.0);
  const float* xp = x.data_ptr<float>();
  const float* gp = dy.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    std::vector<float> acc(taps * C);
    for (int64_t chunk = cb; chunk < ce; ++chunk) {
      double* total = partial.data() + chunk * taps * C;
      const int64_t r0 = rows * chunk / chunks, r1 = rows * (chunk + 1) / chunks;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t n = r / Ho, ho = r % Ho;
        const float* g = gp + r * Wo * C;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t hi = ho - ph + i * dh;
          if (hi < 0 || hi >= H) continue;
          row_sums(g, xp + (n * H + hi) * W * C, acc.data() + i * kw * C, C, kw, Wo, W, pw, dw);
        }
        for (int64_t t = 0; t < taps * C; ++t) total[t] += acc[t];
      }
    }
  });
  auto out = at::zeros({C, 1, kh, kw}, x.options().memory_format(at::MemoryFormat::Contiguous));
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < taps; ++t)
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) s += partial[(chunk * taps + t) * C + c];
      o[c * taps + t] = static_cast<float>(s);
    }
  return out;
}

// dx = sum_b (input gradient of depthwise convolution b, stride 1, zero padding) for K branches
// that read the same input of H x W: dys[b] is branch b's output gradient (channels-last),
// weights[b] its (C, 1, kh, kw) kernel, geometry[b] = (ph, pw, dh, dw). One pass writes dx once
// (PyTorch: one input gradient per branch, then K - 1 additions of whole maps). Each dx row is
// written by one thread, in a fixed order: the same bits on any number of threads.
at::Tensor depthwise_input_grad(const std::vector<at::Tensor>& dys,
                                const std::vector<at::Tensor>& weights,
                                const std::vector<int64_t>& geometry, int64_t H, int64_t W) {
  const int64_t K = static_cast<int64_t>(dys.size());
  TORCH_CHECK(K >= 1 && static_cast<int64_t>(weights.size()) == K &&
              static_cast<int64_t>(geometry.size()) == 4 * K,
              "lmnet depthwise_input_grad: one gradient, one kernel and four geometry numbers "
              "(ph, pw, dh, dw) per branch");
  TORCH_CHECK(H > 0 && W > 0, "lmnet depthwise_input_grad: empty input");
  const int64_t N = dys[0].size(0), C = dys[0].size(1);
  TORCH_CHECK(N > 0 && C > 0, "lmnet depthwise_input_grad: empty maps");
  std::vector<const float*> gp(K), wp(K);
  std::vector<at::Tensor> wt(K);  // (kh, kw, C): a tap's channels contiguous
  std::vector<int64_t> kh(K), kw(K), Ho(K), Wo(K);
  for (int64_t b = 0; b < K; ++b) {
    const auto& g = dys[b];
    const auto& w = weights[b];
    TORCH_CHECK(g.dim() == 4 && g.scalar_type() == at::kFloat && g.device().is_cpu() &&
                g.is_contiguous(at::MemoryFormat::ChannelsLast),
                "lmnet depthwise_input_grad: gradients must be channels-last float32 CPU maps");
    TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kFloat && w.device().is_cpu() &&
                w.size(0) == C && w.size(1) == 1,
                "lmnet depthwise_input_grad: kernels must be (C, 1, kh, kw) float32");
    const int64_t ph = geometry[4 * b], pw = geometry[4 * b + 1];
    const int64_t dh = geometry[4 * b + 2], dw = geometry[4 * b + 3];
    TORCH_CHECK(ph >= 0 && pw >= 0 && dh >= 1 && dw >= 1,
                "lmnet depthwise_input_grad: padding >= 0 and dilation >= 1");
    kh[b] = w.size(2);
    kw[b] = w.size(3);
    Ho[b] = H + 2 * ph - dh * (kh[b] - 1);
    Wo[b] = W + 2 * pw - dw * (kw[b] - 1);
    TORCH_CHECK(g.size(0) == N && g.size(1) == C && g.size(2) == Ho[b] && g.size(3) == Wo[b],
                "lmnet depthwise_input_grad: a gradient's shape does not fit the input, its "
                "kernel and padding (stride 1)");
    wt[b] = w.reshape({C, kh[b] * kw[b]}).t().contiguous();
    gp[b] = g.data_ptr<float>();
    wp[b] = wt[b].data_ptr<float>();
  }
  auto dx = at::empty({N, C, H, W}, dys[0].options().memory_format(at::MemoryFormat::ChannelsLast));
  float* op = dx.data_ptr<float>();
  at::parallel_for(0, N * H, 1, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t n = r / H, hi = r % H;
      float* o = op + r * W * C;
      std::fill(o, o + W * C, 0.f);
      for (int64_t b = 0; b < K; ++b) {
        const int64_t ph = geometry[4 * b], pw = geometry[4 * b + 1];
        const int64_t dh = geometry[4 * b + 2], dw = geometry[4 * b + 3];
        for (int64_t i = 0; i < kh[b]; ++i) {
          const int64_t ho = hi + ph - i * dh;  // the gradient row that tap row i reads here
          if (ho < 0 || ho >= Ho[b]) continue;
          in_sums(gp[b] + (n * Ho[b] + ho) * Wo[b] * C, wp[b] + i * kw[b] * C, o, C, kw[b],
                  Wo[b], W, pw, dw);
        }
      }
    }
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(lmnet_native, m) {
  m.def("depthwise_weight_grad(Tensor dy, Tensor x, int kh, int kw, int ph, int pw, int dh, int dw)"
        " -> Tensor", &depthwise_weight_grad);
  m.def("depthwise_input_grad(Tensor[] dys, Tensor[] weights, int[] geometry, int H, int W)"
        " -> Tensor", &depthwise_input_grad);
}
