// Gather decode with the sparse latent edit, its per-token backward, and the deterministic
// by-latent segmented reductions that turn per-token gradients into parameter gradients.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "../sae_sparse.h"
#include "vec.h"

namespace sae_sparse {
namespace {

template <typename T>
inline T act_fwd(T h, int64_t act) {
  switch (act) {
    case kRelu: return h > T(0) ? h : T(0);
    case kGelu: return T(0.5) * h * (T(1) + std::erf(h * T(M_SQRT1_2)));
    default: return h;
  }
}
template <typename T>
inline T act_grad(T h, int64_t act) {
  switch (act) {
    case kRelu: return h > T(0) ? T(1) : T(0);
    case kGelu: {
      const T cdf = T(0.5) * (T(1) + std::erf(h * T(M_SQRT1_2)));
      const T pdf = std::exp(T(-0.5) * h * h) * T(0.3989422804014327);
      return cdf + h * pdf;
    }
    default: return T(1);
  }
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

void check_sparse_code(const at::Tensor& values, const at::Tensor& indices, const char* fn) {
  TORCH_CHECK(values.dim() == 2, fn, ": values must be [N, k], got ", values.sizes());
  TORCH_CHECK(indices.sizes() == values.sizes() && indices.scalar_type() == at::kLong, fn,
              ": indices must be int64 with the shape of values ", values.sizes(), ", got ",
              indices.scalar_type(), " ", indices.sizes());
}

void check_indices_in_range(const at::Tensor& indices, int64_t S, const char* fn) {
  if (indices.numel() == 0) return;
  const int64_t lo = indices.min().item<int64_t>(), hi = indices.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < S, fn, ": indices must lie in [0, S=", S, "), got [", lo, ", ", hi,
              "]");
}

// W_dec (or W_enc, in the encoder's backward) in the values' dtype, or stored in bf16 / fp16
// under float32 values (read as stored; the products are fp32).
void check_w_dtype(const at::Tensor& W, at::ScalarType st, const char* fn) {
  const auto wt = W.scalar_type();
  TORCH_CHECK(wt == st || (st == at::kFloat && (wt == at::kBFloat16 || wt == at::kHalf)), fn,
              ": W_dec must be ", st, st == at::kFloat ? " (or bfloat16 / float16)" : "",
              ", got ", wt);
}

// TW: W_dec's element type, T or (for float) bf16 / fp16, read as stored (vec::row_as).
template <typename T, typename TW = T>
void decode_fwd_impl(const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
                     const at::Tensor& W_dec, const at::Tensor& b_dec, const at::Tensor& gain,
                     const at::Tensor& W_in, const at::Tensor& b_in, const at::Tensor& M,
                     const at::Tensor& c, int64_t act, int64_t mode, at::Tensor& y,
                     at::Tensor& h_pre) {
  const int64_t N = values.size(0), k = values.size(1), D = W_dec.size(1);
  const int64_t H = W_in.defined() ? W_in.size(1) : 0;
  const T* xp = ptr_or_null<T>(x);
  const T* vp = values.data_ptr<T>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  const TW* Wd = W_dec.data_ptr<TW>();
  const T* bd = ptr_or_null<T>(b_dec);
  const T* g = ptr_or_null<T>(gain);
  const T* Wi = ptr_or_null<T>(W_in);
  const T* bi = ptr_or_null<T>(b_in);
  const T* Mp = ptr_or_null<T>(M);
  const T* cp = ptr_or_null<T>(c);
  T* yp = y.data_ptr<T>();
  T* hp = H ? h_pre.data_ptr<T>() : nullptr;

  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<T> coef(k), a(H), wbuf;
    std::vector<int64_t> seq;
    for (int64_t n = n0; n < n1; ++n) {
      T* yr = yp + n * D;
      const T* v = vp + n * k;
      const int64_t* id = ip + n * k;
      for (int64_t d = 0; d < D; ++d) {
        T base = 0;
        if (mode == kDelta) base = xp[n * D + d];
        else if (bd) base = bd[d];
        if (cp) base += cp[d];
        yr[d] = base;
      }
      if (mode != kDelta || g) {
        for (int64_t j = 0; j < k; ++j) {
          if (mode == kDelta) coef[j] = v[j] * g[id[j]];
          else if (mode == kReplace && g) coef[j] = v[j] * (T(1) + g[id[j]]);
          else coef[j] = v[j];
        }
        vec::gather_sum_as(k, coef.data(), id, Wd, D, yr, wbuf, seq);
      }
      if (H) {
        T* h = hp + n * H;
        for (int64_t q = 0; q < H; ++q) h[q] = bi ? bi[q] : T(0);
        vec::gather_sum(k, v, id, Wi, H, h);
        for (int64_t q = 0; q < H; ++q) {
          const T aq = act_fwd(h[q], act);
          if (aq != T(0)) vec::axpy(aq, Mp + q * D, yr, D);
        }
      }
    }
  });
}

template <typename T, typename TW = T>
void decode_bwd_impl(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& indices,
                     const at::Tensor& W_dec, const at::Tensor& gain, const at::Tensor& W_in,
                     const at::Tensor& h_pre, const at::Tensor& M, int64_t act, int64_t mode,
                     at::Tensor& dv, at::Tensor& p, at::Tensor& dh) {
  const int64_t N = values.size(0), k = values.size(1), D = W_dec.size(1);
  const int64_t H = W_in.defined() ? W_in.size(1) : 0;
  const T* dyp = dy.data_ptr<T>();
  const int64_t* ip = indices.data_ptr<int64_t>();
  const TW* Wd = W_dec.data_ptr<TW>();
  const T* g = ptr_or_null<T>(gain);
  const T* Wi = ptr_or_null<T>(W_in);
  const T* hp = ptr_or_null<T>(h_pre);
  const T* Mp = ptr_or_null<T>(M);
  T* dvp = dv.data_ptr<T>();
  T* pp = p.data_ptr<T>();
  T* dhp = H ? dh.data_ptr<T>() : nullptr;

  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<T> wrow;
    for (int64_t n = n0; n < n1; ++n) {
      const T* dyr = dyp + n * D;
      const int64_t* id = ip + n * k;
      T* dhr = H ? dhp + n * H : nullptr;
      for (int64_t q = 0; q < H; ++q)
        dhr[q] = vec::dot(dyr, Mp + q * D, D) * act_grad(hp[n * H + q], act);
      for (int64_t j = 0; j < k; ++j) {
        const T pj = vec::dot(dyr, vec::row_as(Wd + id[j] * D, D, wrow), D);
        T coef = T(1);
        if (mode == kDelta) coef = g ? g[id[j]] : T(0);
        else if (mode == kReplace && g) coef = T(1) + g[id[j]];
        T d = coef * pj;
        if (H) d += vec::dot(dhr, Wi + id[j] * H, H);
        pp[n * k + j] = pj;
        dvp[n * k + j] = d;
      }
    }
  });
}

template <typename T>
void segment_rows_impl(const at::Tensor& offsets, const at::Tensor& order,
                       const at::Tensor& active, const at::Tensor& coef, const at::Tensor& src,
                       const at::Tensor& sub, int64_t k, at::Tensor& out, at::Tensor& coef_sum) {
  const int64_t C = src.size(1);
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* ord = order.data_ptr<int64_t>();
  const int64_t* act = active.data_ptr<int64_t>();
  const T* cf = coef.data_ptr<T>();
  const T* sp = src.data_ptr<T>();
  const T* sb = ptr_or_null<T>(sub);
  T* op = out.data_ptr<T>();
  T* cs = coef_sum.data_ptr<T>();
  at::parallel_for(0, active.numel(), 16, [&](int64_t a0, int64_t a1) {
    for (int64_t a = a0; a < a1; ++a) {
      const int64_t s = act[a];
      T* row = op + s * C;
      T total = 0;
      for (int64_t e = off[s]; e < off[s + 1]; ++e) {
        const int64_t pos = ord[e];
        const T w = cf[pos];
        total += w;
        if (w != T(0) && C) vec::axpy(w, sp + (pos / k) * C, row, C);
      }
      if (sb && total != T(0)) vec::axpy(-total, sb, row, C);
      cs[s] = total;
    }
  });
}

}  // namespace

void poison_if_testing(at::Tensor& t) {
  static const bool enabled = [] {
    const char* v = std::getenv("SAE_SPARSE_POISON");
    return v != nullptr && v[0] == '1';
  }();
  if (!enabled || !t.defined()) return;
  if (at::isFloatingType(t.scalar_type())) t.fill_(std::numeric_limits<double>::quiet_NaN());
  else if (t.scalar_type() == at::kBool) t.fill_(true);
  else t.fill_(-1);
}

std::tuple<at::Tensor, at::Tensor> edit_decode_fwd_cpu(
    const at::Tensor& x_, const at::Tensor& values_, const at::Tensor& indices_,
    const at::Tensor& W_dec_, const at::Tensor& b_dec_, const at::Tensor& gain_,
    const at::Tensor& W_in_, const at::Tensor& b_in_, const at::Tensor& M_, const at::Tensor& c_,
    int64_t act, int64_t mode) {
  const char* fn = "edit_decode_fwd_cpu";
  check_sparse_code(values_, indices_, fn);
  TORCH_CHECK(W_dec_.dim() == 2, fn, ": W_dec must be [S, D], got ", W_dec_.sizes());
  TORCH_CHECK(mode == kDelta || mode == kReplace || mode == kPlain, fn, ": bad mode ", mode);
  TORCH_CHECK(act == kRelu || act == kGelu || act == kIdentity, fn, ": bad activation ", act);
  const auto st = values_.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, fn, ": values must be float32/float64");
  const int64_t N = values_.size(0), S = W_dec_.size(0), D = W_dec_.size(1);
  TORCH_CHECK(mode != kDelta || (x_.defined() && x_.dim() == 2 && x_.size(0) == N &&
                                 x_.size(1) == D),
              fn, ": delta mode needs x [", N, ", ", D, "]");
  TORCH_CHECK(W_in_.defined() == M_.defined(), fn, ": W_in and M come together");
  if (W_in_.defined())
    TORCH_CHECK(W_in_.dim() == 2 && W_in_.size(0) == S && M_.dim() == 2 &&
                    M_.size(0) == W_in_.size(1) && M_.size(1) == D,
                fn, ": W_in must be [S, h] and M [h, D]");
  check_indices_in_range(indices_, S, fn);
  auto C = [](const at::Tensor& t) { return t.defined() ? t.contiguous() : t; };
  at::Tensor x = C(x_), values = C(values_), indices = C(indices_), W_dec = C(W_dec_),
             b_dec = C(b_dec_), gain = C(gain_), W_in = C(W_in_), b_in = C(b_in_), M = C(M_),
             c = C(c_);
  for (const at::Tensor* t : {&x, &b_dec, &gain, &W_in, &b_in, &M, &c})
    TORCH_CHECK(!t->defined() || t->scalar_type() == st, fn, ": all tensors must be ", st);
  check_w_dtype(W_dec, st, fn);
  at::Tensor y = at::empty({N, D}, values.options());
  at::Tensor h_pre = W_in.defined() ? at::empty({N, W_in.size(1)}, values.options()) : at::Tensor();
  poison_if_testing(y);
  poison_if_testing(h_pre);
  if (W_dec.scalar_type() == at::kBFloat16) {
    decode_fwd_impl<float, at::BFloat16>(x, values, indices, W_dec, b_dec, gain, W_in, b_in, M, c,
                                         act, mode, y, h_pre);
  } else if (W_dec.scalar_type() == at::kHalf) {
    decode_fwd_impl<float, at::Half>(x, values, indices, W_dec, b_dec, gain, W_in, b_in, M, c, act,
                                     mode, y, h_pre);
  } else {
    AT_DISPATCH_FLOATING_TYPES(st, "edit_decode_fwd_cpu", [&] {
      decode_fwd_impl<scalar_t>(x, values, indices, W_dec, b_dec, gain, W_in, b_in, M, c, act,
                                mode, y, h_pre);
    });
  }
  return {y, h_pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> edit_decode_bwd_cpu(
    const at::Tensor& dy_, const at::Tensor& values_, const at::Tensor& indices_,
    const at::Tensor& W_dec_, const at::Tensor& gain_, const at::Tensor& W_in_,
    const at::Tensor& h_pre_, const at::Tensor& M_, int64_t act, int64_t mode) {
  const char* fn = "edit_decode_bwd_cpu";
  check_sparse_code(values_, indices_, fn);
  const auto st = values_.scalar_type();
  const int64_t N = values_.size(0), k = values_.size(1);
  TORCH_CHECK(dy_.dim() == 2 && dy_.size(0) == N && dy_.size(1) == W_dec_.size(1), fn,
              ": dy must be [N, D]");
  TORCH_CHECK(W_in_.defined() == h_pre_.defined() && W_in_.defined() == M_.defined(), fn,
              ": W_in, h_pre and M come together");
  auto C = [](const at::Tensor& t) { return t.defined() ? t.contiguous() : t; };
  at::Tensor dy = C(dy_), values = C(values_), indices = C(indices_), W_dec = C(W_dec_),
             gain = C(gain_), W_in = C(W_in_), h_pre = C(h_pre_), M = C(M_);
  for (const at::Tensor* t : {&dy, &gain, &W_in, &h_pre, &M})
    TORCH_CHECK(!t->defined() || t->scalar_type() == st, fn, ": all tensors must be ", st);
  check_w_dtype(W_dec, st, fn);
  at::Tensor dv = at::empty({N, k}, values.options());
  at::Tensor p = at::empty({N, k}, values.options());
  at::Tensor dh = W_in.defined() ? at::empty({N, W_in.size(1)}, values.options()) : at::Tensor();
  poison_if_testing(dv);
  poison_if_testing(p);
  poison_if_testing(dh);
  if (W_dec.scalar_type() == at::kBFloat16) {
    decode_bwd_impl<float, at::BFloat16>(dy, values, indices, W_dec, gain, W_in, h_pre, M, act,
                                         mode, dv, p, dh);
  } else if (W_dec.scalar_type() == at::kHalf) {
    decode_bwd_impl<float, at::Half>(dy, values, indices, W_dec, gain, W_in, h_pre, M, act, mode,
                                     dv, p, dh);
  } else {
    AT_DISPATCH_FLOATING_TYPES(st, "edit_decode_bwd_cpu", [&] {
      decode_bwd_impl<scalar_t>(dy, values, indices, W_dec, gain, W_in, h_pre, M, act, mode, dv,
                                p, dh);
    });
  }
  return {dv, p, dh};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> latent_csr_cpu(const at::Tensor& indices_,
                                                              int64_t S) {
  TORCH_CHECK(indices_.scalar_type() == at::kLong, "latent_csr_cpu: indices must be int64");
  check_indices_in_range(indices_, S, "latent_csr_cpu");
  const at::Tensor indices = indices_.contiguous();
  const int64_t P = indices.numel();
  const int64_t* ip = indices.data_ptr<int64_t>();
  at::Tensor offsets = at::zeros({S + 1}, indices.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  for (int64_t e = 0; e < P; ++e) ++off[ip[e] + 1];
  int64_t n_active = 0;
  for (int64_t s = 0; s < S; ++s) {
    n_active += off[s + 1] != 0;
    off[s + 1] += off[s];
  }
  at::Tensor order = at::empty({P}, indices.options());
  at::Tensor active = at::empty({n_active}, indices.options());
  poison_if_testing(order);
  poison_if_testing(active);
  int64_t* ord = order.data_ptr<int64_t>();
  int64_t* act = active.data_ptr<int64_t>();
  std::vector<int64_t> fill(off, off + S);
  for (int64_t e = 0; e < P; ++e) ord[fill[ip[e]]++] = e;  // stable: positions ascend per latent
  for (int64_t s = 0, a = 0; s < S; ++s)
    if (off[s + 1] != off[s]) act[a++] = s;
  return {offsets, order, active};
}

std::tuple<at::Tensor, at::Tensor> segment_rows_cpu(
    const at::Tensor& offsets, const at::Tensor& order, const at::Tensor& active,
    const at::Tensor& coef_, const at::Tensor& src_, const at::Tensor& sub_, int64_t S, int64_t k) {
  const char* fn = "segment_rows_cpu";
  TORCH_CHECK(offsets.numel() == S + 1 && order.numel() == coef_.numel(), fn,
              ": CSR does not match coef");
  TORCH_CHECK(src_.dim() == 2 && src_.size(0) * k == coef_.numel(), fn,
              ": src must have one row per token");
  const auto st = coef_.scalar_type();
  const at::Tensor coef = coef_.contiguous(), src = src_.contiguous();
  const at::Tensor sub = sub_.defined() ? sub_.contiguous() : sub_;
  TORCH_CHECK(src.scalar_type() == st && (!sub.defined() || sub.scalar_type() == st), fn,
              ": dtypes must match");
  at::Tensor out = at::zeros({S, src.size(1)}, src.options());
  at::Tensor coef_sum = at::zeros({S}, src.options());
  AT_DISPATCH_FLOATING_TYPES(st, "segment_rows_cpu", [&] {
    segment_rows_impl<scalar_t>(offsets, order, active, coef, src, sub, k, out, coef_sum);
  });
  return {out, coef_sum};
}

}  // namespace sae_sparse
