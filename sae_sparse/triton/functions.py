"""A whole step's autograd Functions on the triton backend: they only orchestrate the phase
launchers (encode, fold, edit_decode, backward). An ``sae_edit`` training step is 3 encode
launches, a fold, the fused edit + decode, and in the backward one per-token kernel, the
dense FFN/bias backward, its fold_t GEMM and one per-latent sum -- no host sync, no cast
copies (tests/test_launches.py counts them)."""
from __future__ import annotations

import torch

from ..codes import MODES
from .backward import dense_bwd, latent_bwd, latent_csr, token_bwd
from .edit_decode import edit_decode_fwd
from .encode import topk_encode
from .fold import fold, fold_t, fold_w

DELTA, PLAIN = MODES.index("delta"), MODES.index("plain")


def _b_pre_grad(db_enc, W_enc):
    """d b_pre = -sum over tokens of sum_j dpre_j W_enc[i_j] = -db_enc @ W_enc."""
    return -(db_enc.float() @ W_enc.float())


class FusedSAEEdit(torch.autograd.Function):
    """y = edit-decode(x, topk_encode(x)) with the adapter (gain, bias, W_in, b_in, W_out) in
    its own dtype; also the per-row overflow flags. Gradients reach x, every adapter
    parameter and every SAE parameter that requires one (not the threshold)."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, thr, W_dec, b_dec, gain, bias, W_in, b_in, W_out,
                k, act, mode, tied):
        bp = b_dec if tied else b_pre
        values, indices, overflow, ids = topk_encode(x, W_enc, b_enc, k, bp, thr, id32=True)
        has_c = bias is not None
        F = fold(W_dec, bias, W_out) if (has_c or W_out is not None) else None
        y, h_pre = edit_decode_fwd(x if mode == DELTA else None, values, indices, W_dec,
                                   b_dec, gain, W_in, b_in, F, act, mode, has_c=has_c,
                                   out_dtype=x.dtype)
        ctx.save_for_backward(x, W_enc, bp, W_dec, gain, bias, W_in, W_out, values, indices,
                              ids, h_pre, F)
        ctx.k, ctx.act, ctx.mode, ctx.tied, ctx.has_c = k, act, mode, tied, has_c
        ctx.mark_non_differentiable(overflow)
        return y, overflow

    @staticmethod
    def backward(ctx, dy, _dovf):
        x, W_enc, bp, W_dec, gain, bias, W_in, W_out, values, indices, ids, h_pre, F = \
            ctx.saved_tensors
        (n_x, n_We, n_be, n_bp, _, n_Wd, n_bd, n_g, n_b, n_Wi, n_bi,
         n_Wo) = ctx.needs_input_grad[:12]
        mode, k, S = ctx.mode, ctx.k, W_dec.shape[0]
        if ctx.tied:
            n_bp = n_bd
        dy = dy.contiguous()
        H = W_in.shape[1] if W_in is not None else 0
        need_dv = n_x or n_We or n_be or n_bp
        need_dh = H > 0 and (n_Wi or n_bi or need_dv)
        sparse_dec = n_Wd and (mode != DELTA or gain is not None)
        o = {}
        if need_dv or n_g or need_dh:
            o = token_bwd(dy, values, indices, W_dec, mode=mode, act=ctx.act, gain=gain,
                          W_in=W_in if need_dh else None, h_pre=h_pre, F=F,
                          W_enc=W_enc if n_x else None,
                          need_p=mode != DELTA or gain is not None or n_g,
                          store_dpre=n_We or n_be or n_bp, store_gp=n_g,
                          dx_identity=mode == DELTA, dx_dtype=x.dtype)
        dx = o.get("dx") if n_x else None
        if n_x and "dx" not in o:  # delta mode, nothing flows into the code
            dx = dy
        dWo = dbias = dbin = dWd = None
        R = H + ctx.has_c
        if R and (n_Wo or n_b or n_bi or n_Wd):
            dF, dbin = dense_bwd(dy, h_pre, o.get("dh"), ctx.act, ctx.has_c)
            if n_Wo or n_b:
                G = fold_t(dF, W_dec)
                dWo = G[:H] if n_Wo else None
                dbias = G[H] if (n_b and ctx.has_c) else None
            if n_Wd:
                dWd = fold_w(dF, S, W_dec.dtype, bias, W_out)
        lat = {}
        if n_g or n_Wi or n_We or n_be or n_bp or sparse_dec:
            lat = latent_bwd(latent_csr(ids, S), S, k, values=values, gp=o.get("gp"),
                             dh=o.get("dh"), dpre=o.get("dpre"), x=x if n_We else None,
                             b_pre=bp, dy=dy, gain=gain, dec_mode=mode, need_gain=n_g,
                             need_win=n_Wi, need_wenc=n_We, need_benc=n_be or n_bp,
                             need_wdec=sparse_dec, wenc_dtype=W_enc.dtype,
                             wdec_dtype=W_dec.dtype, wdec_init=dWd,
                             adapter_dtype=(gain if gain is not None else W_in).dtype
                             if (n_g or n_Wi) else torch.float32)
        if sparse_dec:
            dWd = lat["W_dec"]
        elif n_Wd and dWd is None:
            dWd = torch.zeros_like(W_dec)
        dbp = _b_pre_grad(lat["b_enc"], W_enc).to(bp.dtype) if n_bp else None
        dbd = dy.sum(0).to(W_dec.dtype) if (n_bd and mode != DELTA) else None
        if ctx.tied:
            dbd = dbp if dbd is None else (dbd + dbp if dbp is not None else dbd)
            dbp = None
        return (dx, lat.get("W_enc"), lat.get("b_enc") if n_be else None, dbp, None, dWd, dbd,
                lat.get("gain"), dbias, lat.get("W_in"), dbin if n_bi else None, dWo,
                None, None, None, None)


class FusedSAEForward(torch.autograd.Function):
    """An SAE's encode + plain decode: (y, values, indices, overflow). The backward groups
    the (token, slot) pairs by latent once for dW_dec and dW_enc / db_enc; a loss on
    ``values`` reaches the encoder too."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, thr, W_dec, b_dec, k, tied):
        bp = b_dec if tied else b_pre
        values, indices, overflow, ids = topk_encode(x, W_enc, b_enc, k, bp, thr, id32=True)
        y, _ = edit_decode_fwd(None, values, indices, W_dec, b_dec, None, None, None, None, 0,
                               PLAIN, out_dtype=x.dtype)
        ctx.save_for_backward(x, W_enc, bp, W_dec, values, indices, ids)
        ctx.k, ctx.tied = k, tied
        ctx.mark_non_differentiable(indices, overflow)
        ctx.set_materialize_grads(False)
        return y, values, indices, overflow

    @staticmethod
    def backward(ctx, dy, dvalues, _di, _do):
        x, W_enc, bp, W_dec, values, indices, ids = ctx.saved_tensors
        n_x, n_We, n_be, n_bp, _, n_Wd, n_bd = ctx.needs_input_grad[:7]
        S, k = W_dec.shape[0], ctx.k
        if ctx.tied:
            n_bp = n_bd
        dy = dy.contiguous() if dy is not None else None
        o = {}
        if n_x or n_We or n_be or n_bp:
            o = token_bwd(dy if dy is not None else values, values, indices, W_dec, mode=PLAIN,
                          dvalues=dvalues, W_enc=W_enc if n_x else None,
                          need_p=dy is not None, store_dpre=n_We or n_be or n_bp,
                          dx_dtype=x.dtype)
        lat = {}
        n_dec = n_Wd and dy is not None
        if n_We or n_be or n_bp or n_dec:
            lat = latent_bwd(latent_csr(ids, S), S, k, values=values, dpre=o.get("dpre"),
                             x=x if n_We else None, b_pre=bp, dy=dy, need_wenc=n_We,
                             need_benc=n_be or n_bp, need_wdec=n_dec, wenc_dtype=W_enc.dtype,
                             wdec_dtype=W_dec.dtype)
        dWd = lat.get("W_dec") if n_dec else (torch.zeros_like(W_dec) if n_Wd else None)
        dbp = _b_pre_grad(lat["b_enc"], W_enc).to(bp.dtype) if n_bp else None
        dbd = None
        if n_bd:  # (a loss on the code alone leaves the decoder bias without a gradient)
            dbd = (dy.sum(0).to(W_dec.dtype) if dy is not None
                   else W_dec.new_zeros(W_dec.shape[1]))
        if ctx.tied:
            dbd = dbd + dbp if dbd is not None else None
            dbp = None
        return (o.get("dx") if n_x else None, lat.get("W_enc"),
                lat.get("b_enc") if n_be else None, dbp, None, dWd, dbd, None, None)
