// The CPU kernels registered as PyTorch operators: TORCH_LIBRARY declares each op's schema
// once (torch.ops.sae_sparse_cpu.<name>; torch.compile traces them through the fake
// implementations registered in sae_sparse/_cpp.py), TORCH_LIBRARY_IMPL binds the CPU
// kernels. The Python module itself only exports the mode / activation codes, which
// tests/test_cpp.py checks against sae_sparse/codes.py. Thin: the checks live in the kernels
// (TORCH_CHECK) and in sae_sparse/.
#include <torch/extension.h>
#include <torch/library.h>

#include "sae_sparse.h"

namespace {
using OT = c10::optional<at::Tensor>;

at::Tensor opt(const OT& t) { return t.has_value() ? *t : at::Tensor(); }

// An absent optional output (h_pre, dh without an FFN) as an empty [N, 0] tensor: operator
// outputs must be defined.
at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : like.new_empty({like.size(0), 0});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode(const at::Tensor& x,
                                                           const at::Tensor& W,
                                                           const at::Tensor& b, int64_t k,
                                                           const OT& b_pre, const OT& thr) {
  return sae_sparse::topk_encode_cpu(x, W, b, k, opt(b_pre), opt(thr));
}

std::tuple<at::Tensor, at::Tensor> edit_decode_fwd(const OT& x, const at::Tensor& v,
                                                   const at::Tensor& i, const at::Tensor& W_dec,
                                                   const OT& b_dec, const OT& gain,
                                                   const OT& W_in, const OT& b_in, const OT& M,
                                                   const OT& c, int64_t act, int64_t mode) {
  auto [y, h] = sae_sparse::edit_decode_fwd_cpu(opt(x), v, i, W_dec, opt(b_dec), opt(gain),
                                                opt(W_in), opt(b_in), opt(M), opt(c), act, mode);
  return {y, or_empty(h, v)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> edit_decode_bwd(
    const at::Tensor& dy, const at::Tensor& v, const at::Tensor& i, const at::Tensor& W_dec,
    const OT& gain, const OT& W_in, const OT& h_pre, const OT& M, int64_t act, int64_t mode) {
  auto [dv, p, dh] = sae_sparse::edit_decode_bwd_cpu(dy, v, i, W_dec, opt(gain), opt(W_in),
                                                     opt(h_pre), opt(M), act, mode);
  return {dv, p, or_empty(dh, v)};
}

std::tuple<at::Tensor, at::Tensor> segment_rows(const at::Tensor& off, const at::Tensor& ord,
                                                const at::Tensor& act, const at::Tensor& coef,
                                                const at::Tensor& src, const OT& sub, int64_t S,
                                                int64_t k) {
  return sae_sparse::segment_rows_cpu(off, ord, act, coef, src, opt(sub), S, k);
}
}  // namespace

TORCH_LIBRARY(sae_sparse_cpu, m) {
  m.def("topk_encode(Tensor x, Tensor W, Tensor b, int k, Tensor? b_pre, Tensor? thr)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("edit_decode_fwd(Tensor? x, Tensor values, Tensor indices, Tensor W_dec,"
        " Tensor? b_dec, Tensor? gain, Tensor? W_in, Tensor? b_in, Tensor? M, Tensor? c,"
        " int act, int mode) -> (Tensor, Tensor)");
  m.def("edit_decode_bwd(Tensor dy, Tensor values, Tensor indices, Tensor W_dec,"
        " Tensor? gain, Tensor? W_in, Tensor? h_pre, Tensor? M, int act, int mode)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("latent_csr(Tensor indices, int S) -> (Tensor, Tensor, Tensor)");
  m.def("segment_rows(Tensor offsets, Tensor order, Tensor active, Tensor coef, Tensor src,"
        " Tensor? sub, int S, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sae_sparse_cpu, CPU, m) {
  m.impl("topk_encode", &topk_encode);
  m.impl("edit_decode_fwd", &edit_decode_fwd);
  m.impl("edit_decode_bwd", &edit_decode_bwd);
  m.impl("latent_csr", &sae_sparse::latent_csr_cpu);
  m.impl("segment_rows", &segment_rows);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  py::dict modes, acts;
  modes["delta"] = int64_t{sae_sparse::kDelta};
  modes["replace"] = int64_t{sae_sparse::kReplace};
  modes["plain"] = int64_t{sae_sparse::kPlain};
  acts["relu"] = int64_t{sae_sparse::kRelu};
  acts["gelu"] = int64_t{sae_sparse::kGelu};
  acts["identity"] = int64_t{sae_sparse::kIdentity};
  m.attr("MODE_CODES") = modes;
  m.attr("ACT_CODES") = acts;
}
