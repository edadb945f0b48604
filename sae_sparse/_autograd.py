"""Autograd Functions shared by the kernel backends (cpp, triton).

A backend is a *kernel library* with the functions of the C++ extension (csrc/sae_sparse.h):
``topk_encode``, ``edit_decode_fwd``, ``edit_decode_bwd``, ``latent_csr``, ``segment_rows``.
The module-level Functions below take the library as their first argument and only
orchestrate its calls; :class:`KernelOps` gives a backend's differentiable ``topk_encode``,
``edit_decode``, ``fold`` and ``sae_forward``. (The triton backend's whole-step ops,
``sae_edit`` and ``sae_forward`` in eager mode, are the fused Functions of
``sae_sparse/triton/functions.py``; these serve its composed ops and torch.compile.)
The dense parameter-sized products (M = W_out W_dec, c = bias W_dec and their backward) use
the library's ``fold`` / ``fold_t`` where it has them (triton), else torch.
"""
from __future__ import annotations

import torch

from .codes import ACTIVATIONS, MODES
from .reference import activation_fn, decode_coef

_MODES = {m: i for i, m in enumerate(MODES)}  # the kernels' codes (sae_sparse/codes.py)
_ACTS = {a: i for i, a in enumerate(ACTIVATIONS)}


def _needs(ctx, i):
    return ctx.needs_input_grad[i]


_FOLD_CHUNK = 1 << 24  # elements of W_dec upcast at once (64 MiB in fp32)


def _fold_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fold_torch(A, W):
    """A [r, S] @ W [S, D] in fp32 (fp64 for fp64) with torch, upcasting W a chunk of rows
    at a time (an fp32 copy of W written and read again)."""
    ct = _fold_dtype(W)
    rows = max(1, _FOLD_CHUNK // max(W.shape[1], 1))
    out = torch.zeros(A.shape[0], W.shape[1], dtype=ct, device=W.device)
    for s in range(0, W.shape[0], rows):
        out += A[:, s:s + rows].to(ct) @ W[s:s + rows].to(ct)
    return out


def fold_t_torch(G, W):
    """G [r, D] @ W [S, D]^T in G's dtype (fp32 / fp64), W upcast a chunk at a time."""
    rows = max(1, _FOLD_CHUNK // max(W.shape[1], 1))
    return torch.cat([G @ W[s:s + rows].to(G.dtype).T for s in range(0, W.shape[0], rows)],
                     dim=1)


class _Fold(torch.autograd.Function):
    """A [r, S] @ W [S, D] in fp32 (fp64 for fp64); gradients in the inputs' dtypes.

    With a kernel library that has ``fold`` / ``fold_t`` / ``fold_w`` (triton) and A in W's
    dtype, each product reads or writes W once in its own dtype; otherwise torch (fold_torch,
    fold_t_torch, and an fp32 [S, D] product for W's gradient)."""

    @staticmethod
    def forward(ctx, A, W, lib):
        ctx.lib = lib if hasattr(lib, "fold") and A.dtype == W.dtype else None
        ctx.save_for_backward(A, W)
        return ctx.lib.fold(A, W) if ctx.lib is not None else fold_torch(A, W)

    @staticmethod
    def backward(ctx, dout):
        A, W = ctx.saved_tensors
        dout = dout.to(_fold_dtype(W)).contiguous()
        dA = dW = None
        if ctx.needs_input_grad[0]:
            lib = ctx.lib
            dA = (lib.fold_t(dout, W) if lib is not None else fold_t_torch(dout, W)).to(A.dtype)
        if ctx.needs_input_grad[1]:  # [S, D]: a dense gradient either way
            dW = (ctx.lib.fold_w(A, dout) if ctx.lib is not None
                  else (A.to(dout.dtype).T @ dout).to(W.dtype))
        return dA, dW, None


def _encoder_grads(lib, dpre, indices, x, W_enc, b_pre, need_x, need_W, need_b, need_bp,
                   csr=None):
    """(dx, dW_enc, db_enc, db_pre) of the top-k encode (None where not needed), from dpre
    [N, k], the gradient at the selected pre-activations. csr: ``latent_csr(indices, S)`` if
    the caller has it already; else computed here when dW_enc / db_enc need it."""
    S, k = W_enc.shape[0], dpre.shape[1]
    dx = dW = db = dbp = None
    if need_W or need_b or (need_bp and not need_x):
        csr = csr if csr is not None else lib.latent_csr(indices, S)
        dW, db = lib.segment_rows(*csr, dpre, x, b_pre, S, k)
    if need_x:  # dx = sum_j dpre_j W_enc[i_j]: a gather over the N*k selected rows
        dx, _ = lib.edit_decode_fwd(None, dpre, indices, W_enc, None, None, None, None, None,
                                    None, 0, _MODES["plain"])
    if need_bp:  # -sum_n dx_n; without dx the same is -db @ W_enc (db: per latent)
        dbp = -dx.sum(0) if need_x else -fold_torch(db[None], W_enc)[0].to(db.dtype)
    return dx, dW if need_W else None, db if need_b else None, dbp


class TopKEncode(torch.autograd.Function):
    """values, indices, overflow = topk(relu((x - b_pre) W_enc^T + b_enc)); top-k held fixed."""

    @staticmethod
    def forward(ctx, lib, x, W_enc, b_enc, k, b_pre, threshold):
        values, indices, overflow = lib.topk_encode(x, W_enc, b_enc, k, b_pre, threshold)
        ctx.save_for_backward(x, W_enc, b_pre, values, indices)
        ctx.lib = lib
        ctx.mark_non_differentiable(indices, overflow)
        return values, indices, overflow

    @staticmethod
    def backward(ctx, dvalues, _di, _do):
        x, W_enc, b_pre, values, indices = ctx.saved_tensors
        dpre = torch.where(values != 0, dvalues, torch.zeros_like(dvalues)).contiguous()
        dx, dW, db, dbp = _encoder_grads(ctx.lib, dpre, indices, x, W_enc, b_pre,
                                         *(_needs(ctx, i) for i in (1, 2, 3, 5)))
        return None, dx, dW, db, None, dbp, None


class EditDecode(torch.autograd.Function):
    """y = edit-decode(x, values, indices), given the folded M = W_out W_dec, c = bias W_dec."""

    @staticmethod
    def forward(ctx, lib, x, values, indices, W_dec, b_dec, gain, W_in, b_in, M, c, act, mode):
        y, h_pre = lib.edit_decode_fwd(x, values, indices, W_dec, b_dec, gain, W_in, b_in, M, c,
                                       _ACTS[act], _MODES[mode])
        ctx.save_for_backward(values, indices, W_dec, gain, W_in, h_pre, M)
        ctx.lib, ctx.act, ctx.mode = lib, act, mode
        ctx.dense_dtype = M.dtype if M is not None else (c.dtype if c is not None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        values, indices, W_dec, gain, W_in, h_pre, M = ctx.saved_tensors
        lib, act, mode = ctx.lib, ctx.act, ctx.mode
        dy = dy.contiguous()
        S, k = W_dec.shape[0], values.shape[1]
        dv, p, dh = lib.edit_decode_bwd(dy, values, indices, W_dec, gain, W_in, h_pre, M,
                                        _ACTS[act], _MODES[mode])
        grads = [None] * 13  # lib first
        grads[1] = dy if (mode == "delta" and _needs(ctx, 1)) else None
        grads[2] = dv if _needs(ctx, 2) else None
        csr = None

        def segment(coef, src):
            nonlocal csr
            if csr is None:
                csr = lib.latent_csr(indices, S)
            return lib.segment_rows(*csr, coef.contiguous(), src, None, S, k)

        if _needs(ctx, 4):  # W_dec: sparse rows; the M and c paths come back through autograd
            coef = decode_coef(values, indices, gain, mode)
            grads[4] = segment(coef, dy)[0] if coef is not None else torch.zeros_like(W_dec)
        if _needs(ctx, 5):
            grads[5] = dy.sum(0)
        if _needs(ctx, 6):
            grads[6] = segment(values * p, values.new_zeros(values.shape[0], 0))[1]
        if W_in is not None:
            if _needs(ctx, 7):
                grads[7] = segment(values, dh)[0]
            if _needs(ctx, 8):
                grads[8] = dh.sum(0)
        dyd = dy.to(ctx.dense_dtype) if _needs(ctx, 9) or _needs(ctx, 10) else None
        if W_in is not None and _needs(ctx, 9):  # dM = act(h_pre)^T dy, [h, D], M's dtype
            grads[9] = activation_fn(act)(h_pre.to(dyd.dtype)).T @ dyd
        if _needs(ctx, 10):
            grads[10] = dyd.sum(0)
        return tuple(grads)


class SAEForward(torch.autograd.Function):
    """An SAE's encode + plain decode as one Function: (y, values, indices, overflow).

    The same math as TopKEncode followed by a plain EditDecode, but the backward groups
    the (token, slot) pairs by latent once (latent_csr: a sort of N*k ids) for both the
    decoder's dW_dec and the encoder's dW_enc / db_enc, which the composed ops each do.
    ``values`` stays an output, so a loss on the code (L1, AuxK statistics) still reaches
    the encoder through it."""

    @staticmethod
    def forward(ctx, lib, x, W_enc, b_enc, k, b_pre, threshold, W_dec, b_dec, tied):
        # tied: b_pre is b_dec, passed once (torch.compile cannot trace an autograd
        # Function given the same tensor twice)
        b_pre = b_dec if tied else b_pre
        values, indices, overflow = lib.topk_encode(x, W_enc, b_enc, k, b_pre, threshold)
        y, _ = lib.edit_decode_fwd(None, values, indices, W_dec, b_dec, None, None, None,
                                   None, None, 0, _MODES["plain"])
        ctx.save_for_backward(x, W_enc, b_pre, W_dec, values, indices)
        ctx.mark_non_differentiable(indices, overflow)
        ctx.lib, ctx.tied = lib, tied
        return y, values, indices, overflow

    @staticmethod
    def backward(ctx, dy, dvalues, _di, _do):
        x, W_enc, b_pre, W_dec, values, indices = ctx.saved_tensors
        lib = ctx.lib
        S, k = W_enc.shape[0], values.shape[1]
        dy = dy.contiguous()
        need_x, need_W, need_b = (_needs(ctx, i) for i in (1, 2, 3))
        need_Wd, need_bd = _needs(ctx, 7), _needs(ctx, 8)
        need_bp = need_bd if ctx.tied else _needs(ctx, 5)
        dWd = dW = db = dbp = dx = csr = None
        if need_Wd:  # dW_dec[s] = sum over s's pairs of v * dy[token]
            csr = lib.latent_csr(indices, S)  # once: the encoder's sums reuse it
            dWd = lib.segment_rows(*csr, values.contiguous(), dy, None, S, k)[0]
        if need_W or need_b or need_bp or need_x:  # the encoder's part needs dpre:
            # dvalues from the decode (dy . W_dec[i]) plus the code's own gradient
            dv, _, _ = lib.edit_decode_bwd(dy, values, indices, W_dec, None, None, None,
                                           None, 0, _MODES["plain"])
            dpre = torch.where(values != 0, dv + dvalues, torch.zeros_like(dv)).contiguous()
            dx, dW, db, dbp = _encoder_grads(lib, dpre, indices, x, W_enc, b_pre, need_x,
                                             need_W, need_b, need_bp, csr)
        dbd = dy.sum(0) if need_bd else None
        if ctx.tied:
            dbd, dbp = (dbd + dbp if dbd is not None else None), None
        return None, dx, dW, db, None, dbp, None, dWd, dbd, None


class KernelOps:
    """A kernel library's differentiable ops: ``topk_encode(x, W_enc, b_enc, k, b_pre,
    threshold)``, ``edit_decode(...)``, ``fold(W_dec, bias, W_out)`` and ``sae_forward(x,
    W_enc, b_enc, k, b_pre, threshold, W_dec, b_dec)``. ``get_lib()`` gives the library at
    call time (the triton backend's custom ops under torch.compile, its launchers eager)."""

    def __init__(self, get_lib):
        self.get_lib = get_lib

    def topk_encode(self, x, W_enc, b_enc, k, b_pre=None, threshold=None):
        return TopKEncode.apply(self.get_lib(), x, W_enc, b_enc, k, b_pre, threshold)

    def sae_forward(self, x, W_enc, b_enc, k, b_pre, threshold, W_dec, b_dec):
        tied = b_pre is not None and b_pre is b_dec
        return SAEForward.apply(self.get_lib(), x, W_enc, b_enc, k, None if tied else b_pre,
                                threshold, W_dec, b_dec, tied)

    def fold(self, W_dec, bias=None, W_out=None):
        """The edit's dense terms (M = W_out W_dec [h, D], c = bias W_dec [D]; None where the
        parameter is None), in fp32 for low-precision inputs (the kernels accumulate in fp32
        anyway). One product for both, so W_dec is read once (and once in the backward)."""
        rows = [t for t in (W_out, bias[None] if bias is not None else None) if t is not None]
        if not rows:
            return None, None
        F = _Fold.apply(torch.cat(rows) if len(rows) > 1 else rows[0], W_dec, self.get_lib())
        return (F[:W_out.shape[0]] if W_out is not None else None,
                F[-1] if bias is not None else None)

    def edit_decode(self, x, values, indices, W_dec, b_dec=None, gain=None, bias=None,
                    W_in=None, b_in=None, W_out=None, activation="relu", mode="delta", *,
                    folded=None):
        """folded: (M, c) as ``fold(W_dec, bias, W_out)`` returns them, computed earlier (the
        inference cache of ops.cached_folds); else they are computed here."""
        if activation not in _ACTS:
            raise ValueError(f"activation must be one of {tuple(_ACTS)}, got {activation!r}")
        if mode == "plain":
            gain = bias = W_in = b_in = W_out = folded = None
        M, c = folded if folded is not None else self.fold(W_dec, bias, W_out)
        return EditDecode.apply(self.get_lib(), x if mode == "delta" else None, values,
                                indices.long(), W_dec, b_dec if mode != "delta" else None, gain,
                                W_in, b_in, M, c, activation, mode)
