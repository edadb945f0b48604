// Small vector helpers for the CPU kernels. On x86-64 with GCC each hot loop is compiled for
// AVX-512, AVX2 and baseline SSE2 and the loader picks one at run time (target_clones), so the
// extension stays portable without -march=native.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SAE_SPARSE_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SAE_SPARSE_CLONES
#endif

namespace sae_sparse {
namespace vec {

// Dot product with several independent accumulators (vectorisable without -ffast-math).
float dot(const float* a, const float* b, int64_t n);
double dot(const double* a, const double* b, int64_t n);
// y += alpha * x
void axpy(float alpha, const float* x, float* y, int64_t n);
void axpy(double alpha, const double* x, double* y, int64_t n);
// y[d] += sum_j coef[j] * W[idx[j] * D + d] for d in [0, D): a weighted gather of k rows of the
// row-major [*, D] matrix W, accumulated in registers one block of columns at a time.
void gather_sum(int64_t k, const float* coef, const int64_t* idx, const float* W, int64_t D,
                float* y);
void gather_sum(int64_t k, const double* coef, const int64_t* idx, const double* W, int64_t D,
                double* y);
// Screened upper bounds of one tile row: with a = float(tile[i]) + bias[i] and the error bound
//   e[i] = ex * wa[i] + xt * wb[i] + ua * |a| + bn[i],
// writes hi[i] = a + e[i] and e[i]. `tile` holds bfloat16 bit patterns or floats.
void screen_hi(const uint16_t* tile, const float* bias, const float* wa, const float* wb,
               const float* bn, float ex, float xt, float ua, float* hi, float* e, int64_t n);
void screen_hi(const float* tile, const float* bias, const float* wa, const float* wb,
               const float* bn, float ex, float xt, float ua, float* hi, float* e, int64_t n);
// Smallest i in [0, n) with v[i] >= t, or n.
int64_t first_ge(const float* v, float t, int64_t n);

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Weights stored narrower than the computation (bf16 / fp16 W with fp32 activations): the rows
// used are converted into `buf` first and the fp32 helpers above run on them, so the results
// are those of an fp32 copy of W without one. With TW == T the rows are used in place.
template <typename T, typename TW>
inline const T* row_as(const TW* w, int64_t D, std::vector<T>& buf) {
  if constexpr (std::is_same<T, TW>::value) {
    return w;
  } else {
    buf.resize(D);
    for (int64_t d = 0; d < D; ++d) buf[d] = static_cast<T>(w[d]);
    return buf.data();
  }
}

// gather_sum over rows idx[0..k) of a W of element type TW (see row_as).
template <typename T, typename TW>
inline void gather_sum_as(int64_t k, const T* coef, const int64_t* idx, const TW* W, int64_t D,
                          T* y, std::vector<T>& buf, std::vector<int64_t>& seq) {
  if constexpr (std::is_same<T, TW>::value) {
    gather_sum(k, coef, idx, W, D, y);
  } else {
    buf.resize(k * D);
    seq.resize(k);
    for (int64_t j = 0; j < k; ++j) {
      const TW* w = W + idx[j] * D;
      for (int64_t d = 0; d < D; ++d) buf[j * D + d] = static_cast<T>(w[d]);
      seq[j] = j;
    }
    gather_sum(k, coef, seq.data(), buf.data(), D, y);
  }
}

}  // namespace vec
}  // namespace sae_sparse
