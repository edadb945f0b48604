// Standalone C++ test of the CPU kernels against dense ATen definitions (no Python).
// Built by CMakeLists.txt and run by ctest; exits non-zero on the first mismatch.
#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "sae_sparse.h"

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  }
}

bool close(const at::Tensor& a, const at::Tensor& b, double tol) {
  return a.sizes() == b.sizes() && (a - b).abs().max().item<double>() <= tol;
}

// Dense top-k with ties broken by the smaller index.
std::tuple<at::Tensor, at::Tensor> dense_topk(const at::Tensor& pre, int64_t k) {
  auto sorted = at::sort(pre, /*stable=*/true, /*dim=*/1, /*descending=*/true);
  at::Tensor idx = std::get<1>(sorted).narrow(1, 0, k).contiguous();
  return {pre.gather(1, idx), idx};
}

void test_encode(int64_t N, int64_t D, int64_t S, int64_t k, bool with_b_pre) {
  auto opt = at::TensorOptions().dtype(at::kDouble);
  at::Tensor x = at::randn({N, D}, opt), W = at::randn({S, D}, opt) / std::sqrt(double(D));
  at::Tensor b = at::randn({S}, opt) * 0.1;
  at::Tensor b_pre = with_b_pre ? at::randn({D}, opt) * 0.1 : at::Tensor();
  auto [v, i, over] = sae_sparse::topk_encode_cpu(x, W, b, k, b_pre, at::Tensor());
  at::Tensor xc = with_b_pre ? x - b_pre : x;
  at::Tensor pre = at::addmm(b, xc, W.t());
  auto [rv, ri] = dense_topk(pre, k);
  std::string tag = "encode N=" + std::to_string(N) + " D=" + std::to_string(D) +
                    " S=" + std::to_string(S) + " k=" + std::to_string(k);
  expect(at::equal(i, ri), tag + ": indices");
  expect(close(v, rv.clamp_min(0), 1e-12), tag + ": values");
  at::Tensor n_active = (pre > 0).sum(1);
  expect(at::equal(over, n_active > k), tag + ": overflow");
}

// float32: the direct path (few rows, exact fp32 tiles) and the screened path (bf16 or fp32
// screening + exact recompute) against a dense fp64 reference on the same fp32 inputs.
void test_encode_f32(int64_t N, int64_t D, int64_t S, int64_t k) {
  auto opt = at::TensorOptions().dtype(at::kFloat);
  at::Tensor x = at::randn({N, D}, opt), W = at::randn({S, D}, opt) / std::sqrt(double(D));
  at::Tensor b = at::randn({S}, opt) * 0.1;
  auto [v, i, over] = sae_sparse::topk_encode_cpu(x, W, b, k, at::Tensor(), at::Tensor());
  at::Tensor pre = at::addmm(b.to(at::kDouble), x.to(at::kDouble), W.to(at::kDouble).t());
  auto [rv, ri] = dense_topk(pre, k);
  std::string tag = "encode f32 N=" + std::to_string(N) + " S=" + std::to_string(S);
  expect(at::equal(i, ri), tag + ": indices");
  expect(close(v.to(at::kDouble), rv.clamp_min(0), 1e-5), tag + ": values");
}

void test_decode_and_segments() {
  auto opt = at::TensorOptions().dtype(at::kDouble);
  const int64_t N = 9, D = 13, S = 70, k = 5;
  at::Tensor v = at::randn({N, k}, opt);
  at::Tensor i = at::randint(S, {N, k}, opt.dtype(at::kLong));
  at::Tensor W = at::randn({S, D}, opt), b = at::randn({D}, opt);
  auto [y, h] = sae_sparse::edit_decode_fwd_cpu(at::Tensor(), v, i, W, b, at::Tensor(),
                                                at::Tensor(), at::Tensor(), at::Tensor(),
                                                at::Tensor(), sae_sparse::kIdentity,
                                                sae_sparse::kPlain);
  at::Tensor want = (v.unsqueeze(2) * W.index_select(0, i.reshape(-1)).reshape({N, k, D})).sum(1) + b;
  expect(close(y, want, 1e-12), "plain decode");

  // segment_rows == index_add of coef * src rows.
  auto [off, order, active] = sae_sparse::latent_csr_cpu(i, S);
  at::Tensor src = at::randn({N, D}, opt);
  auto [rows, csum] = sae_sparse::segment_rows_cpu(off, order, active, v, src, at::Tensor(), S, k);
  at::Tensor tok = at::arange(N, opt.dtype(at::kLong)).repeat_interleave(k);
  at::Tensor want_rows = at::zeros({S, D}, opt).index_add_(
      0, i.reshape(-1), src.index_select(0, tok) * v.reshape({-1, 1}));
  at::Tensor want_sum = at::zeros({S}, opt).index_add_(0, i.reshape(-1), v.reshape(-1));
  expect(close(rows, want_rows, 1e-12), "segment_rows rows");
  expect(close(csum, want_sum, 1e-12), "segment_rows coef_sum");
}

}  // namespace

int main() {
  at::manual_seed(0);
  test_encode(7, 33, 1000, 7, true);
  test_encode(1, 33, 1000, 7, false);
  test_encode(3, 19, 61, 61, true);
  test_encode(130, 24, 4500, 9, false);
  test_encode_f32(5, 40, 3000, 8);    // direct
  test_encode_f32(300, 40, 3000, 8);  // screened
  test_decode_and_segments();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("all CPU kernel tests passed\n");
  return 0;
}
