// Dropout whose mask is a hash of each element's position and two per-call keys:
//     keep[i] = (h(i, k0, k1) >> 8) >= threshold,   y[i] = x[i] * (keep[i] ? scale : 0),
// with h two rounds of a 32-bit integer mixer (xor-shift / multiply, "lowbias32") over the
// element's index in memory order. The backward applies the same mask to the gradient, recomputed
// from the keys, so no mask is stored between forward and backward.
//
// Why by hand: PyTorch's CPU dropout draws a whole float map of Bernoulli numbers, divides it by
// 1 - p, multiplies, and keeps that map for the backward (bernoulli_ alone was 4 % of a profiled
// LM-Net training step, in the transformers' MLPs at full resolution). Here one pass reads x and
// writes y, and each element's mask is a few integer operations on vector registers. The whole
// step with it against PyTorch's dropout: docs/performance.md (training, run 7).
//
// The mask depends on the keys and the index only: the same bits on any number of threads;
// lmnet/layers/dropout.py holds the same hash in PyTorch operations (the tests compare them).
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

// Works on one uint32_t or on a vector of eight (GCC and Clang vector extensions: -march=native
// picks the instructions, 32-bit multiplies on every vector instruction set of x86-64 since AVX2).
template <typename U>
inline U mix32(U x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));

at::Tensor dropout_apply(const at::Tensor& x, int64_t k0, int64_t k1, int64_t threshold,
                         double scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat,
              "dropout_apply: expected a float32 CPU tensor, got ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK(x.is_contiguous(), "dropout_apply: expected a contiguous tensor");
  TORCH_CHECK(k0 >= 0 && k0 <= 0xffffffffLL && k1 >= 0 && k1 <= 0xffffffffLL,
              "dropout_apply: keys must be 32-bit unsigned integers");
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t{1} << 24),
              "dropout_apply: threshold must lie in [0, 2^24], got ", threshold);
  auto y = at::empty_like(x);
  const int64_t n = x.numel();
  if (n == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const uint32_t key0 = static_cast<uint32_t>(k0), key1 = static_cast<uint32_t>(k1);
  const uint32_t thr = static_cast<uint32_t>(threshold);
  const float s = static_cast<float>(scale);
  at::parallel_for(0, n, int64_t{1} << 15, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end;) {
      // the index's high word is constant within each 2^32 elements: the inner loop is 32-bit
      const int64_t stop = std::min(end, ((start >> 32) + 1) << 32);
      const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(start) >> 32) ^ key1;
      const uint32_t lo = static_cast<uint32_t>(start);
      const float* xs = xp + start;
      float* ys = yp + start;
      const int64_t m = stop - start;
      int64_t j = 0;
      // eight elements at a time: the factor is scale's bits where kept, 0.0f's where dropped
      const u32x8 lanes = {0, 1, 2, 3, 4, 5, 6, 7};
      uint32_t sbits;
      std::memcpy(&sbits, &s, sizeof sbits);
      for (; j + 8 <= m; j += 8) {
        const u32x8 u = mix32(mix32((lo + static_cast<uint32_t>(j) + lanes) ^ key0) ^ hi);
        const u32x8 keep = (u32x8)((u >> 8) >= thr);  // all ones where kept
        const u32x8 fbits = keep & sbits;
        f32x8 f, v;
        std::memcpy(&f, &fbits, sizeof f);
        std::memcpy(&v, xs + j, sizeof v);
        v *= f;
        std::memcpy(ys + j, &v, sizeof v);
      }
      for (; j < m; ++j) {
        const uint32_t u = mix32(mix32((lo + static_cast<uint32_t>(j)) ^ key0) ^ hi);
        ys[j] = xs[j] * ((u >> 8) >= thr ? s : 0.0f);
      }
      start = stop;
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmnet_native, m) {
  m.def("dropout_apply(Tensor x, int k0, int k1, int threshold, float scale) -> Tensor",
        &dropout_apply);
}
