// Python binding of the CPU kernels (thin: all checks live in the kernels and sae_sparse/).
#include <torch/extension.h>

#include "sae_sparse.h"

namespace {
at::Tensor opt(const c10::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using OT = c10::optional<at::Tensor>;
  m.def(
      "topk_encode",
      [](const at::Tensor& x, const at::Tensor& W, const at::Tensor& b, int64_t k, OT b_pre,
         OT thr) { return sae_sparse::topk_encode_cpu(x, W, b, k, opt(b_pre), opt(thr)); },
      "Streaming top-k SAE encode -> (values, indices, overflow)");
  m.def(
      "edit_decode_fwd",
      [](OT x, const at::Tensor& v, const at::Tensor& i, const at::Tensor& W_dec, OT b_dec,
         OT gain, OT W_in, OT b_in, OT M, OT c, int64_t act, int64_t mode) {
        return sae_sparse::edit_decode_fwd_cpu(opt(x), v, i, W_dec, opt(b_dec), opt(gain),
                                               opt(W_in), opt(b_in), opt(M), opt(c), act, mode);
      },
      "Gather decode with the latent edit -> (y, h_pre)");
  m.def(
      "edit_decode_bwd",
      [](const at::Tensor& dy, const at::Tensor& v, const at::Tensor& i, const at::Tensor& W_dec,
         OT gain, OT W_in, OT h_pre, OT M, int64_t act, int64_t mode) {
        return sae_sparse::edit_decode_bwd_cpu(dy, v, i, W_dec, opt(gain), opt(W_in), opt(h_pre),
                                               opt(M), act, mode);
      },
      "Per-token backward of edit_decode -> (dvalues, p, dh)");
  m.def("latent_csr", &sae_sparse::latent_csr_cpu, "Group (token, slot) pairs by latent");
  m.def(
      "segment_rows",
      [](const at::Tensor& off, const at::Tensor& ord, const at::Tensor& act, const at::Tensor& coef,
         const at::Tensor& src, OT sub, int64_t S, int64_t k) {
        return sae_sparse::segment_rows_cpu(off, ord, act, coef, src, opt(sub), S, k);
      },
      "Deterministic by-latent segmented reduction -> (rows [S, C], coef_sum [S])");
}
