#include "vec.h"

#include <cmath>

namespace sae_sparse {
namespace vec {

namespace {
template <typename T, int kLanes>
inline T dot_impl(const T* a, const T* b, int64_t n) {
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  T s = 0;
  for (int l = 0; l < kLanes; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}
// Eight rows per pass over y (then four, then one): one load and store of y per eight rows
// instead of per row, and eight independent row streams in flight. The rows kPrefetch ahead
// are software-prefetched whole, since the row ids jump around a large matrix. On a 2-thread
// Xeon this took the fp32 decode from 0.63-0.86x F.embedding_bag's speed to 1.05-1.24x at
// D = 768 and 2304 (benchmarks/results/cpu-2026-11-30-decode-ab.md; tried and slower:
// register-blocking y by 64 columns across all k rows, 0.35-0.4x).
template <typename T>
inline void gather_sum_impl(int64_t k, const T* coef, const int64_t* idx, const T* W, int64_t D,
                            T* y) {
  constexpr int64_t kPrefetch = 8;
  constexpr int64_t kLine = 64 / sizeof(T);
  auto prefetch = [&](int64_t j) {
    if (j < k) {
      const T* r = W + idx[j] * D;
      for (int64_t d = 0; d < D; d += kLine) __builtin_prefetch(r + d);
    }
  };
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    for (int64_t q = 0; q < 8; ++q) prefetch(j + kPrefetch + q);
    const T* w[8];
    T c[8];
    for (int64_t q = 0; q < 8; ++q) {
      w[q] = W + idx[j + q] * D;
      c[q] = coef[j + q];
    }
    for (int64_t d = 0; d < D; ++d)
      y[d] += (((c[0] * w[0][d] + c[1] * w[1][d]) + (c[2] * w[2][d] + c[3] * w[3][d])) +
               ((c[4] * w[4][d] + c[5] * w[5][d]) + (c[6] * w[6][d] + c[7] * w[7][d])));
  }
  for (; j + 4 <= k; j += 4) {
    for (int64_t q = 0; q < 4; ++q) prefetch(j + kPrefetch + q);
    const T c0 = coef[j], c1 = coef[j + 1], c2 = coef[j + 2], c3 = coef[j + 3];
    const T* w0 = W + idx[j] * D;
    const T* w1 = W + idx[j + 1] * D;
    const T* w2 = W + idx[j + 2] * D;
    const T* w3 = W + idx[j + 3] * D;
    for (int64_t d = 0; d < D; ++d)
      y[d] += ((c0 * w0[d] + c1 * w1[d]) + c2 * w2[d]) + c3 * w3[d];
  }
  for (; j < k; ++j) {
    const T c = coef[j];
    const T* w = W + idx[j] * D;
    for (int64_t d = 0; d < D; ++d) y[d] += c * w[d];
  }
}
}  // namespace

SAE_SPARSE_CLONES void gather_sum(int64_t k, const float* coef, const int64_t* idx,
                                  const float* W, int64_t D, float* y) {
  gather_sum_impl<float>(k, coef, idx, W, D, y);
}
SAE_SPARSE_CLONES void gather_sum(int64_t k, const double* coef, const int64_t* idx,
                                  const double* W, int64_t D, double* y) {
  gather_sum_impl<double>(k, coef, idx, W, D, y);
}
SAE_SPARSE_CLONES float dot(const float* a, const float* b, int64_t n) {
  return dot_impl<float, 16>(a, b, n);
}
SAE_SPARSE_CLONES double dot(const double* a, const double* b, int64_t n) {
  return dot_impl<double, 8>(a, b, n);
}
SAE_SPARSE_CLONES void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}
SAE_SPARSE_CLONES void axpy(double alpha, const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}
SAE_SPARSE_CLONES void screen_hi(const uint16_t* tile, const float* bias, const float* wa,
                                 const float* wb, const float* bn, float ex, float xt, float ua,
                                 float* hi, float* e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = static_cast<uint32_t>(tile[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    const float a = f + bias[i];
    const float ei = ex * wa[i] + xt * wb[i] + ua * std::fabs(a) + bn[i];
    e[i] = ei;
    hi[i] = a + ei;
  }
}
SAE_SPARSE_CLONES void screen_hi(const float* tile, const float* bias, const float* wa,
                                 const float* wb, const float* bn, float ex, float xt, float ua,
                                 float* hi, float* e, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float a = tile[i] + bias[i];
    const float ei = ex * wa[i] + xt * wb[i] + ua * std::fabs(a) + bn[i];
    e[i] = ei;
    hi[i] = a + ei;
  }
}
SAE_SPARSE_CLONES int64_t first_ge(const float* v, float t, int64_t n) {
  constexpr int64_t kChunk = 32;
  int64_t i = 0;
  for (; i + kChunk <= n; i += kChunk) {
    int c = 0;
    for (int64_t j = 0; j < kChunk; ++j) c += v[i + j] >= t;
    if (c) break;
  }
  for (; i < n; ++i)
    if (v[i] >= t) return i;
  return n;
}

}  // namespace vec
}  // namespace sae_sparse
