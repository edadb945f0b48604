// Streaming top-k SAE encode on the CPU.
//
// pre = (x - b_pre) @ W_enc.T + b_enc is never stored. For each tile of kTile latents we run a
// *screening* GEMM in a cheaper precision (bfloat16 on CPUs with AVX512-BF16, else float32;
// float32 for float64 inputs) through ATen's BLAS, one row block per thread. Every screened
// entry a carries a rigorous error bound e = c * ||x_n - b_pre|| * ||W_enc[s]|| + (bias terms),
// so [a - e, a + e] contains the exact pre-activation. Per row we keep
//   * a min-heap of the kk largest lower bounds (a - e); its minimum L never exceeds the true
//     kk-th largest pre-activation, and only grows;
//   * the candidates with a + e >= L (current L; compacted as L grows).
// At the end the candidates with a + e >= L_final -- a superset of the exact top-kk -- are
// recomputed exactly (fp32 or fp64 dot products) and the top-kk chosen with ties broken by the
// smaller latent index. Extra memory: O(N * (k + survivors)) + per-thread tiles.
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "../sae_sparse.h"
#include "vec.h"

namespace sae_sparse {
namespace {

constexpr int64_t kMinRowBlock = 64;   // rows per screening GEMM (more rows amortise the
constexpr int64_t kMaxRowBlock = 512;  // BLAS's packing of the W tile)
constexpr int64_t kTile = 4096;        // latents per screening GEMM
constexpr int64_t kDirectMaxRows = 256;  // fewer fp32 rows: exact tiles, no screening
constexpr float kInf = std::numeric_limits<float>::infinity();

struct Cand {
  float hi;
  int64_t idx;
};

// Streaming screen for the kk largest entries of one row.
class RowScreen {
 public:
  void init(int64_t kk) {
    kk_ = kk;
    heap_.reserve(kk);
    cap_ = static_cast<size_t>(std::max<int64_t>(4 * kk, 256));
  }
  float bound() const { return L_; }
  // A lower bound on the kk-th largest pre-activation known from elsewhere (a sample of the
  // row's lower bounds): entries whose upper bound is below it can be skipped at once.
  void set_floor(float f) {
    floor_ = std::max(floor_, f);
    L_ = std::max(L_, floor_);
  }
  void push(float lo, float hi, int64_t idx) {  // requires hi >= bound()
    cand_.push_back({hi, idx});
    if (static_cast<int64_t>(heap_.size()) < kk_) {
      heap_.push_back(lo);
      std::push_heap(heap_.begin(), heap_.end(), std::greater<float>());
      if (static_cast<int64_t>(heap_.size()) == kk_) L_ = std::max(heap_.front(), floor_);
    } else if (lo > heap_.front()) {
      replace_min(lo);
      L_ = std::max(heap_.front(), floor_);
    }
    if (cand_.size() >= cap_) compact();
  }
  // Candidates that may still be in the top-kk; frees the screen's memory.
  std::vector<Cand> take() {
    compact();
    std::vector<float>().swap(heap_);
    return std::move(cand_);
  }

 private:
  void replace_min(float lo) {  // pop the minimum and push lo, as one sift-down
    const size_t n = heap_.size();
    size_t i = 0;
    for (;;) {
      size_t m = 2 * i + 1;
      if (m >= n) break;
      if (m + 1 < n && heap_[m + 1] < heap_[m]) ++m;
      if (heap_[m] >= lo) break;
      heap_[i] = heap_[m];
      i = m;
    }
    heap_[i] = lo;
  }
  void compact() {
    const float L = L_;
    cand_.erase(std::remove_if(cand_.begin(), cand_.end(), [L](const Cand& c) { return c.hi < L; }),
                cand_.end());
    if (cand_.size() * 2 > cap_) cap_ *= 2;
  }
  int64_t kk_ = 0;
  std::vector<float> heap_;
  std::vector<Cand> cand_;
  size_t cap_ = 0;
  float L_ = -kInf;
  float floor_ = -kInf;
};

// Seeds a row's screen from every kStride-th entry of its first tile: at least kk entries have
// pre >= the kk-th largest sampled lower bound, so it is a valid floor.
constexpr int64_t kStride = 8;
inline void seed_floor(RowScreen& scr, const float* hi, const float* e, int64_t ts, int64_t kk,
                       std::vector<float>& tmp) {
  tmp.clear();
  for (int64_t i = 0; i < ts; i += kStride) tmp.push_back(hi[i] - 2.0f * e[i]);
  if (static_cast<int64_t>(tmp.size()) < 2 * kk) return;  // too few samples to help
  std::nth_element(tmp.begin(), tmp.begin() + (kk - 1), tmp.end(), std::greater<float>());
  scr.set_floor(tmp[kk - 1]);
}

struct Scored {
  double val;
  int64_t idx;
};
inline bool scored_before(const Scored& a, const Scored& b) {
  return a.val > b.val || (a.val == b.val && a.idx < b.idx);
}

// Writes row n's k outputs from its candidates sorted by scored_before: values (relu, and
// JumpReLU when thresholds tp are given) and indices.
template <typename scalar_t>
inline void write_row(const std::vector<Scored>& top, int64_t n, int64_t k, const scalar_t* tp,
                      scalar_t* vp, int64_t* ip) {
  for (int64_t j = 0; j < k; ++j) {
    const double v = top[j].val;
    const bool on = v > 0 && (tp == nullptr || v > double(tp[top[j].idx]));
    vp[n * k + j] = on ? static_cast<scalar_t>(v) : scalar_t(0);
    ip[n * k + j] = top[j].idx;
  }
}

// Whether a row whose sorted top-kk (of pre, or of q = min(pre - thr, pre)) is `top` has more
// than k active latents.
inline bool row_overflows(const std::vector<Scored>& top, int64_t kk, int64_t k) {
  return kk > k && top[k].val > 0;
}

// Pushes the entries of one screened tile row with hi >= the running bound.
inline void scan_row(RowScreen& scr, const float* hi, const float* e, int64_t ts, int64_t s0) {
  for (int64_t i = vec::first_ge(hi, scr.bound(), ts); i < ts;) {
    scr.push(hi[i] - 2.0f * e[i], hi[i], s0 + i);
    ++i;
    i += vec::first_ge(hi + i, scr.bound(), ts - i);
  }
}

// w_t: W_enc's element type, scalar_t or (for float) bf16 / fp16, read as it is stored.
template <typename scalar_t, typename screen_t, typename w_t = scalar_t>
void encode_impl(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b,
                 const at::Tensor& b_pre, const at::Tensor& thr, int64_t k, at::Tensor& values,
                 at::Tensor& indices, at::Tensor& overflow) {
  const int64_t N = x.size(0), D = x.size(1), S = W.size(0);
  const bool has_thr = thr.defined();
  // Main screen: top-k of pre. Without a threshold we select k+1 so the (k+1)-th value tells
  // whether the row had more than k active latents; with one, a second screen ranks
  // q = min(pre - threshold, pre) (active <=> q > 0).
  const int64_t kk = has_thr ? k : std::min(k + 1, S);
  const int64_t kq = has_thr ? std::min(k + 1, S) : 0;

  const scalar_t* xp = x.data_ptr<scalar_t>();
  const w_t* Wp = W.data_ptr<w_t>();
  const scalar_t* bp = b.data_ptr<scalar_t>();
  const scalar_t* bpre = b_pre.defined() ? b_pre.data_ptr<scalar_t>() : nullptr;
  const scalar_t* tp = has_thr ? thr.data_ptr<scalar_t>() : nullptr;

  // Error model. With xc = x - b_pre, its screen-precision copy xs and likewise ws for a latent,
  //   xc.w - xs.ws = (xc - xs).w + xs.(w - ws)     -> <= ||xc - xs|| ||w|| + ||xs|| ||w - ws||
  //   fp32 accumulation of xs.ws over D terms     -> <= gamma_D ||xs|| ||ws||
  //   rounding the GEMM output to screen_t        -> <= u_out |a| (1 + u_out)
  // plus float rounding of the bias add and of a + e (covered by 2^-22 |a| and 2^-20 |b|).
  // The norms are computed in double from the actual rounded values, so the bound is rigorous
  // for any summation order the BLAS picks.
  constexpr bool kBf16 = std::is_same<screen_t, at::BFloat16>::value;
  const double gamma_d = 1.01 * (D + 2) * std::ldexp(1.0, -24);
  const float ua = static_cast<float>((kBf16 ? 1.01 * std::ldexp(1.0, -8) : 0.0) + std::ldexp(1.0, -22));
  const double slack = 1.0 + std::ldexp(1.0, -10);
  const auto screen_dtype = kBf16 ? at::kBFloat16 : at::kFloat;

  std::vector<float> ex(N), xt(N);
  std::vector<RowScreen> scr(N), scrq(has_thr ? N : 0);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      double se = 0, st = 0;
      for (int64_t d = 0; d < D; ++d) {
        const scalar_t v = xp[n * D + d] - (bpre ? bpre[d] : scalar_t(0));
        const double vs = double(static_cast<float>(static_cast<screen_t>(v)));
        se += (double(v) - vs) * (double(v) - vs);
        st += vs * vs;
      }
      ex[n] = static_cast<float>(std::sqrt(se) * slack);
      xt[n] = static_cast<float>(std::sqrt(st) * slack);
      scr[n].init(kk);
      if (has_thr) scrq[n].init(kq);
    }
  });

  const int64_t tile = std::min(kTile, S);
  const int nthreads = at::get_num_threads();
  const int64_t rows = std::min<int64_t>(
      kMaxRowBlock, std::max<int64_t>(kMinRowBlock, (N + nthreads - 1) / nthreads));
  const int64_t n_blocks = (N + rows - 1) / rows;
  auto opts = at::TensorOptions().dtype(screen_dtype);
  at::Tensor Wt = at::empty({tile, D}, opts);
  std::vector<float> bt(tile), wa(tile), wb(tile), bn(tile), tt(tile), tn(tile);
  // Per-thread scratch, allocated once.
  struct Scratch {
    at::Tensor xs, out;
    std::vector<float> hi, e, hiq, eq, tmp;
  };
  std::vector<Scratch> scratch(nthreads);
  for (auto& sc : scratch) {
    sc.xs = at::empty({rows, D}, opts);
    sc.out = at::empty({rows * tile}, opts);
    sc.hi.resize(tile);
    sc.e.resize(tile);
    if (has_thr) {
      sc.hiq.resize(tile);
      sc.eq.resize(tile);
    }
  }

  for (int64_t s0 = 0; s0 < S; s0 += tile) {
    const int64_t ts = std::min(tile, S - s0);
    screen_t* Wtp = Wt.data_ptr<screen_t>();
    at::parallel_for(0, ts, 256, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const w_t* w = Wp + (s0 + i) * D;
        double sw = 0, serr = 0, sws = 0;
        for (int64_t d = 0; d < D; ++d) {
          const scalar_t wd = static_cast<scalar_t>(w[d]);
          const screen_t q = static_cast<screen_t>(wd);
          const double ws = double(static_cast<float>(q));
          Wtp[i * D + d] = q;
          sw += double(wd) * double(wd);
          serr += (double(wd) - ws) * (double(wd) - ws);
          sws += ws * ws;
        }
        const double bi = double(bp[s0 + i]);
        bt[i] = static_cast<float>(bi);
        wa[i] = static_cast<float>(std::sqrt(sw) * slack);
        wb[i] = static_cast<float>((std::sqrt(serr) + gamma_d * std::sqrt(sws)) * slack);
        bn[i] = static_cast<float>((ua + std::ldexp(1.0, -20)) * std::fabs(bi)) + 1e-30f;
        if (has_thr) {
          tt[i] = static_cast<float>(tp[s0 + i]);
          tn[i] = std::ldexp(1.0f, -20) * std::fabs(tt[i]);
        }
      }
    });
    const at::Tensor Wv = Wt.narrow(0, 0, ts);

    at::parallel_for(0, n_blocks, 1, [&](int64_t blk0, int64_t blk1) {
      Scratch& sc = scratch[at::get_thread_num()];
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t r0 = blk * rows, rb = std::min(rows, N - r0);
        screen_t* xsp = sc.xs.template data_ptr<screen_t>();
        for (int64_t r = 0; r < rb; ++r)
          for (int64_t d = 0; d < D; ++d)
            xsp[r * D + d] =
                static_cast<screen_t>(xp[(r0 + r) * D + d] - (bpre ? bpre[d] : scalar_t(0)));
        at::Tensor o = sc.out.narrow(0, 0, rb * ts).view({rb, ts});
        at::mm_out(o, sc.xs.narrow(0, 0, rb), Wv.t());
        const screen_t* op = o.template data_ptr<screen_t>();
        for (int64_t r = 0; r < rb; ++r) {
          const int64_t n = r0 + r;
          const screen_t* row = op + r * ts;
          float* hi = sc.hi.data();
          float* e = sc.e.data();
          if constexpr (kBf16) {
            vec::screen_hi(reinterpret_cast<const uint16_t*>(row), bt.data(), wa.data(), wb.data(),
                           bn.data(), ex[n], xt[n], ua, hi, e, ts);
          } else {
            vec::screen_hi(reinterpret_cast<const float*>(row), bt.data(), wa.data(), wb.data(),
                           bn.data(), ex[n], xt[n], ua, hi, e, ts);
          }
          if (s0 == 0) seed_floor(scr[n], hi, e, ts, kk, sc.tmp);
          scan_row(scr[n], hi, e, ts, s0);
          if (has_thr) {
            float* hiq = sc.hiq.data();
            float* eq = sc.eq.data();
            for (int64_t i = 0; i < ts; ++i) {
              const float a = hi[i] - e[i];
              eq[i] = e[i] + tn[i];
              hiq[i] = std::min(a - tt[i], a) + eq[i];
            }
            if (s0 == 0) seed_floor(scrq[n], hiq, eq, ts, kq, sc.tmp);
            scan_row(scrq[n], hiq, eq, ts, s0);
          }
        }
      }
    });
  }

  // Exact pass over the survivors.
  scalar_t* vp = values.data_ptr<scalar_t>();
  int64_t* ip = indices.data_ptr<int64_t>();
  bool* ovp = overflow.data_ptr<bool>();
  bool bad = false;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<scalar_t> xrow(D), wrow;
    std::vector<Scored> sc;
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t d = 0; d < D; ++d) xrow[d] = xp[n * D + d] - (bpre ? bpre[d] : scalar_t(0));
      auto exact = [&](int64_t s) {
        return double(vec::dot(xrow.data(), vec::row_as(Wp + s * D, D, wrow), D) + bp[s]);
      };
      std::vector<Cand> cand = scr[n].take();
      if (static_cast<int64_t>(cand.size()) < kk) {
        bad = true;
        continue;
      }
      sc.clear();
      for (const Cand& c : cand) sc.push_back({exact(c.idx), c.idx});
      std::partial_sort(sc.begin(), sc.begin() + kk, sc.end(), scored_before);
      write_row(sc, n, k, tp, vp, ip);
      if (!has_thr) {
        ovp[n] = row_overflows(sc, kk, k);
      } else {
        std::vector<Cand> cq = scrq[n].take();
        if (static_cast<int64_t>(cq.size()) < kq) {
          bad = true;
          continue;
        }
        sc.clear();
        for (const Cand& c : cq) {
          const double p = exact(c.idx);
          sc.push_back({std::min(p - double(tp[c.idx]), p), c.idx});
        }
        std::partial_sort(sc.begin(), sc.begin() + kq, sc.end(), scored_before);
        ovp[n] = row_overflows(sc, kq, k);
      }
    }
  });
  TORCH_CHECK(!bad, "topk_encode: non-finite pre-activations; W_enc, b_enc or threshold contain NaN");
}

// Few rows (float32): screening does not pay for converting W, so the GEMM tiles are computed
// exactly in fp32 and their values used as they are (the same values F.linear gives, up to
// summation order). Tiles of latents are split across threads, each with its own per-row
// screens; each screen's bound is a valid lower bound on the row's kk-th value, so the union of
// the candidates above the largest bound holds the exact top-kk.
void encode_direct_f32(const at::Tensor& x, const at::Tensor& W, const at::Tensor& b,
                       const at::Tensor& b_pre, const at::Tensor& thr, int64_t k,
                       at::Tensor& values, at::Tensor& indices, at::Tensor& overflow) {
  const int64_t N = x.size(0), S = W.size(0);
  const bool has_thr = thr.defined();
  const int64_t kk = has_thr ? k : std::min(k + 1, S);
  const int64_t kq = has_thr ? std::min(k + 1, S) : 0;
  const at::Tensor xc = (b_pre.defined() ? x - b_pre : x).contiguous();
  const float* bp = b.data_ptr<float>();
  const float* tp = has_thr ? thr.data_ptr<float>() : nullptr;
  const int64_t tile = std::min<int64_t>(2048, S);
  const int64_t n_tiles = (S + tile - 1) / tile;
  const int nthreads = at::get_num_threads();
  struct Local {
    std::vector<RowScreen> scr, scrq;
    at::Tensor out;
    std::vector<float> hi, hiq, zero;
  };
  std::vector<Local> loc(nthreads);
  for (auto& l : loc) {
    l.scr.resize(N);
    l.scrq.resize(has_thr ? N : 0);
    for (int64_t n = 0; n < N; ++n) {
      l.scr[n].init(kk);
      if (has_thr) l.scrq[n].init(kq);
    }
    l.out = at::empty({N * tile}, x.options());
    l.hi.resize(tile);
    l.hiq.resize(has_thr ? tile : 0);
    l.zero.assign(tile, 0.0f);
  }
  at::parallel_for(0, n_tiles, 1, [&](int64_t t0, int64_t t1) {
    Local& l = loc[at::get_thread_num()];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s0 = t * tile, ts = std::min(tile, S - s0);
      at::Tensor o = l.out.narrow(0, 0, N * ts).view({N, ts});
      // a bf16 / fp16 W: this tile in fp32 (the products of an fp32 copy of W, without one)
      const at::Tensor Wt = W.scalar_type() == at::kFloat ? W.narrow(0, s0, ts)
                                                          : W.narrow(0, s0, ts).to(at::kFloat);
      at::mm_out(o, xc, Wt.t());
      const float* op = o.data_ptr<float>();
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t i = 0; i < ts; ++i) l.hi[i] = op[n * ts + i] + bp[s0 + i] + 0.0f;
        scan_row(l.scr[n], l.hi.data(), l.zero.data(), ts, s0);
        if (has_thr) {
          for (int64_t i = 0; i < ts; ++i) l.hiq[i] = std::min(l.hi[i] - tp[s0 + i], l.hi[i]);
          scan_row(l.scrq[n], l.hiq.data(), l.zero.data(), ts, s0);
        }
      }
    }
  });
  float* vp = values.data_ptr<float>();
  int64_t* ip = indices.data_ptr<int64_t>();
  bool* ovp = overflow.data_ptr<bool>();
  auto merged = [&](bool q, int64_t n, int64_t want) {
    float L = -kInf;
    for (auto& l : loc) L = std::max(L, (q ? l.scrq : l.scr)[n].bound());
    std::vector<Scored> sc;
    for (auto& l : loc)
      for (const Cand& c : (q ? l.scrq : l.scr)[n].take())
        if (c.hi >= L) sc.push_back({double(c.hi), c.idx});
    TORCH_CHECK(static_cast<int64_t>(sc.size()) >= want,
                "topk_encode: non-finite pre-activations; W_enc, b_enc or threshold contain NaN");
    std::partial_sort(sc.begin(), sc.begin() + want, sc.end(), scored_before);
    return sc;
  };
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const std::vector<Scored> sc = merged(false, n, kk);
      write_row(sc, n, k, tp, vp, ip);
      ovp[n] = has_thr ? row_overflows(merged(true, n, kq), kq, k) : row_overflows(sc, kk, k);
    }
  });
}

// bfloat16 screening pays off only where the CPU has native bf16 dot products.
bool cpu_has_bf16_dot() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_cpu(
    const at::Tensor& x_, const at::Tensor& W_enc_, const at::Tensor& b_enc_, int64_t k,
    const at::Tensor& b_pre_, const at::Tensor& threshold_) {
  c10::NoGradGuard no_grad;  // the kernel's internal ATen calls are not part of any graph
  TORCH_CHECK(x_.device().is_cpu(), "topk_encode_cpu: x must be a CPU tensor");
  TORCH_CHECK(x_.dim() == 2, "topk_encode_cpu: x must be [N, D], got ", x_.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble,
              "topk_encode_cpu: x must be float32 or float64, got ", x_.scalar_type());
  const int64_t N = x_.size(0), D = x_.size(1);
  TORCH_CHECK(W_enc_.dim() == 2 && W_enc_.size(1) == D, "topk_encode_cpu: W_enc must be [S, ", D,
              "], got ", W_enc_.sizes());
  const int64_t S = W_enc_.size(0);
  TORCH_CHECK(b_enc_.dim() == 1 && b_enc_.size(0) == S, "topk_encode_cpu: b_enc must be [", S,
              "], got ", b_enc_.sizes());
  TORCH_CHECK(k >= 1 && k <= S, "topk_encode_cpu: k must be in [1, S=", S, "], got ", k);
  TORCH_CHECK(!b_pre_.defined() || (b_pre_.dim() == 1 && b_pre_.size(0) == D),
              "topk_encode_cpu: b_pre must be [", D, "]");
  TORCH_CHECK(!threshold_.defined() || (threshold_.dim() == 1 && threshold_.size(0) == S),
              "topk_encode_cpu: threshold must be [", S, "]");
  for (const at::Tensor* t : {&b_enc_, &b_pre_, &threshold_})
    TORCH_CHECK(!t->defined() || (t->scalar_type() == x_.scalar_type() && t->device().is_cpu()),
                "topk_encode_cpu: all tensors must be CPU ", x_.scalar_type());
  // W_enc may be stored in bf16 / fp16 under float32 x: read as stored, computed in fp32.
  const auto wt = W_enc_.scalar_type();
  TORCH_CHECK(W_enc_.device().is_cpu() &&
                  (wt == x_.scalar_type() ||
                   (x_.scalar_type() == at::kFloat && (wt == at::kBFloat16 || wt == at::kHalf))),
              "topk_encode_cpu: W_enc must be a CPU ", x_.scalar_type(),
              x_.scalar_type() == at::kFloat ? " (or bfloat16 / float16)" : "", " tensor, got ",
              wt);

  // detach(): internal ATen calls (possibly on worker threads, where grad mode is on) must
  // not see tensors that require grad.
  const at::Tensor x = x_.detach().contiguous(), W = W_enc_.detach().contiguous(),
                   b = b_enc_.detach().contiguous();
  const at::Tensor bpre = b_pre_.defined() ? b_pre_.detach().contiguous() : at::Tensor();
  const at::Tensor thr = threshold_.defined() ? threshold_.detach().contiguous() : at::Tensor();
  at::Tensor values = at::empty({N, k}, x.options());
  at::Tensor indices = at::empty({N, k}, x.options().dtype(at::kLong));
  at::Tensor overflow = at::empty({N}, x.options().dtype(at::kBool));
  poison_if_testing(values);
  poison_if_testing(indices);
  poison_if_testing(overflow);
  if (N == 0) return {values, indices, overflow};

  if (x.scalar_type() == at::kFloat && N < kDirectMaxRows) {
    encode_direct_f32(x, W, b, bpre, thr, k, values, indices, overflow);
  } else if (x.scalar_type() == at::kDouble) {
    encode_impl<double, float>(x, W, b, bpre, thr, k, values, indices, overflow);
  } else {
    const bool bf16 = cpu_has_bf16_dot();
    if (wt == at::kBFloat16) {
      if (bf16) encode_impl<float, at::BFloat16, at::BFloat16>(x, W, b, bpre, thr, k, values, indices, overflow);
      else encode_impl<float, float, at::BFloat16>(x, W, b, bpre, thr, k, values, indices, overflow);
    } else if (wt == at::kHalf) {
      if (bf16) encode_impl<float, at::BFloat16, at::Half>(x, W, b, bpre, thr, k, values, indices, overflow);
      else encode_impl<float, float, at::Half>(x, W, b, bpre, thr, k, values, indices, overflow);
    } else if (bf16) {
      encode_impl<float, at::BFloat16>(x, W, b, bpre, thr, k, values, indices, overflow);
    } else {
      encode_impl<float, float>(x, W, b, bpre, thr, k, values, indices, overflow);
    }
  }
  return {values, indices, overflow};
}

}  // namespace sae_sparse
