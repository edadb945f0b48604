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
// Rows are streamed whole (so the hardware prefetcher sees contiguous lines) and the row
// kPrefetch ahead is software-prefetched, since the row ids jump around a large matrix.
template <typename T>
inline void gather_sum_impl(int64_t k, const T* coef, const int64_t* idx, const T* W, int64_t D,
                            T* y) {
  constexpr int64_t kPrefetch = 2;
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t j = 0; j < k; ++j) {
    if (j + kPrefetch < k) {
      const T* nxt = W + idx[j + kPrefetch] * D;
      for (int64_t d = 0; d < D; d += kLine) __builtin_prefetch(nxt + d);
    }
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
