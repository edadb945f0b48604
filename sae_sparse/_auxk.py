"""The AuxK reconstruction as dense GEMMs over the dead latents (``ops.auxk_decode``).

AuxK (top-k SAE training) decodes ``k_aux`` latents per token, and sparsify's ``k_aux`` is
``D // 2``: 384 at D=768, 2048 at D=4096. Decoded as a sparse code, forward and backward
gather or scatter ``N * k_aux * D`` elements four times over (the decode, dvalues, dW_dec and
the encoder's dx / dW_enc) -- 4.8 GB per pass at N=8192, D=768, k_aux=384 in bf16.

Only the ``n_dead`` dead latents can be chosen, though, so the code is a dense
``[N, n_dead]`` matrix with ``k_aux`` nonzeros per row, and every product above is a GEMM
of width ``n_dead``: ``2 N n_dead D`` flops each, which tensor cores run far faster than the
gathers as long as ``n_dead`` is not hundreds of times ``k_aux``. The selection is the
triton top-k encode over the gathered dead rows (whose large-k fallback keeps its
candidates to row chunks), or :func:`select`: the same fp32 pre-activations as row-chunked
GEMMs and ``torch.topk``.

Rows are processed in chunks whose dense ``[rows, n_dead]`` temporaries stay within
``CHUNK_BYTES``; nothing of size N x n_dead is kept for backward, only the selection.
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 64 << 20  # the dense [rows, n_dead] code and its gradient, together


def _chunk_rows(n_dead: int, elem: int) -> int:
    return max(1, CHUNK_BYTES // (2 * n_dead * elem))


def _add_mm(acc, a, b):
    """acc += a @ b, the product taken in a's dtype (an fp32 ``acc`` sums bf16 products)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc += a @ b


def select(x, W_enc, b_enc, b_pre, k, relu=True):
    """Per row the k largest of ``relu((x - b_pre) W_enc^T + b_enc)`` (W_enc, b_enc: the
    compact dead rows), computed in fp32 (fp64 for fp64) a row chunk at a time with GEMMs
    and ``torch.topk``: values [N, k] in x's dtype, indices [N, k] int64 into W_enc's rows,
    unsorted. (On CPU this beats the cpp top-k encode, which is built for small k.)"""
    N, n = x.shape[0], W_enc.shape[0]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    W, b = W_enc.to(ct), b_enc.to(ct)
    bp = b_pre.to(ct) if b_pre is not None else None
    values = torch.empty(N, k, dtype=x.dtype, device=x.device)
    idx = torch.empty(N, k, dtype=torch.long, device=x.device)
    rows = _chunk_rows(n, torch.finfo(ct).bits // 8)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        xc = x[s:e].to(ct)
        if bp is not None:
            xc = xc - bp
        v, i = torch.addmm(b, xc, W.T).topk(k, dim=1, sorted=False)
        values[s:e] = v.clamp_min_(0) if relu else v
        idx[s:e] = i
    return values, idx


class AuxKDecode(torch.autograd.Function):
    """``sum_j values[:, j] * W_dec[idx[:, j]]`` with ``values`` the relu'd pre-activations
    ``(x - b_pre) W_enc[idx]^T + b_enc[idx]`` of a fixed selection ``idx``.

    Inputs are compact: W_enc, b_enc, W_dec hold only the ``n`` dead rows and ``idx`` [N, kk]
    indexes them. ``values`` [N, kk] (>= 0) is the forward value of the selection, computed
    by the caller; gradients go to x, W_enc, b_enc, b_pre and W_dec through dense GEMMs.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_pre, W_dec, values, idx, relu=True):
        N, n = x.shape[0], W_enc.shape[0]
        rows = _chunk_rows(n, x.element_size())
        out = torch.empty(N, W_dec.shape[1], dtype=W_dec.dtype, device=x.device)
        code = torch.empty(min(rows, N), n, dtype=W_dec.dtype, device=x.device)
        for s in range(0, N, rows):
            e = min(N, s + rows)
            z = code[:e - s].zero_().scatter_(1, idx[s:e], values[s:e])
            torch.mm(z, W_dec, out=out[s:e])
        ctx.save_for_backward(x, W_enc, b_pre, W_dec, values, idx)
        ctx.relu = relu
        return out

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, b_pre, W_dec, values, idx = ctx.saved_tensors
        need_x, need_W, need_b, need_bp, need_dec = ctx.needs_input_grad[:5]
        need_enc = need_x or need_W or need_b or need_bp
        N, n = x.shape[0], W_enc.shape[0]
        dt, dev = W_dec.dtype, x.device
        grad = grad.to(dt).contiguous()
        rows = _chunk_rows(n, x.element_size())
        # Weight gradients summed over row chunks: in fp32 for a low-precision dtype when
        # there is more than one chunk, so no partial sum is rounded to bf16/fp16.
        acc = (torch.float32 if dt in (torch.float16, torch.bfloat16) and rows < N else dt)
        dW_dec = torch.zeros(n, W_dec.shape[1], dtype=acc, device=dev) if need_dec else None
        dW_enc = torch.zeros(n, x.shape[1], dtype=acc, device=dev) if need_W else None
        db = torch.zeros(n, dtype=acc, device=dev) if need_b or need_bp else None
        dx = torch.empty_like(x) if need_x else None
        code = torch.empty(min(rows, N), n, dtype=dt, device=dev)
        dcode = torch.empty(min(rows, N), n, dtype=dt, device=dev) if need_enc else None
        for s in range(0, N, rows):
            e = min(N, s + rows)
            g, v, i = grad[s:e], values[s:e], idx[s:e]
            z = code[:e - s]
            if need_dec:
                z.zero_().scatter_(1, i, v)
                _add_mm(dW_dec, z.T, g)
            if not need_enc:
                continue
            dz = torch.mm(g, W_dec.T, out=dcode[:e - s])
            dv = dz.gather(1, i)
            if ctx.relu:
                dv.mul_(v > 0)  # no gradient where relu made the value 0
            dpre = z.zero_().scatter_(1, i, dv)  # the code's buffer, done with for this chunk
            if need_x:
                torch.mm(dpre, W_enc, out=dx[s:e])
            if need_W:
                xc = x[s:e] - b_pre if b_pre is not None else x[s:e]
                _add_mm(dW_enc, dpre.T, xc)
            if db is not None:
                db += dpre.sum(0, dtype=acc)
        db_enc = db.to(dt) if need_b else None
        db_pre = -(db @ W_enc.to(acc)).to(dt) if need_bp else None
        return (dx, None if dW_enc is None else dW_enc.to(dt), db_enc, db_pre,
                None if dW_dec is None else dW_dec.to(dt), None, None, None)
