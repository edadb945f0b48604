"""Edit + decode, fused: one launch per batch writes y (and h_pre for the backward).

Per (token, column block): the k active latents' values and ids; the coefficient of each
gathered W_dec row (plain ``v``, delta ``v gain[i]``, replace ``v (1 + gain[i])``); the FFN's
``h_pre = sum_j v_j W_in[i_j] + b_in`` from the k gathered W_in rows, its activation, and
``act(h_pre) M`` with the folded ``M = W_out W_dec``; ``c = bias W_dec``; x (delta) or
b_dec (replace, plain). Every operand is loaded in its own dtype (a bf16 SAE, an fp32
adapter) and summed in fp32 in registers; y is rounded once.
"""
from __future__ import annotations

import torch

from ..codes import ACTIVATIONS, MODES
from ..reference import activation_fn, decode_coef
from . import paths
from ._common import check_dtypes, p2, tl, triton

DELTA, PLAIN = MODES.index("delta"), MODES.index("plain")

# Columns per program, gathered rows per step, warps. At 256/32/4 an H100 measured 0.7-1.4 TB/s
# on the gathered bytes of the plain decode (2026-11-25; target >= 2): decode_sweep.py.
DECODE = dict(block_c=256, block_k=32, num_warps=4)

if triton is not None:
    from ._common import act_fwd

    @triton.jit
    def _coef(v, g, MODE: tl.constexpr, HAS_GAIN: tl.constexpr):
        """The weight of a gathered W_dec row (DESIGN.md "Decode"); gain g = gain[i]."""
        if MODE == 2:
            return v
        elif MODE == 0:
            return v * g
        else:
            if HAS_GAIN:
                return v * (1.0 + g)
            else:
                return v

    @triton.jit
    def _edit_decode_kernel(y_ptr, hpre_ptr, x_ptr, bdec_ptr, v_ptr, idx_ptr, wdec_ptr,
                            gain_ptr, win_ptr, bin_ptr, f_ptr, K, D, H,
                            MODE: tl.constexpr, ACT: tl.constexpr, HAS_GAIN: tl.constexpr,
                            HAS_FFN: tl.constexpr, HAS_BIN: tl.constexpr,
                            HAS_C: tl.constexpr, HAS_BDEC: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                            BLOCK_H: tl.constexpr):
        """y[n, c] = base + sum_j coef_j W_dec[i_j, c] + sum_h act(h_pre[n, h]) F[h, c]
        (+ F[H, c] = c_c), base = x[n] (delta) or b_dec (replace, plain)."""
        n = tl.program_id(0).to(tl.int64)
        pc = tl.program_id(1)
        c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < D
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if MODE == 0:
            acc += tl.load(x_ptr + n * D + c, mask=cm, other=0.0).to(tl.float32)
        if HAS_BDEC:
            acc += tl.load(bdec_ptr + c, mask=cm, other=0.0).to(tl.float32)
        if HAS_FFN:
            hh = tl.arange(0, BLOCK_H)
            hm = hh < H
            h = tl.zeros((BLOCK_H,), dtype=tl.float32)
            if HAS_BIN:
                h += tl.load(bin_ptr + hh, mask=hm, other=0.0).to(tl.float32)
        if (MODE != 0) | HAS_GAIN | HAS_FFN:
            for k0 in range(0, K, BLOCK_K):
                j = k0 + tl.arange(0, BLOCK_K)
                jm = j < K
                v = tl.load(v_ptr + n * K + j, mask=jm, other=0.0).to(tl.float32)
                ix = tl.load(idx_ptr + n * K + j, mask=jm, other=0)
                if HAS_FFN:
                    wi = tl.load(win_ptr + ix[:, None] * H + hh[None, :],
                                 mask=jm[:, None] & hm[None, :], other=0.0).to(tl.float32)
                    h += tl.sum(v[:, None] * wi, axis=0)
                g = v
                if HAS_GAIN:
                    g = tl.load(gain_ptr + ix, mask=jm, other=0.0).to(tl.float32)
                cf = _coef(v, g, MODE, HAS_GAIN)
                if (MODE != 0) | HAS_GAIN:
                    w = tl.load(wdec_ptr + ix[:, None] * D + c[None, :],
                                mask=jm[:, None] & cm[None, :], other=0.0).to(tl.float32)
                    acc += tl.sum(cf[:, None] * w, axis=0)
        if HAS_FFN:
            if pc == 0:
                tl.store(hpre_ptr + n * H + hh, h, mask=hm)
            a = act_fwd(h, ACT)
            m = tl.load(f_ptr + hh[:, None] * D + c[None, :], mask=hm[:, None] & cm[None, :],
                        other=0.0)
            acc += tl.sum(a[:, None] * m, axis=0)
        if HAS_C:
            acc += tl.load(f_ptr + H * D + c, mask=cm, other=0.0)
        tl.store(y_ptr + n * D + c, acc, mask=cm)


def edit_decode_fwd(x, values, indices, W_dec, b_dec, gain, W_in, b_in, F, act, mode,
                    has_c=False, out_dtype=None):
    """y [N, D] (values' dtype, or out_dtype) and h_pre [N, h] (fp32; None without an FFN).
    F: the folded [M; c] of fold() (fp32 [h + has_c, D]); act, mode: codes. Each tensor in its
    own dtype (an fp32 adapter on a bf16 SAE is not cast)."""
    check_dtypes(x, values, W_dec, b_dec, gain, W_in, b_in)
    N, K = values.shape
    D = W_dec.shape[1]
    dev = values.device
    H = W_in.shape[1] if W_in is not None else 0
    dt = out_dtype or values.dtype
    y = torch.empty(N, D, dtype=dt, device=dev)
    h_pre = torch.empty(N, H, dtype=torch.float32, device=dev) if H else None
    if N == 0 or D == 0:
        return y, h_pre
    args = (y, h_pre, x, values, indices, W_dec, b_dec, gain, W_in, b_in, F, act, mode, has_c)
    key = paths.bucket("edit_decode", values, W_dec, b_dec, gain, W_in, F, mode=mode, act=act,
                       has_c=has_c)
    path = paths.choose(key, dev, {"fused": lambda: (_edit_decode(*args), h_pre),
                                   "torch": lambda: (_edit_decode_torch(*args), h_pre)},
                        compare=_decode_mismatch)
    return (_edit_decode if path == "fused" else _edit_decode_torch)(*args), h_pre


def _decode_mismatch(got, want):
    """None when (y, h_pre) of the two paths agree to a tolerance of y's dtype (h_pre: fp32),
    else a sentence (paths.mismatch)."""
    why = paths.mismatch(got[0], want[0], "y", dtype=want[0].dtype)
    if why is None and want[1] is not None:
        why = paths.mismatch(got[1], want[1], "h_pre", dtype=torch.float32)
    return why


def _edit_decode_torch(y, h_pre, x, values, indices, W_dec, b_dec, gain, W_in, b_in, F, act,
                       mode, has_c):
    """The same edit + decode from torch ops (the paths.py candidate): ``F.embedding_bag``
    gathers of W_dec (and W_in) rows weighted by the coefficients, fp32 sums of the dense
    terms; h_pre written for the backward. -> y (also written into y)."""
    bag = torch.nn.functional.embedding_bag
    v = values.float()
    out = (x.to(torch.float32, copy=True) if mode == DELTA  # summed into in place: not x
           else torch.zeros(y.shape, device=y.device))
    coef = decode_coef(v, indices, gain.float() if gain is not None else None, MODES[mode])
    if coef is not None:
        out += bag(indices, W_dec, per_sample_weights=coef.to(W_dec.dtype), mode="sum").float()
    if mode != DELTA and b_dec is not None:
        out += b_dec.float()
    if h_pre is not None:
        H = W_in.shape[1]
        h = bag(indices, W_in.float(), per_sample_weights=v, mode="sum")
        if b_in is not None:
            h += b_in.float()
        h_pre.copy_(h)
        out += activation_fn(ACTIVATIONS[act])(h) @ F[:H]
    if has_c:
        out += F[-1]
    return y.copy_(out)


def _edit_decode(y, h_pre, x, values, indices, W_dec, b_dec, gain, W_in, b_in, F, act, mode,
                 has_c):
    N, K = values.shape
    D = W_dec.shape[1]
    H = W_in.shape[1] if W_in is not None else 0
    dummy = values
    BLOCK_C = min(DECODE["block_c"], p2(D))
    _edit_decode_kernel[(N, triton.cdiv(D, BLOCK_C))](
        y, h_pre if H else dummy, x.contiguous() if mode == DELTA else dummy,
        b_dec if (b_dec is not None and mode != DELTA) else dummy, values.contiguous(),
        indices.contiguous(), W_dec.contiguous(), gain.contiguous() if gain is not None else dummy,
        W_in.contiguous() if H else dummy, b_in if b_in is not None else dummy,
        F if F is not None else dummy, K, D, H,
        MODE=mode, ACT=act, HAS_GAIN=gain is not None and mode != PLAIN, HAS_FFN=H > 0,
        HAS_BIN=b_in is not None, HAS_C=has_c, HAS_BDEC=b_dec is not None and mode != DELTA,
        BLOCK_K=min(DECODE["block_k"], p2(K)), BLOCK_C=BLOCK_C, BLOCK_H=p2(H, 2),
        num_warps=DECODE["num_warps"])
    return y
