"""The backward of the edit / SAE step, in three kinds of launch (plus the folds' GEMMs):

* ``_token_bwd_kernel`` -- per token: ``p_j = dy . W_dec[i_j]`` and ``q = M dy`` in one pass
  over dy's row, then the FFN's ``dh = q * act'(h_pre)``, the gradient at each selected
  pre-activation (``dpre``: the edit's ``dz`` plus the code's own gradient, zero where the
  value is 0), the per-slot terms the per-latent sums need (``v p`` for the gain), and in a
  second pass ``dx = dy (delta) + sum_j dpre_j W_enc[i_j]``.
* ``_dense_bwd_kernel`` -- ``dF = [act(h_pre); 1]^T dy`` (dM and dc, what ``fold_t`` turns
  into dW_out and dbias) and ``db_in = sum_n dh``, split over tokens.
* ``_latent_bwd_kernel`` -- per latent, a deterministic sum over the (token, slot) pairs that
  selected it (a segment of the pairs sorted by latent, ``latent_csr``; no atomics): dgain,
  dW_in, dW_enc / db_enc and dW_dec in one pass over the segment.
"""
from __future__ import annotations

import torch

from ._common import p2, sm_count, tl, triton

# Columns per program of the per-latent sums, pairs gathered per step; dense_bwd's tokens per
# step. Not tuned on a GPU.
SEGMENT = dict(block_e=16, block_c=256, num_warps=4)
TOKEN = dict(block_d=128, num_warps=4)
DENSE = dict(block_d=128, block_n=32, programs_per_sm=2, num_warps=4)

if triton is not None:
    from ._common import act_fwd, act_grad

    @triton.jit
    def _token_bwd_kernel(dy_ptr, v_ptr, idx_ptr, wdec_ptr, gain_ptr, win_ptr, hpre_ptr,
                          f_ptr, dvx_ptr, wenc_ptr,
                          dh_ptr, dpre_ptr, gp_ptr, p_ptr, dx_ptr, K, D, H,
                          MODE: tl.constexpr, ACT: tl.constexpr, HAS_GAIN: tl.constexpr,
                          HAS_FFN: tl.constexpr, HAS_DVX: tl.constexpr,
                          NEED_P: tl.constexpr, STORE_P: tl.constexpr,
                          STORE_DPRE: tl.constexpr, MASK_DPRE: tl.constexpr,
                          STORE_GP: tl.constexpr, HAS_DX: tl.constexpr, DX_ID: tl.constexpr,
                          KP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, KP)
        jm = j < K
        ix = tl.load(idx_ptr + n * K + j, mask=jm, other=0)
        v = tl.load(v_ptr + n * K + j, mask=jm, other=0.0).to(tl.float32)
        p = tl.zeros((KP,), dtype=tl.float32)
        if HAS_FFN:
            hh = tl.arange(0, BLOCK_H)
            hm = hh < H
            q = tl.zeros((BLOCK_H,), dtype=tl.float32)
        if NEED_P | HAS_FFN:
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = d < D
                g = tl.load(dy_ptr + n * D + d, mask=dm, other=0.0).to(tl.float32)
                if NEED_P:
                    w = tl.load(wdec_ptr + ix[:, None] * D + d[None, :],
                                mask=jm[:, None] & dm[None, :], other=0.0).to(tl.float32)
                    p += tl.sum(w * g[None, :], axis=1)
                if HAS_FFN:
                    m = tl.load(f_ptr + hh[:, None] * D + d[None, :],
                                mask=hm[:, None] & dm[None, :], other=0.0)
                    q += tl.sum(m * g[None, :], axis=1)
        # the gradient at the code: dz_j = p_j * d coef / d v (+ the FFN's and the code's own)
        if HAS_GAIN:
            gi = tl.load(gain_ptr + ix, mask=jm, other=0.0).to(tl.float32)
        if MODE == 2:
            dv = p
        elif MODE == 0:
            if HAS_GAIN:
                dv = p * gi
            else:
                dv = tl.zeros((KP,), dtype=tl.float32)
        else:
            if HAS_GAIN:
                dv = p * (1.0 + gi)
            else:
                dv = p
        if HAS_FFN:
            dh = q * act_grad(tl.load(hpre_ptr + n * H + hh, mask=hm, other=0.0), ACT)
            tl.store(dh_ptr + n * H + hh, dh, mask=hm)
            wi = tl.load(win_ptr + ix[:, None] * H + hh[None, :], mask=jm[:, None] & hm[None, :],
                         other=0.0).to(tl.float32)
            dv += tl.sum(wi * dh[None, :], axis=1)
        if HAS_DVX:
            dv += tl.load(dvx_ptr + n * K + j, mask=jm, other=0.0).to(tl.float32)
        if MASK_DPRE:  # relu / JumpReLU: no gradient where the value is 0
            dv = tl.where(v != 0.0, dv, 0.0)
        if STORE_DPRE:
            tl.store(dpre_ptr + n * K + j, dv, mask=jm)
        if STORE_GP:
            tl.store(gp_ptr + n * K + j, v * p, mask=jm)
        if STORE_P:
            tl.store(p_ptr + n * K + j, p, mask=jm)
        if HAS_DX:
            for d0 in range(0, D, BLOCK_D):
                d = d0 + tl.arange(0, BLOCK_D)
                dm = d < D
                w = tl.load(wenc_ptr + ix[:, None] * D + d[None, :],
                            mask=jm[:, None] & dm[None, :], other=0.0).to(tl.float32)
                acc = tl.sum(w * dv[:, None], axis=0)
                if DX_ID:
                    acc += tl.load(dy_ptr + n * D + d, mask=dm, other=0.0).to(tl.float32)
                tl.store(dx_ptr + n * D + d, acc, mask=dm)

    @triton.jit
    def _dense_bwd_kernel(out_ptr, hpre_ptr, dh_ptr, dy_ptr, N, D, H, R, N_PER, OUT_STRIDE,
                          ACT: tl.constexpr, HAS_C: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[p, r * D + d] = sum over split p's tokens of A[n, r] dy[n, d], A = [act(h_pre),
        1]; out[p, R * D + h] = the same tokens' sum of dh[n, h] (program column 0)."""
        pd = tl.program_id(0)
        p = tl.program_id(1)
        d = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = d < D
        r = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        hsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
        end = tl.minimum(N, (p + 1) * N_PER)
        for n0 in range(p * N_PER, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nm = n < end
            hp = tl.load(hpre_ptr + n.to(tl.int64)[:, None] * H + r[None, :],
                         mask=nm[:, None] & (r < H)[None, :], other=0.0)
            a = tl.where((r < H)[None, :], act_fwd(hp, ACT), 0.0)
            if HAS_C:
                a = tl.where(nm[:, None] & (r == H)[None, :], 1.0, a)
            g = tl.load(dy_ptr + n.to(tl.int64)[:, None] * D + d[None, :],
                        mask=nm[:, None] & dm[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(tl.trans(a), g, acc, input_precision="ieee")
            if pd == 0:
                dh = tl.load(dh_ptr + n.to(tl.int64)[:, None] * H + r[None, :],
                             mask=nm[:, None] & (r < H)[None, :], other=0.0)
                hsum += tl.sum(dh, axis=0)
        base = out_ptr + p.to(tl.int64) * OUT_STRIDE
        tl.store(base + r[:, None] * D + d[None, :], acc, mask=(r < R)[:, None] & dm[None, :])
        if pd == 0:
            tl.store(base + R * D + r, hsum, mask=r < H)

    @triton.jit
    def _latent_bwd_kernel(off_ptr, order_ptr, active_ptr, v_ptr, gp_ptr, dh_ptr, dpre_ptr,
                           x_ptr, sub_ptr, dy_ptr, gain_ptr,
                           dgain_ptr, dwin_ptr, dwenc_ptr, dbenc_ptr, dwdec_ptr,
                           K, D, H, S,
                           HAS_ACTIVE: tl.constexpr, G_GAIN: tl.constexpr,
                           G_WIN: tl.constexpr, G_WENC: tl.constexpr, HAS_SUB: tl.constexpr,
                           G_BENC: tl.constexpr, G_WDEC: tl.constexpr, DEC_MODE: tl.constexpr,
                           HAS_GAIN: tl.constexpr, ADD_WDEC: tl.constexpr,
                           BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr):
        """For latent s (program 0's index, or active[program 0]) and column block program 1,
        over the pairs e of its segment (token n = e // K):
          dgain[s] = sum gp[e];  dW_in[s, :H] = sum v[e] dh[n];
          dW_enc[s] = sum dpre[e] x[n] - (sum dpre[e]) b_pre;  db_enc[s] = sum dpre[e];
          dW_dec[s] (+)= coef(s) sum v[e] dy[n]  (coef: 1 plain, gain[s] delta, 1 + gain[s]
          replace). BLOCK_E pairs are gathered per step; a fixed order: deterministic."""
        a = tl.program_id(0)
        pc = tl.program_id(1)
        if HAS_ACTIVE:
            s = tl.load(active_ptr + a)  # S pads the list
        else:
            s = a.to(tl.int64)
        ok = s < S
        start = tl.load(off_ptr + s)
        end = tl.load(off_ptr + s + 1, mask=ok, other=0)
        end = tl.where(ok, end, start)
        c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < D
        hm = c < H
        acc_enc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_dec = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_in = tl.zeros((BLOCK_C,), dtype=tl.float32)
        tot_gp = tl.zeros((BLOCK_E,), dtype=tl.float32)
        tot_dp = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for e0 in range(start, end, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            em = e < end
            pos = tl.load(order_ptr + e, mask=em, other=0)
            tok = (pos // K)[:, None]
            if G_WIN | G_WDEC:
                v = tl.load(v_ptr + pos, mask=em, other=0.0).to(tl.float32)
            if G_GAIN:
                tot_gp += tl.load(gp_ptr + pos, mask=em, other=0.0)
            if G_WIN:
                rows = tl.load(dh_ptr + tok * H + c[None, :], mask=em[:, None] & hm[None, :],
                               other=0.0)
                acc_in += tl.sum(v[:, None] * rows, axis=0)
            if G_WENC | G_BENC:
                dp = tl.load(dpre_ptr + pos, mask=em, other=0.0)
                tot_dp += dp
                if G_WENC:
                    rows = tl.load(x_ptr + tok * D + c[None, :], mask=em[:, None] & cm[None, :],
                                   other=0.0).to(tl.float32)
                    acc_enc += tl.sum(dp[:, None] * rows, axis=0)
            if G_WDEC:
                rows = tl.load(dy_ptr + tok * D + c[None, :], mask=em[:, None] & cm[None, :],
                               other=0.0).to(tl.float32)
                acc_dec += tl.sum(v[:, None] * rows, axis=0)
        if G_GAIN:
            if pc == 0:
                tl.store(dgain_ptr + s, tl.sum(tot_gp, axis=0), mask=ok)
        if G_WIN:
            tl.store(dwin_ptr + s * H + c, acc_in, mask=ok & hm)
        if G_WENC | G_BENC:
            tdp = tl.sum(tot_dp, axis=0)
            if G_BENC:
                if pc == 0:
                    tl.store(dbenc_ptr + s, tdp, mask=ok)
            if G_WENC:
                if HAS_SUB:
                    acc_enc -= tdp * tl.load(sub_ptr + c, mask=cm, other=0.0).to(tl.float32)
                tl.store(dwenc_ptr + s * D + c, acc_enc, mask=ok & cm)
        if G_WDEC:
            if DEC_MODE == 0:
                acc_dec *= tl.load(gain_ptr + s, mask=ok, other=0.0).to(tl.float32)
            elif DEC_MODE == 1:
                if HAS_GAIN:
                    acc_dec *= 1.0 + tl.load(gain_ptr + s, mask=ok, other=0.0).to(tl.float32)
            if ADD_WDEC:
                acc_dec += tl.load(dwdec_ptr + s * D + c, mask=ok & cm, other=0.0).to(tl.float32)
            tl.store(dwdec_ptr + s * D + c, acc_dec, mask=ok & cm)


def token_bwd(dy, values, indices, W_dec, *, mode, act=0, gain=None, W_in=None, h_pre=None,
              F=None, dvalues=None, W_enc=None, need_p=True, store_p=False, store_dpre=False,
              mask_dpre=True, store_gp=False, dx_identity=False, dx_dtype=None):
    """The per-token backward (see the module docstring). -> dict of what was asked: dh
    [N, h] fp32 (with an FFN), dpre [N, k] fp32, gp [N, k] fp32 (v p), p [N, k] fp32, dx
    [N, D] (W_enc given; dx_dtype)."""
    N, K = values.shape
    D = W_dec.shape[1]
    dev = dy.device
    H = W_in.shape[1] if W_in is not None else 0
    f32 = dict(dtype=torch.float32, device=dev)
    out = {}
    if H:
        out["dh"] = torch.empty(N, H, **f32)
    if store_dpre:
        out["dpre"] = torch.empty(N, K, **f32)
    if store_gp:
        out["gp"] = torch.empty(N, K, **f32)
    if store_p:
        out["p"] = torch.empty(N, K, **f32)
    if W_enc is not None:
        out["dx"] = torch.empty(N, D, dtype=dx_dtype or dy.dtype, device=dev)
    if N == 0:
        return out
    dummy = values
    dy = dy.contiguous()
    _token_bwd_kernel[(N,)](
        dy, values.contiguous(), indices.contiguous(), W_dec.contiguous(),
        gain.contiguous() if gain is not None else dummy,
        W_in.contiguous() if H else dummy, h_pre if H else dummy, F if H else dummy,
        dvalues.contiguous() if dvalues is not None else dummy,
        W_enc.contiguous() if W_enc is not None else dummy,
        out.get("dh", dummy), out.get("dpre", dummy), out.get("gp", dummy), out.get("p", dummy),
        out.get("dx", dummy), K, D, H,
        MODE=mode, ACT=act, HAS_GAIN=gain is not None and mode != 2, HAS_FFN=H > 0,
        HAS_DVX=dvalues is not None, NEED_P=need_p or store_p or store_gp,
        STORE_P=store_p, STORE_DPRE=store_dpre, MASK_DPRE=mask_dpre, STORE_GP=store_gp,
        HAS_DX=W_enc is not None, DX_ID=dx_identity, KP=p2(K, 2),
        BLOCK_D=min(TOKEN["block_d"], p2(D)), BLOCK_H=p2(H, 2),
        num_warps=TOKEN["num_warps"])
    return out


def dense_bwd(dy, h_pre, dh, act, has_c):
    """(dF [h + has_c, D] fp32, db_in [h] fp32): dF = [act(h_pre), 1]^T dy, db_in = sum dh."""
    N, D = dy.shape
    H = h_pre.shape[1] if h_pre is not None else 0
    R = H + has_c
    dev = dy.device
    if N == 0 or R == 0:
        z = torch.zeros(R * D + H, dtype=torch.float32, device=dev)
        return z[:R * D].view(R, D), z[R * D:]
    BD = min(DENSE["block_d"], p2(D))
    BN = 16 if N < 32 else DENSE["block_n"]
    grid_d = triton.cdiv(D, BD)
    want = sm_count(dev) * DENSE["programs_per_sm"]
    split = max(1, min(triton.cdiv(N, BN), want // grid_d))
    per = triton.cdiv(triton.cdiv(N, split), BN) * BN
    split = triton.cdiv(N, per)
    width = R * D + H
    part = torch.empty(split, width, dtype=torch.float32, device=dev)
    dummy = part
    _dense_bwd_kernel[(grid_d, split)](
        part, h_pre if H else dummy, dh if H else dummy, dy.contiguous(), N, D, H, R, per, width,
        ACT=act, HAS_C=has_c, BLOCK_R=p2(R, 16), BLOCK_N=BN, BLOCK_D=BD,
        num_warps=DENSE["num_warps"])
    tot = part[0] if split == 1 else part.sum(0)
    return tot[:R * D].view(R, D), tot[R * D:]


def latent_csr(ids, S, *, active_list=False):
    """(token, slot) pairs grouped by latent, without a host sync: order [N*k] (a stable sort
    of the pairs by latent), offsets [S + 1] (latent s owns order[offsets[s]:offsets[s + 1]])
    and active: None -- one program per latent, and those without pairs write their rows of
    the dense [S, ...] gradients as zeros (the bytes a zero fill would write, in the same
    launch) -- or, with ``active_list`` and N*k < S, the [N*k] latents with pairs in increasing
    order, padded with S (the outputs then need a zero fill first). ids: int32 (what the
    encode writes for this; a radix sort over half the bits of int64)."""
    flat = ids.reshape(-1)
    if flat.dtype != torch.int32 and S < 2 ** 31 - 1:
        flat = flat.to(torch.int32)
    dev = ids.device
    by_latent, order = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(by_latent, torch.arange(S + 1, device=dev, dtype=flat.dtype))
    if flat.numel() >= S or not active_list:
        return offsets, order, None
    seen = torch.cumsum(offsets[1:] > offsets[:-1], 0)  # active latents among 0..s
    active = torch.searchsorted(seen, torch.arange(1, flat.numel() + 1, device=dev))  # S: pad
    return offsets, order, active


def latent_bwd(csr, S, K, *, values=None, gp=None, dh=None, dpre=None, x=None, b_pre=None,
               dy=None, gain=None, dec_mode=2, need_gain=False, need_win=False,
               need_wenc=False, need_benc=False, need_wdec=False, wenc_dtype=None,
               wdec_dtype=None, wdec_init=None, adapter_dtype=torch.float32):
    """Per-latent sums over the pairs grouped by ``latent_csr`` (see _latent_bwd_kernel):
    -> dict with dgain [S], dW_in [S, h], dW_enc [S, D], db_enc [S], dW_dec [S, D] (added
    to wdec_init, which it then is, when given)."""
    offsets, order, active = csr
    dev = order.device
    H = dh.shape[1] if dh is not None else 0
    D = x.shape[1] if x is not None else (dy.shape[1] if dy is not None else 0)
    new = torch.empty if active is None else torch.zeros  # every row written, or only some
    out = {}
    if need_gain:
        out["gain"] = new(S, dtype=adapter_dtype, device=dev)
    if need_win:
        out["W_in"] = new(S, H, dtype=adapter_dtype, device=dev)
    if need_wenc:
        out["W_enc"] = new(S, D, dtype=wenc_dtype, device=dev)
    if need_benc:
        out["b_enc"] = new(S, dtype=wenc_dtype, device=dev)
    if need_wdec:
        out["W_dec"] = wdec_init if wdec_init is not None else new(S, D, dtype=wdec_dtype,
                                                                   device=dev)
    A = S if active is None else active.numel()
    C = max(D if (need_wenc or need_wdec) else 0, H if need_win else 0, 1)
    if A == 0 or not out:
        return out
    BLOCK_C = min(SEGMENT["block_c"], p2(C))
    dummy = order
    g = lambda t: t.contiguous() if t is not None else dummy  # noqa: E731
    _latent_bwd_kernel[(A, triton.cdiv(C, BLOCK_C))](
        offsets, order, active if active is not None else dummy, g(values), g(gp), g(dh),
        g(dpre), g(x), g(b_pre), g(dy), g(gain),
        out.get("gain", dummy), out.get("W_in", dummy), out.get("W_enc", dummy),
        out.get("b_enc", dummy), out.get("W_dec", dummy), K, D, H, S,
        HAS_ACTIVE=active is not None, G_GAIN=need_gain, G_WIN=need_win, G_WENC=need_wenc,
        HAS_SUB=b_pre is not None, G_BENC=need_benc, G_WDEC=need_wdec, DEC_MODE=dec_mode,
        HAS_GAIN=gain is not None, ADD_WDEC=wdec_init is not None,
        BLOCK_E=SEGMENT["block_e"], BLOCK_C=BLOCK_C, num_warps=SEGMENT["num_warps"])
    return out

