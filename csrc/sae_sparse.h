// sae_sparse CPU kernels: declarations shared by the Python binding (csrc/bindings.cpp)
// and the standalone C++ test (csrc/tests/test_cpu_kernels.cpp).
//
// Shapes follow docs/design.md: x [N, D], W_enc / W_dec [S, D] (one row per latent),
// values / indices [N, k]. All kernels take float32 or float64 tensors; the Python layer
// upcasts bfloat16 / float16 inputs. Optional tensors are passed as undefined at::Tensor().
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace sae_sparse {

// Decode / edit modes (must match sae_sparse/codes.py; tests/test_cpp.py checks).
enum Mode : int64_t { kDelta = 0, kReplace = 1, kPlain = 2 };
// Adapter activations (must match sae_sparse/codes.py; tests/test_cpp.py checks).
enum Act : int64_t { kRelu = 0, kGelu = 1, kIdentity = 2 };

// Test hook: when the environment variable SAE_SPARSE_POISON=1 is set (read once), every output
// a kernel allocates is filled with NaN (floats) or -1 (integers) before the kernel writes it,
// so an entry the kernel forgot to write shows up in the tests.
void poison_if_testing(at::Tensor& t);

// Streaming top-k encode. Never stores an N x S tensor: GEMM tiles of a screening product
// (bfloat16 where the CPU has AVX512-BF16, else float32) are scanned with a rigorous
// per-entry error bound; only the survivors are recomputed exactly.
// Returns (values [N,k] x.dtype, indices [N,k] int64, overflow [N] bool), where overflow[n]
// says row n had more than k active latents (pre > 0, and pre > threshold when given).
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_encode_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, int64_t k,
    const at::Tensor& b_pre, const at::Tensor& threshold);

// Gather decode with the latent edit (DESIGN.md "Decode").
//   mode kDelta:   y = x + sum_j v_j g_j W_dec[i_j] + act(h_pre) @ M + c
//   mode kReplace: y = sum_j v_j (1 + g_j) W_dec[i_j] + act(h_pre) @ M + c + b_dec
//   mode kPlain:   y = sum_j v_j W_dec[i_j] + b_dec
// with h_pre = sum_j v_j W_in[i_j] + b_in. Returns (y [N,D], h_pre [N,h] or undefined).
std::tuple<at::Tensor, at::Tensor> edit_decode_fwd_cpu(
    const at::Tensor& x, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& W_dec, const at::Tensor& b_dec, const at::Tensor& gain,
    const at::Tensor& W_in, const at::Tensor& b_in, const at::Tensor& M, const at::Tensor& c,
    int64_t act, int64_t mode);

// Per-token part of the edit/decode backward.
// Returns (dvalues [N,k], p [N,k] = dy . W_dec[i_j], dh [N,h] or undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> edit_decode_bwd_cpu(
    const at::Tensor& dy, const at::Tensor& values, const at::Tensor& indices,
    const at::Tensor& W_dec, const at::Tensor& gain, const at::Tensor& W_in,
    const at::Tensor& h_pre, const at::Tensor& M, int64_t act, int64_t mode);

// Groups the N*k (token, slot) pairs by latent: a stable counting sort.
// Returns (offsets [S+1] int64, order [N*k] int64 flat positions, active [A] int64 latents).
std::tuple<at::Tensor, at::Tensor, at::Tensor> latent_csr_cpu(const at::Tensor& indices,
                                                              int64_t S);

// Deterministic segmented reduction by latent (no atomics):
//   out[s] = sum_{pos in segment s} coef[pos] * (src[pos / k] - sub)      [S, C]
//   coef_sum[s] = sum_{pos in segment s} coef[pos]                        [S]
// Rows of latents that no token selected are zero. `sub` [C] is optional.
std::tuple<at::Tensor, at::Tensor> segment_rows_cpu(
    const at::Tensor& offsets, const at::Tensor& order, const at::Tensor& active,
    const at::Tensor& coef, const at::Tensor& src, const at::Tensor& sub, int64_t S, int64_t k);

}  // namespace sae_sparse
