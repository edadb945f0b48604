"""The ``triton`` backend's kernel library (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Same functions as the C++ extension (see sae_sparse/_autograd.py), built from four kernels:

* ``_encode_kernel``: tensor-core GEMM tiles of (x - b_pre) W_enc^T + b_enc over a 2-D grid
  (row blocks x latent blocks) whose epilogue keeps only entries >= a per-row lower bound T
  on the k-th largest value. Survivors are appended to a per-row buffer as packed int64 keys
  (order-preserving 32-bit value << 32 | ~index, so one integer top-k sorts by value and breaks
  ties by the smaller index) through an atomic row counter; the same epilogue counts active
  latents per row (pre > max(threshold, 0)) for the overflow report. T is the k-th largest of a
  strided sample of latents, lowered by a rigorous bound on the fp32 summation error, so the
  exact top-k always survives; an exact integer top-k over the buffer finishes the job.
* ``_gather_sum_kernel``: y[n] += sum_j coef[n, j] W[idx[n, j]] (decode, h_pre, dx).
* ``_gather_dot_kernel``: out[n, j] = a[n] . W[idx[n, j]] (decode backward).
* ``_segment_rows_kernel``: per active latent, a deterministic sum over the (token, slot) pairs
  that selected it, after a stable sort by latent (no float atomics).

This is the correctness-first version of the GPU path: it is checked against the reference in
CI under the Triton interpreter; tile sizes are placeholders until tuned on a GPU.
"""
from __future__ import annotations

import math
import os

import torch

from .reference import activation_fn, decode_coef

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - triton is optional
    triton = tl = None
    IMPORT_ERROR = f"triton not importable: {e}"
else:
    IMPORT_ERROR = None

_MODES = {0: "delta", 1: "replace", 2: "plain"}  # the kernel libraries' integer codes
_ACTS = {0: "relu", 1: "gelu", 2: "identity"}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    return triton is not None


def supports(device: torch.device) -> bool:
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


if triton is not None:
    _KEY_MIN = tl.constexpr(-2 ** 63)  # below every packed key of a non-NaN value

    @triton.jit
    def _encode_kernel(x_ptr, w_ptr, x_desc, w_desc, b_ptr, thr_ptr, lo_ptr, buf_ptr, cnt_ptr,
                       act_ptr, N, S, D, CAP, stride_w, stride_b,
                       SAMPLE: tl.constexpr, HAS_THR: tl.constexpr, TMA: tl.constexpr,
                       IEEE: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                       NUM_PROGS: tl.constexpr):
        """Persistent GEMM over (row block, latent block) tiles, row blocks fastest, so the
        programs running at once share W tiles (W streams from HBM about once; x stays in L2).

        SAMPLE: store the fp32 pre-activations to buf [N, S] (the threshold pass over a strided
        sample of W's rows, stride_w apart).  Otherwise: append every entry >= lo[row] to the
        row's slice of buf [N, CAP] as a packed int64 key, slot from an atomic row counter."""
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_tiles = num_pid_n * tl.cdiv(S, BLOCK_S)
        tile_e = tl.program_id(0) - NUM_PROGS  # the epilogue's own copy of the tile counter
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=True):
            pid_n = tile % num_pid_n
            pid_s = tile // num_pid_n
            acc = tl.zeros((BLOCK_N, BLOCK_S), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                if TMA:
                    xt = x_desc.load([pid_n * BLOCK_N, d0])
                    wt = w_desc.load([pid_s * BLOCK_S, d0])
                else:
                    r = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                    c = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
                    d = d0 + tl.arange(0, BLOCK_D)
                    xt = tl.load(x_ptr + r.to(tl.int64)[:, None] * D + d[None, :],
                                 mask=(r < N)[:, None] & (d < D)[None, :], other=0.0)
                    wt = tl.load(w_ptr + c.to(tl.int64)[:, None] * stride_w + d[None, :],
                                 mask=(c < S)[:, None] & (d < D)[None, :], other=0.0)
                if UPCAST:  # the interpreter's dot misreads bf16 bits; bf16 products are exact in fp32
                    xt = xt.to(tl.float32)
                    wt = wt.to(tl.float32)
                if IEEE:
                    acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xt, tl.trans(wt), acc)
            tile_e += NUM_PROGS
            rows = (tile_e % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            cols = (tile_e // num_pid_n) * BLOCK_S + tl.arange(0, BLOCK_S)
            rmask = rows < N
            cmask = cols < S
            valid = rmask[:, None] & cmask[None, :]
            bias = tl.load(b_ptr + cols * stride_b, mask=cmask, other=0.0).to(tl.float32)
            pre = acc + bias[None, :] + 0.0  # + 0.0 turns -0.0 into +0.0
            if SAMPLE:
                tl.store(buf_ptr + rows.to(tl.int64)[:, None] * S + cols[None, :], pre,
                         mask=valid)
            else:
                if HAS_THR:  # active-latent count per row (JumpReLU overflow report)
                    t = tl.load(thr_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
                    on = (pre > t[None, :]) & (pre > 0.0) & valid
                    tl.atomic_add(act_ptr + rows, tl.sum(on.to(tl.int32), axis=1), mask=rmask,
                                  sem="relaxed")
                lo = tl.load(lo_ptr + rows, mask=rmask, other=float("inf"))
                keep = (pre >= lo[:, None]) & valid
                slot = tl.atomic_add(tl.broadcast_to(cnt_ptr + rows[:, None], (BLOCK_N, BLOCK_S)),
                                     1, mask=keep, sem="relaxed")
                bits = pre.to(tl.int32, bitcast=True)
                key32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
                key = (key32.to(tl.int64) << 32) | (0xFFFFFFFF - cols.to(tl.int64))[None, :]
                if WIDE:
                    off = rows.to(tl.int64)[:, None] * CAP + slot
                else:
                    off = rows[:, None] * CAP + slot
                tl.store(buf_ptr + off, key, mask=keep & (slot < CAP))

    @triton.jit
    def _select_kernel(buf_ptr, cnt_ptr, out_ptr, CAP, KOUT,
                       BLOCK: tl.constexpr, KP: tl.constexpr):
        """out[r, :KOUT] = the KOUT largest of row r's min(cnt[r], CAP) keys, descending."""
        r = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK)
        n = tl.minimum(tl.load(cnt_ptr + r), CAP)
        keys = tl.load(buf_ptr + r * CAP + j, mask=j < n, other=_KEY_MIN)
        top = tl.topk(keys, KP)
        o = tl.arange(0, KP)
        tl.store(out_ptr + r * KOUT + o, top, mask=o < KOUT)

    @triton.jit
    def _gather_sum_kernel(out_ptr, coef_ptr, idx_ptr, w_ptr, K, C,
                           BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.load(out_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32)
        for k0 in range(0, K, BLOCK_K):
            j = k0 + tl.arange(0, BLOCK_K)
            jm = j < K
            cf = tl.load(coef_ptr + n * K + j, mask=jm, other=0.0).to(tl.float32)
            ix = tl.load(idx_ptr + n * K + j, mask=jm, other=0)
            w = tl.load(w_ptr + ix[:, None] * C + c[None, :], mask=jm[:, None] & cm[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(cf[:, None] * w, axis=0)
        tl.store(out_ptr + n * C + c, acc, mask=cm)

    @triton.jit
    def _gather_dot_kernel(out_ptr, a_ptr, idx_ptr, w_ptr, K, C,
                           BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK_K)
        jm = j < K
        ix = tl.load(idx_ptr + n * K + j, mask=jm, other=0)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < C
            a = tl.load(a_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + ix[:, None] * C + c[None, :], mask=jm[:, None] & cm[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(w * a[None, :], axis=1)
        tl.store(out_ptr + n * K + j, acc, mask=jm)

    @triton.jit
    def _segment_rows_kernel(out_ptr, csum_ptr, off_ptr, order_ptr, active_ptr, coef_ptr,
                             src_ptr, sub_ptr, K, C,
                             HAS_SUB: tl.constexpr, BLOCK_C: tl.constexpr):
        a = tl.program_id(0)
        pc = tl.program_id(1)
        s = tl.load(active_ptr + a)  # int64
        start = tl.load(off_ptr + s)
        end = tl.load(off_ptr + s + 1)
        c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        total = 0.0
        for e in range(start, end):
            pos = tl.load(order_ptr + e)
            w = tl.load(coef_ptr + pos).to(tl.float32)
            row = tl.load(src_ptr + (pos // K) * C + c, mask=cm, other=0.0).to(tl.float32)
            acc += w * row
            total += w
        if HAS_SUB:
            acc -= total * tl.load(sub_ptr + c, mask=cm, other=0.0).to(tl.float32)
        tl.store(out_ptr + s * C + c, acc, mask=cm)
        if pc == 0:
            tl.store(csum_ptr + s, total)


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _check(*ts):
    for t in ts:
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"the triton backend takes fp32/bf16/fp16 tensors, got {t.dtype}")


def _unpack(keys: torch.Tensor):
    key32 = (keys >> 32).to(torch.int32)
    bits = torch.where(key32 < 0, key32 ^ 0x7FFFFFFF, key32)
    return bits.view(torch.float32), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


# ------------------------------------------------------------------------- library functions


# Encode tuning knobs (module-level so benchmarks/encode_sweep.py can sweep them).
ENCODE = dict(
    sample_stride=32,  # threshold sample: every 32nd latent -> ~32 (k+1) survivors per row
    buffer_bytes=48 << 20,  # survivor + sample buffers per row chunk (bounds extra memory)
    block_n=128, block_s=128, block_d=64, num_warps=8, num_stages=3,
    programs_per_sm=1,  # persistent grid: programs = SMs x this
    tma=True,  # tensor-descriptor (TMA) loads where the strides allow
)
_ERR_UNIT = 2.0 ** -22  # per-operation error unit of a tensor-core fp32 sum; 2x the ulp bound
_SM_COUNT = {}


def _programs(device, tiles: int) -> int:
    if interpreting():
        return min(tiles, 4)
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(tiles, _SM_COUNT[device.index] * ENCODE["programs_per_sm"]))


def _launch_encode(xc, W, b, thr, lo, buf, cnt, act, cap, *, sample=False, stride=1):
    """One pass of _encode_kernel over the rows of xc against W[::stride] (b[::stride])."""
    N, D = xc.shape
    S = (W.shape[0] + stride - 1) // stride
    cfg = ENCODE
    BN, BS = cfg["block_n"], cfg["block_s"]
    BD = min(cfg["block_d"], _p2(D))
    if interpreting():
        BN, BS = 16, 32
    tiles = triton.cdiv(N, BN) * triton.cdiv(S, BS)
    nprog = _programs(xc.device, tiles)
    es = xc.element_size()
    tma = (cfg["tma"] and (D * es) % 16 == 0
           and (stride * D * es) % 16 == 0 and xc.data_ptr() % 16 == 0 and W.data_ptr() % 16 == 0)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        x_desc = TensorDescriptor(xc, [N, D], [D, 1], [BN, BD])
        w_desc = TensorDescriptor(W, [S, D], [stride * D, 1], [BS, BD])
    else:
        x_desc = w_desc = None
    _encode_kernel[(nprog,)](
        xc, W, x_desc, w_desc, b, thr if thr is not None else b, lo, buf, cnt, act,
        N, S, D, cap, stride * D, stride,
        SAMPLE=sample, HAS_THR=thr is not None, TMA=tma,
        IEEE=xc.dtype == torch.float32 or interpreting(), UPCAST=interpreting(),
        WIDE=N * cap >= 2 ** 31, BLOCK_N=BN, BLOCK_S=BS, BLOCK_D=BD, NUM_PROGS=nprog,
        num_warps=1 if interpreting() else cfg["num_warps"],
        num_stages=1 if interpreting() else cfg["num_stages"])


def _encode_rows(xc, W, b, kk, thr, stride, cap, act):
    """Keys [N, kk] of the kk largest pre-activations per row (descending, ties -> smaller
    index) and each row's survivor count (> cap: the row overflowed its buffer)."""
    N, D = xc.shape
    S = W.shape[0]
    dev = xc.device
    cnt = torch.zeros(N, dtype=torch.int32, device=dev)
    if stride > 1:
        # Lower bound on each row's kk-th largest pre-activation: the kk-th largest of a strided
        # sample of latents, minus twice the worst-case fp32 summation error of one entry
        # (both passes sum exact bf16/fp16/fp32 products in fp32: |error| <= gamma_D
        # sum_d |x_d w_d| <= gamma_D ||x|| ||w||) and the bias-add rounding.
        Ss = (S + stride - 1) // stride
        sample = torch.empty(N, Ss, dtype=torch.float32, device=dev)
        _launch_encode(xc, W, b, None, cnt, sample, cnt, cnt, 0, sample=True, stride=stride)
        t = torch.topk(sample, kk, dim=1, sorted=False).values.amin(1)
        del sample
        gamma = 1.01 * (D + 2) * _ERR_UNIT
        w_max = torch.linalg.vector_norm(W[::stride], dim=1, dtype=torch.float32).amax()
        b_max = b[::stride].abs().amax().float()
        x_norm = torch.linalg.vector_norm(xc, dim=1, dtype=torch.float32)
        lo = t - 2 * gamma * x_norm * w_max - 4 * _ERR_UNIT * (t.abs() + b_max)
    else:
        lo = torch.full((N,), float("-inf"), device=dev)
    buf = torch.empty(N, cap, dtype=torch.long, device=dev)
    _launch_encode(xc, W, b, thr, lo.contiguous(), buf, cnt, act, cap)
    keys = torch.empty(N, kk, dtype=torch.long, device=dev)
    if cap <= 8192:
        block = _p2(cap)
        _select_kernel[(N,)](buf, cnt, keys, cap, kk, BLOCK=block, KP=_p2(kk, 1),
                             num_warps=1 if interpreting() else (4 if block <= 2048 else 8))
    else:  # very large k: the unwritten tail of each row must not take part
        live = torch.arange(cap, device=dev)[None, :] < cnt[:, None]
        keys.copy_(torch.topk(buf.masked_fill_(~live, torch.iinfo(torch.long).min), kk,
                              dim=1).values)
    return keys, cnt


def topk_encode(x, W, b, k, b_pre, thr):
    _check(x, W, b, b_pre, thr)
    N, D = x.shape
    S = W.shape[0]
    dev = x.device
    xc = (x - b_pre if b_pre is not None else x).contiguous()
    W = W.contiguous()
    values = torch.empty(N, k, dtype=x.dtype, device=dev)
    indices = torch.empty(N, k, dtype=torch.long, device=dev)
    act = torch.zeros(N, dtype=torch.int32, device=dev)
    if N == 0:
        return values, indices, act > k
    # Without a JumpReLU threshold, "more than k active latents" is "the (k+1)-th largest
    # pre-activation is > 0", so the kernel also keeps a lower bound on that one.
    kk = min(S, k + 1) if thr is None else k
    stride = max(1, min(ENCODE["sample_stride"], S // (4 * kk)))
    if stride == 1:  # small S: keep every entry
        cap = S
    else:
        cap = _p2(int(1.5 * kk * stride) + 64)
    rows = max(128, (ENCODE["buffer_bytes"] // max(8 * cap, 4 * ((S + stride - 1) // stride)))
               // 128 * 128)
    keys = torch.empty(N, kk, dtype=torch.long, device=dev)
    cnt = torch.empty(N, dtype=torch.int32, device=dev)
    for r in range(0, N, rows):
        keys[r:r + rows], cnt[r:r + rows] = _encode_rows(xc[r:r + rows], W, b, kk, thr, stride,
                                                         cap, act[r:r + rows])
    # One check (one sync) for the rare rows the pass above could not finish: more survivors
    # than the buffer holds (they go again with a buffer that fits), or fewer than kk, which
    # only NaN/inf can cause (the bound is rigorous for finite values; the reference decides).
    bad = ((cnt > cap) | (cnt < kk)).nonzero().reshape(-1)
    hi = lo_rows = None
    if bad.numel():
        hi, lo_rows = bad[cnt[bad] > cap], bad[cnt[bad] < kk]
        if hi.numel():
            need = int(cnt[hi].max())
            xs, scratch = xc[hi].contiguous(), torch.zeros_like(act[hi])
            keys[hi] = (_encode_rows(xs, W, b, kk, thr, stride, _p2(need), scratch)[0]
                        if need < S else _encode_rows(xs, W, b, kk, thr, 1, S, scratch)[0])
    pre, idx = _unpack(keys)
    top, top_idx = pre[:, :k], idx[:, :k]
    keep = top > 0
    if thr is not None:
        keep &= top > thr.float()[top_idx]
        overflow = act > k
    elif kk > k:
        overflow = pre[:, k] > 0
    else:
        overflow = torch.zeros(N, dtype=torch.bool, device=dev)
    values.copy_(torch.where(keep, top, torch.zeros_like(top)))
    indices.copy_(top_idx)
    if lo_rows is not None and lo_rows.numel():
        from .reference import topk_encode_torch
        values[lo_rows], indices[lo_rows], overflow[lo_rows] = topk_encode_torch(
            xc[lo_rows], W, b, k, None, thr)
    return values, indices, overflow


def _gather_sum(out, coef, idx, W):
    N, K = coef.shape
    C = W.shape[1]
    if N == 0 or C == 0:
        return out
    BLOCK_C = min(128, _p2(C))
    _gather_sum_kernel[(N, triton.cdiv(C, BLOCK_C))](out, coef.contiguous(), idx.contiguous(),
                                                     W.contiguous(), K, C,
                                                     BLOCK_K=min(32, _p2(K)), BLOCK_C=BLOCK_C)
    return out


def _gather_dot(a, idx, W):
    N, K = idx.shape
    out = torch.empty(N, K, dtype=torch.float32, device=a.device)
    if N == 0:
        return out
    C = W.shape[1]
    _gather_dot_kernel[(N,)](out, a.contiguous(), idx.contiguous(), W.contiguous(), K, C,
                             BLOCK_K=_p2(K), BLOCK_C=min(128, _p2(C)))
    return out


def _act_grad(h, act):
    if act == 0:
        return (h > 0).to(h.dtype)
    if act == 1:
        cdf = 0.5 * (1 + torch.erf(h * math.sqrt(0.5)))
        return cdf + h * torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi)
    return torch.ones_like(h)


def edit_decode_fwd(x, values, indices, W_dec, b_dec, gain, W_in, b_in, M, c, act, mode):
    _check(x, values, W_dec, b_dec, gain, W_in, b_in, M, c)
    N, K = values.shape
    D = W_dec.shape[1]
    y = torch.zeros(N, D, dtype=torch.float32, device=values.device)
    if mode == 0:
        y += x.float()
    elif b_dec is not None:
        y += b_dec.float()
    if c is not None:
        y += c.float()
    coef = decode_coef(values.float(), indices, gain.float() if gain is not None else None,
                       _MODES[mode])
    if coef is not None:
        _gather_sum(y, coef, indices, W_dec)
    h_pre = None
    if W_in is not None:
        h_pre = torch.zeros(N, W_in.shape[1], dtype=torch.float32, device=values.device)
        if b_in is not None:
            h_pre += b_in.float()
        _gather_sum(h_pre, values.float(), indices, W_in)
        y += activation_fn(_ACTS[act])(h_pre) @ M.float()
        h_pre = h_pre.to(values.dtype)
    return y.to(values.dtype), h_pre


def edit_decode_bwd(dy, values, indices, W_dec, gain, W_in, h_pre, M, act, mode):
    p = _gather_dot(dy, indices, W_dec)
    g = gain.float() if gain is not None else None
    if mode == 2:
        dv = p.clone()
    elif mode == 0:
        dv = p * g[indices] if g is not None else torch.zeros_like(p)
    else:
        dv = p * (1 + g[indices]) if g is not None else p.clone()
    dh = None
    if W_in is not None:
        h = h_pre.float()
        dh = (dy.float() @ M.float().T) * _act_grad(h, act)
        dv += _gather_dot(dh, indices, W_in)
        dh = dh.to(values.dtype)
    return dv.to(values.dtype), p.to(values.dtype), dh


def latent_csr(indices, S):
    flat = indices.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=S)
    offsets = torch.zeros(S + 1, dtype=torch.long, device=indices.device)
    offsets[1:] = torch.cumsum(counts, 0)
    active = torch.nonzero(counts).reshape(-1)
    return offsets, order, active


def segment_rows(offsets, order, active, coef, src, sub, S, k):
    C = src.shape[1]
    out = torch.zeros(S, C, dtype=src.dtype, device=src.device)  # the kernel rounds once
    csum = torch.zeros(S, dtype=torch.float32, device=src.device)
    A = active.numel()
    if A:
        BLOCK_C = min(128, _p2(max(C, 1)))
        _segment_rows_kernel[(A, max(1, triton.cdiv(C, BLOCK_C)))](
            out, csum, offsets, order, active, coef.contiguous(), src.contiguous(),
            sub.contiguous() if sub is not None else coef, k, C,
            HAS_SUB=sub is not None, BLOCK_C=BLOCK_C)
    return out, csum.to(src.dtype)
