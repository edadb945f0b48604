"""The edit's dense terms and their gradients, as GEMMs that read W_dec once in its own dtype.

An adapter with a bias or an FFN adds ``c = bias W_dec`` and ``M = W_out W_dec`` to every
token (DESIGN.md "Decode"). ``fold`` computes ``F = [W_out; bias] W_dec`` ([h + 1, D], fp32)
in one product; ``fold_t`` its backward ``dF W_dec^T`` ([h + 1, S]: dW_out and dbias), and
``fold_w`` the gradient it sends a trainable W_dec (``[W_out; bias]^T dF``, in W_dec's dtype).
The adapter's fp32 rows and the fp32 gradient meet a bf16 W_dec on tensor cores as three
bf16 parts split in registers (each product exact, the sum fp32-grade): no upcast copy of
W_dec, no cast copies of the adapter. fp16 W_dec (whose range cannot hold the parts) and
fp32 W_dec take IEEE fp32 products.
"""
from __future__ import annotations

import torch

from ._common import check_dtypes, p2, sm_count, tl, triton

# Tiles: [rows of A (<= 32 per row block), block_n] of fp32 sums over block_k steps
# (forward: n = columns of W_dec, k = latents); fold_t: [rows, block_t latents] over
# block_k columns (128 latents with the three-part bf16 products spilled 8 bytes on
# sm_90); fold_w writes w_tile blocks of dW. Not tuned on a GPU.
FOLD = dict(block_k=32, block_n=128, block_t=64, num_warps=4, num_stages=3,
            programs_per_sm=4, w_tile=(64, 128))

if triton is not None:
    @triton.jit
    def _parts_dot(a, w, acc, PARTS: tl.constexpr, IEEE: tl.constexpr):
        """acc + a @ w with fp32 a and w in its own dtype: PARTS == 3: a split into three
        parts in w's dtype (bf16), three exact tensor-core products; else fp32 products."""
        if PARTS == 3:
            a1 = a.to(w.dtype)
            r = a - a1.to(tl.float32)
            a2 = r.to(w.dtype)
            a3 = (r - a2.to(tl.float32)).to(w.dtype)
            acc = tl.dot(a1, w, acc)
            acc = tl.dot(a2, w, acc)
            acc = tl.dot(a3, w, acc)
        elif IEEE:
            acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w.to(tl.float32), acc)
        return acc

    @triton.jit
    def _load_rows(wout_ptr, bias_ptr, r, s, H, S, HAS_BIAS: tl.constexpr, rm, sm):
        """[rows r, latents s] of A = [W_out; bias] (W_out [H, S], bias [S] as row H), fp32."""
        a = tl.load(wout_ptr + r.to(tl.int64)[:, None] * S + s[None, :],
                    mask=(r < H)[:, None] & sm[None, :], other=0.0).to(tl.float32)
        if HAS_BIAS:
            bb = tl.load(bias_ptr + s, mask=sm, other=0.0).to(tl.float32)
            a = tl.where((r == H)[:, None], bb[None, :], a)
        return a

    @triton.jit
    def _fold_kernel(out_ptr, wout_ptr, bias_ptr, w_ptr, R, H, S, D, S_PER,
                     HAS_BIAS: tl.constexpr, PARTS: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[p, r, d] = sum over latents s of split p (S_PER of them) of A[r, s] W[s, d]."""
        pd = tl.program_id(0)
        p = tl.program_id(1)
        r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        rm = r < R
        dm = d < D
        end = tl.minimum(S, (p + 1) * S_PER)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        for s0 in range(p * S_PER, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            sm = s < end
            a = _load_rows(wout_ptr, bias_ptr, r, s, H, S, HAS_BIAS, rm, sm)
            w = tl.load(w_ptr + s.to(tl.int64)[:, None] * D + d[None, :],
                        mask=sm[:, None] & dm[None, :], other=0.0)
            acc = _parts_dot(a, w, acc, PARTS, IEEE)
        tl.store(out_ptr + (p * R + r.to(tl.int64))[:, None] * D + d[None, :], acc,
                 mask=rm[:, None] & dm[None, :])

    @triton.jit
    def _fold_t_kernel(out_ptr, g_ptr, w_ptr, R, S, D,
                       PARTS: tl.constexpr, IEEE: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[r, s] = sum_d G[r, d] W[s, d] in fp32 (G fp32 [R, D], split in registers)."""
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = r < R
        sm = s < S
        acc = tl.zeros((BLOCK_R, BLOCK_S), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            w = tl.load(w_ptr + s.to(tl.int64)[:, None] * D + d[None, :],
                        mask=sm[:, None] & dm[None, :], other=0.0)
            g = tl.load(g_ptr + r[:, None] * D + d[None, :], mask=rm[:, None] & dm[None, :],
                        other=0.0)
            acc = _parts_dot(g, tl.trans(w), acc, PARTS, IEEE)
        tl.store(out_ptr + r.to(tl.int64)[:, None] * S + s[None, :], acc,
                 mask=rm[:, None] & sm[None, :])

    @triton.jit
    def _fold_w_kernel(out_ptr, wout_ptr, bias_ptr, g_ptr, R, H, S, D,
                       HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        """out[s, d] = sum_r A[r, s] G[r, d] (A = [W_out; bias], G fp32), IEEE fp32 products,
        rounded once to out's dtype (W_dec's): no fp32 [S, D] intermediate."""
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        sm = s < S
        dm = d < D
        acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rm = r < R
            a = _load_rows(wout_ptr, bias_ptr, r, s, H, S, HAS_BIAS, rm, sm)  # [R, S] block
            g = tl.load(g_ptr + r[:, None] * D + d[None, :], mask=rm[:, None] & dm[None, :],
                        other=0.0)
            acc = tl.dot(tl.trans(a), g, acc, input_precision="ieee")
        tl.store(out_ptr + s.to(tl.int64)[:, None] * D + d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=sm[:, None] & dm[None, :])


def _parts(W):
    """(PARTS, IEEE) for products of fp32 operands with W's dtype."""
    return (3 if W.dtype == torch.bfloat16 else 1), W.dtype != torch.bfloat16


def _rows(W_out, bias):
    H = W_out.shape[0] if W_out is not None else 0
    return H, H + (bias is not None)


def fold(W_dec, bias=None, W_out=None):
    """F = [W_out; bias] @ W_dec -> fp32 [h + (bias given), D]: M = F[:h], c = F[h].
    W_dec is read once in its own dtype; the latents are split across programs so a short-D
    product still fills the GPU (partial sums added by torch: deterministic)."""
    check_dtypes(W_dec, bias, W_out)
    S, D = W_dec.shape
    H, R = _rows(W_out, bias)
    dev = W_dec.device
    if R == 0 or S == 0 or D == 0:
        return torch.zeros(R, D, dtype=torch.float32, device=dev)
    W = W_dec.contiguous()
    BR = min(p2(R, 16), 32)
    BD, BS = FOLD["block_n"], FOLD["block_k"]
    grid_d, grid_r = triton.cdiv(D, BD), triton.cdiv(R, BR)
    want = sm_count(dev) * FOLD["programs_per_sm"]
    split = max(1, min(triton.cdiv(S, BS), want // (grid_d * grid_r)))
    per = triton.cdiv(triton.cdiv(S, split), BS) * BS
    split = triton.cdiv(S, per)
    part = torch.empty(split, R, D, dtype=torch.float32, device=dev)
    parts, ieee = _parts(W)
    wout = W_out.contiguous() if W_out is not None else W
    _fold_kernel[(grid_d, split, grid_r)](
        part, wout, bias.contiguous() if bias is not None else W, W, R, H, S, D, per,
        HAS_BIAS=bias is not None, PARTS=parts, IEEE=ieee, BLOCK_R=BR, BLOCK_S=BS, BLOCK_D=BD,
        num_warps=FOLD["num_warps"],
        num_stages=FOLD["num_stages"])
    return part[0] if split == 1 else part.sum(0)


def fold_t(G, W):
    """G [R, D] (fp32) @ W [S, D]^T -> fp32 [R, S] (dW_out rows, then dbias), W read once."""
    check_dtypes(W)
    R, D = G.shape
    S = W.shape[0]
    if R == 0 or S == 0 or D == 0:
        return torch.zeros(R, S, dtype=torch.float32, device=W.device)
    W = W.contiguous()
    BR = min(p2(R, 16), 32)
    BS, BD = FOLD["block_t"], FOLD["block_k"]
    out = torch.empty(R, S, dtype=torch.float32, device=W.device)
    parts, ieee = _parts(W)
    _fold_t_kernel[(triton.cdiv(S, BS), triton.cdiv(R, BR))](
        out, G.float().contiguous(), W, R, S, D, PARTS=parts, IEEE=ieee, BLOCK_R=BR,
        BLOCK_S=BS, BLOCK_D=BD, num_warps=FOLD["num_warps"],
        num_stages=FOLD["num_stages"])
    return out


def fold_w(G, S, dtype, bias=None, W_out=None):
    """[W_out; bias]^T @ G (G fp32 [R, D]) -> [S, D] in `dtype` (W_dec's): the folds'
    gradient for a trainable W_dec, summed in fp32 and rounded once."""
    D = G.shape[1]
    H, R = _rows(W_out, bias)
    out = torch.empty(S, D, dtype=dtype, device=G.device)
    if S == 0 or D == 0:
        return out
    if R == 0:
        return out.zero_()
    BS, BD = FOLD["w_tile"]
    _fold_w_kernel[(triton.cdiv(S, BS), triton.cdiv(D, BD))](
        out, W_out.contiguous() if W_out is not None else G, bias if bias is not None else G,
        G.float().contiguous(), R, H, S, D, HAS_BIAS=bias is not None,
        BLOCK_R=min(p2(R, 16), 32),
        BLOCK_S=BS, BLOCK_D=BD, num_warps=FOLD["num_warps"])
    return out
