"""The ``triton`` backend's kernel library (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Same functions as the C++ extension (see sae_sparse/_autograd.py). Encode:

* ``_encode_top_kernel``: a persistent tensor-core GEMM (TMA loads where strides allow) over
  (row block, 128-latent tile) pairs of (x - b_pre) W_enc^T + b_enc; its epilogue keeps each
  row's top-m entries of the tile (row reductions in the accumulator's layout, no atomics).
  Keys are packed int64 (order-preserving 32-bit value << 32 | ~index: one integer order
  sorts by value and breaks ties by the smaller index). For bf16/fp16 input the epilogue
  works on one int32 per entry instead (value rounded to odd at 16 mantissa bits, tile column
  in the low 7) and stores those; see ``_round_odd`` and ``_load_cand``. No N x S tensor.
* ``_select_top_kernel``: exact top-(k+1) over a row's candidates -- a top-k over the tile
  maxima picks the k+1 tiles that can hold them, a second one runs over those tiles'
  candidates; counts the tiles that had all m candidates at or above the result (each could
  hide one more).
* ``_fixup_kernel``: settles the (listed, ~1%) rows with a few such tiles on the device --
  recomputes each tile still flagged against the running (k+1)-th key (a 128 x D GEMV) and
  merges it; ``_finish_kernel`` then writes values, indices and overflow. No host sync until
  the very end, which also raises for non-finite input; only rows handed back for heavy ties
  cost more.
* Dictionaries too wide for one candidate select run in latent chunks, merged.
* Fallback for the handed-back rows, small S or large k (``_encode_kernel`` +
  ``_select_kernel``): a rigorous per-row lower bound from a strided sample of latents (SAMPLE
  pass), a GEMM pass that appends every entry >= the bound through relaxed atomic row
  counters, an exact top-k.

Decode and backward: ``_edit_decode_kernel`` (fused edit + decode, one rounding; also h_pre),
``_gather_dot_kernel`` (decode backward) and
``_segment_rows_kernel`` (per active latent, a deterministic sum over the (token, slot) pairs
that selected it, after a stable sort by latent; no float atomics; the grouping,
``latent_csr``, is sync-free with static sizes).

Tuning knobs live in ``ENCODE`` and ``SEGMENT``; H100 measurements are in benchmarks/results/;
tests/hopper_compile.py compiles every kernel for sm_90 without a GPU.
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
    _KEY_MAX = tl.constexpr(2 ** 63 - 1)

    @triton.jit
    def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """acc + a @ b in fp32: IEEE fp32 products (fp32 inputs), else tensor cores. UPCAST:
        operands to fp32 first (the interpreter's dot misreads bf16 bits; bf16 and fp16
        products are exact in fp32)."""
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def _tile_gemm(x_ptr, w_ptr, x_desc, w_desc, pid_n, pid_s, N, S, D, stride_w,
                   TMA: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """fp32 [BLOCK_N, BLOCK_S] tile of x W^T (W's rows stride_w apart)."""
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
            acc = _dot(xt, tl.trans(wt), acc, IEEE, UPCAST)
        return acc

    @triton.jit
    def _round_odd(bits, RLOW: tl.constexpr):
        """fp32 bits rounded to odd with the low bits of mask RLOW dropped (RLOW = 0: as is).
        Rounding to odd keeps every strict comparison with a number of <= 23 - log2(RLOW + 1)
        significant bits (bf16/fp16 thresholds, 0), and rounding its result to bf16/fp16 gives
        the correctly rounded value of the exact one (intermediate precision >= target + 2)."""
        if RLOW == 0:
            return bits
        else:
            return (bits | ((bits & RLOW) + RLOW)) & ~RLOW

    @triton.jit
    def _pack(v, col, RLOW: tl.constexpr):
        """Order-preserving int64 key: value bits high, ~index low (ties -> smaller index);
        the value rounded to odd first when RLOW > 0 (_encode_top_kernel's int32-key path)."""
        bits = _round_odd(v.to(tl.int32, bitcast=True), RLOW)
        key32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return (key32.to(tl.int64) << 32) | (0xFFFFFFFF - col.to(tl.int64))

    @triton.jit
    def _count_active(pre, thr_ptr, act_ptr, rows, cols, rmask, cmask):
        """act[row] += the tile's entries with pre > max(threshold, 0) (JumpReLU overflow).
        Columns past S hold pre = 0 (zero-filled W rows, bias 0) or -inf: never counted."""
        t = tl.maximum(tl.load(thr_ptr + cols, mask=cmask, other=0.0).to(tl.float32), 0.0)
        on = pre > t[None, :]
        tl.atomic_add(act_ptr + rows, tl.sum(on.to(tl.int32), axis=1), mask=rmask, sem="relaxed")

    @triton.jit
    def _encode_top_kernel(x_ptr, w_ptr, x_desc, w_desc, b_ptr, thr_ptr, cand_ptr, act_ptr,
                           N, S, D, L, COL0,
                           TOPM: tl.constexpr, HAS_THR: tl.constexpr, TMA: tl.constexpr,
                           IEEE: tl.constexpr, UPCAST: tl.constexpr, RLOW: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                           NUM_PROGS: tl.constexpr):
        """Persistent GEMM over (row block, latent block) tiles, row blocks fastest so the
        programs running at once share W tiles (W streams from HBM about once; x stays in L2).
        Epilogue: each row's TOPM largest entries of the tile (row reductions in the
        accumulator's own layout, no sorting, no atomics) -> cand[row, tile * TOPM + m].
        W holds latents COL0 .. COL0 + S - 1 (a latent chunk); keys carry the global index."""
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_tiles = num_pid_n * tl.cdiv(S, BLOCK_S)
        tile_e = tl.program_id(0) - NUM_PROGS  # the epilogue's own copy of the tile counter
        for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGS, flatten=True):
            acc = _tile_gemm(x_ptr, w_ptr, x_desc, w_desc, tile % num_pid_n, tile // num_pid_n,
                             N, S, D, D, TMA, IEEE, UPCAST, BLOCK_N, BLOCK_S, BLOCK_D)
            tile_e += NUM_PROGS
            pid_s = tile_e // num_pid_n
            rows = (tile_e % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
            local = tl.arange(0, BLOCK_S)
            cols = pid_s * BLOCK_S + local
            rmask = rows < N
            cmask = cols < S
            # + 0.0 turns a -0.0 bias into +0.0, so no entry of pre is -0.0 (-0.0 + 0.0 = +0.0).
            # The int32-key path fills the columns past S with -inf: they rank below every
            # real entry (ties -> smaller column), so no select takes them (the plan leaves
            # >= kk real candidates per row) and no tile is flagged for them.
            bias = tl.load(b_ptr + cols, mask=cmask,
                           other=float("-inf") if RLOW > 0 else 0.0).to(tl.float32) + 0.0
            pre = acc + bias[None, :]
            if HAS_THR:
                _count_active(pre, thr_ptr, act_ptr, rows, cols, rmask, cmask)
            out = cand_ptr + rows.to(tl.int64) * L + pid_s * TOPM
            if RLOW > 0:  # bf16/fp16 input: one int32 key per entry
                # The order-preserving bits of pre rounded to odd (_round_odd) at 23 - log2
                # BLOCK_S mantissa bits, the freed low bits holding the reversed tile column:
                # a plain integer max per row then finds value and column (ties -> smaller
                # column) at once -- about 3 instructions per entry and candidate, not the
                # ~7 of a float argmax with a tie-break (SASS, sm_90).
                tl.static_assert(RLOW == BLOCK_S - 1)
                bits = _round_odd(pre.to(tl.int32, bitcast=True), RLOW)
                key = (bits ^ ((bits >> 31) & (0x7FFFFFFF ^ RLOW))) | (RLOW - local)[None, :]
                # the m maxima gathered into one [BLOCK_N, TOPM] store: a row's TOPM int32 go
                # out as one vector store, one barrier per tile instead of two per candidate
                TP: tl.constexpr = 1 << (TOPM - 1).bit_length()  # arange needs a power of 2
                slot = tl.arange(0, TP)[None, :]
                tops = tl.zeros((BLOCK_N, TP), dtype=tl.int32)
                for m in tl.static_range(TOPM):  # cand is int32 here (see _load_cand)
                    mx = tl.max(key, axis=1)
                    tops = tl.where(slot == m, mx[:, None], tops)
                    if m + 1 < TOPM:
                        key = tl.where(key == mx[:, None], -2 ** 31, key)
                tl.store(out[:, None] + slot, tops, mask=rmask[:, None] & (slot < TOPM))
            else:
                pre = tl.where(rmask[:, None] & cmask[None, :], pre, float("-inf"))
                for m in tl.static_range(TOPM):
                    v, j = tl.max(pre, axis=1, return_indices=True,
                                  return_indices_tie_break_left=True)
                    col = pid_s * BLOCK_S + j
                    key = tl.where((col < S) & (v > float("-inf")), _pack(v, col + COL0, 0),
                                   _KEY_MIN)
                    tl.store(out + m, key, mask=rmask)
                    if m + 1 < TOPM:
                        pre = tl.where(local[None, :] == j[:, None], float("-inf"), pre)

    @triton.jit
    def _load_cand(row_ptr, pos, mask, COL0, TOPM: tl.constexpr, BLOCK_S: tl.constexpr,
                   RLOW: tl.constexpr):
        """A row's candidates at positions pos as _pack keys (int64). With RLOW > 0 they are
        the int32 tile keys of _encode_top_kernel: value bits with the reversed tile column in
        the low bits; the tile is pos // TOPM, W's first latent COL0."""
        if RLOW == 0:
            return tl.load(row_ptr + pos, mask=mask, other=_KEY_MIN)
        else:
            c = tl.load(row_ptr + pos, mask=mask, other=-2 ** 31)
            col = (pos // TOPM) * BLOCK_S + (RLOW - (c & RLOW)) + COL0
            hi = tl.where(c < 0, c | RLOW, c & ~RLOW)  # _pack's high word
            key = (hi.to(tl.int64) << 32) | (0xFFFFFFFF - col.to(tl.int64))
            return tl.where(c != -2 ** 31, key, _KEY_MIN)

    @triton.jit
    def _select_top_kernel(cand_ptr, out_ptr, bad_ptr, list_ptr, nlist_ptr, L, KOUT, NT,
                           LIMIT, CAP, COL0,
                           BLOCK: tl.constexpr, KP: tl.constexpr, TOPM: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, RLOW: tl.constexpr,
                           BY_TILE: tl.constexpr):
        """out[r] = the KOUT largest candidates of row r; bad[r] = how many tiles had all TOPM
        candidates at or above the KOUT-th (each may hide one more top entry). A row with
        1..LIMIT such tiles is appended to list (CAP slots, counter nlist) for _fixup_kernel.

        BY_TILE (needs NT >= KOUT): the KOUT largest candidates lie in the KOUT tiles with
        the largest maxima (keys are distinct: any candidate of another tile has KOUT larger
        ones, those maxima). So a top-k over the NT tile maxima (candidate 0 of each tile)
        picks the tiles, and a top-k over those tiles' KOUT x TOPM candidates gives the
        result -- two small top-ks instead of one over all L candidates. Else: that one."""
        r = tl.program_id(0).to(tl.int64)
        row = cand_ptr + r * L
        o = tl.arange(0, KP)
        t = tl.arange(0, BLOCK_T)
        if BY_TILE:
            tl.static_assert(BLOCK_T >= KP)
            heads = tl.topk(_load_cand(row, t * TOPM, t < NT, COL0, TOPM, BLOCK_S, RLOW), KP)
            _, col = _unpack_keys(heads)
            TP: tl.constexpr = 1 << (TOPM - 1).bit_length()  # arange needs a power of 2
            m = tl.arange(0, TP)[None, :]
            pos = ((col - COL0) // BLOCK_S).to(tl.int32)[:, None] * TOPM + m
            # a tile whose maximum is _KEY_MIN (NaN input: the row is an error) has nothing
            # to read, and its column is not an address
            ok = (o < KOUT) & (heads != _KEY_MIN)
            c = _load_cand(row, pos, ok[:, None] & (m < TOPM), COL0, TOPM, BLOCK_S, RLOW)
            top = tl.topk(tl.reshape(c, [KP * TP]), KP)
        else:
            j = tl.arange(0, BLOCK)
            top = tl.topk(_load_cand(row, j, j < L, COL0, TOPM, BLOCK_S, RLOW), KP)
        tl.store(out_ptr + r * KOUT + o, top, mask=o < KOUT)
        kth = tl.min(tl.where(o < KOUT, top, _KEY_MAX), axis=0)
        last = _load_cand(row, t * TOPM + (TOPM - 1), t < NT, COL0, TOPM, BLOCK_S, RLOW)
        nb = tl.sum(((last >= kth) & (t < NT)).to(tl.int32), axis=0)
        tl.store(bad_ptr + r, nb)
        if (nb > 0) & (nb <= LIMIT):
            slot = tl.atomic_add(nlist_ptr, 1, sem="relaxed")
            tl.store(list_ptr + slot, r.to(tl.int32), mask=slot < CAP)

    @triton.jit
    def _unpack_keys(keys):
        """Inverse of _pack: (fp32 value, int64 index)."""
        key32 = (keys >> 32).to(tl.int32)
        bits = tl.where(key32 < 0, key32 ^ 0x7FFFFFFF, key32)
        return bits.to(tl.float32, bitcast=True), 0xFFFFFFFF - (keys & 0xFFFFFFFF)

    @triton.jit
    def _merge_tile(keys, x_ptr, w_ptr, b_ptr, r, tile, S, D, COL0,
                    KP: tl.constexpr, BLOCK_S: tl.constexpr, TB: tl.constexpr,
                    BLOCK_D: tl.constexpr, RLOW: tl.constexpr):
        """keys (a row's top-KP, descending) with tile `tile` recomputed in full: its entries
        already in keys are dropped and its KP largest merged in (W, b: latents COL0 ...)."""
        j = tl.arange(0, TB)
        cols = tile * BLOCK_S + j
        cm = (j < BLOCK_S) & (cols < S)
        acc = tl.zeros((TB,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            xv = tl.load(x_ptr + r * D + d, mask=dm, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * D + d[None, :],
                        mask=cm[:, None] & dm[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * xv[None, :], axis=1)
        pre = acc + tl.load(b_ptr + cols, mask=cm, other=0.0).to(tl.float32) + 0.0
        tk = tl.topk(tl.where(cm, _pack(pre, cols + COL0, RLOW), _KEY_MIN), KP)
        _, ix = _unpack_keys(keys)
        lo = tile * BLOCK_S + COL0
        keys = tl.where((ix >= lo) & (ix < lo + BLOCK_S), _KEY_MIN, keys)
        return tl.topk(tl.reshape(tl.join(keys, tk), 2 * KP, can_reorder=True), KP)

    @triton.jit
    def _fixup_kernel(list_ptr, nlist_ptr, keys_ptr, bad_ptr, cand_ptr, fin_ptr, x_ptr, w_ptr,
                      b_ptr, KOUT, S, D, L, NT, CAP, COL0,
                      TOPM: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_S: tl.constexpr, TB: tl.constexpr, BLOCK_D: tl.constexpr,
                      RLOW: tl.constexpr):
        """Settles the listed rows on the device (no host sync): each tile still flagged
        against the row's running KOUT-th key is recomputed in full (a [BLOCK_S, D] GEMV) and
        merged; the keys are rewritten and bad[r] = 0. Launched on one program per row the
        list could hold (CAP: every row of the chunk), so no flagged row is left to the host
        for lack of room; the programs past the list's length return at once (a loop over the
        list in fewer programs spills registers on sm_90). W, b: latents COL0 ..."""
        pid = tl.program_id(0)
        if pid < tl.minimum(tl.load(nlist_ptr), CAP):
            r = tl.load(list_ptr + pid).to(tl.int64)
            if tl.load(fin_ptr + r) != 0:  # non-finite rows: the host raises
                o = tl.arange(0, KP)
                keys = tl.load(keys_ptr + r * KOUT + o, mask=o < KOUT, other=_KEY_MIN)
                t = tl.arange(0, BLOCK_T)
                last = _load_cand(cand_ptr + r * L, t * TOPM + (TOPM - 1), t < NT, COL0, TOPM,
                                  BLOCK_S, RLOW)
                prev = -1
                for _ in range(tl.load(bad_ptr + r)):  # the flagged set only shrinks
                    kth = tl.min(tl.where(o < KOUT, keys, _KEY_MAX), axis=0)
                    nxt = tl.min(tl.where((last >= kth) & (t > prev) & (t < NT), t, NT), axis=0)
                    if nxt < NT:
                        keys = _merge_tile(keys, x_ptr, w_ptr, b_ptr, r, nxt, S, D, COL0, KP,
                                           BLOCK_S, TB, BLOCK_D, RLOW)
                    prev = nxt
                tl.store(keys_ptr + r * KOUT + o, keys, mask=o < KOUT)
                tl.store(bad_ptr + r, 0)

    @triton.jit
    def _finish_kernel(keys_ptr, bad_ptr, fin_ptr, thr_ptr, act_ptr, val_ptr, idx_ptr, ovf_ptr,
                       left_ptr, K, KOUT, S,
                       HAS_BAD: tl.constexpr, HAS_THR: tl.constexpr, KP: tl.constexpr):
        """Row r's keys -> values [N, K] (fp32), indices [N, K], overflow [N]; left[r] = 1
        hands the row to the host: non-finite input (an error), or flagged tiles the fix-up did
        not settle (more than its limit: heavy ties)."""
        r = tl.program_id(0).to(tl.int64)
        o = tl.arange(0, KP)
        keys = tl.load(keys_ptr + r * KOUT + o, mask=o < KOUT, other=_KEY_MIN)
        left = tl.load(fin_ptr + r).to(tl.int32) == 0
        if HAS_BAD:
            left = left | (tl.load(bad_ptr + r) > 0)
        v, ix = _unpack_keys(keys)
        km = o < K
        keep = v > 0.0
        if HAS_THR:
            t = tl.load(thr_ptr + ix, mask=km & (ix < S), other=0.0).to(tl.float32)
            keep = keep & (v > t)
            over = tl.load(act_ptr + r) > K
        else:  # the (K+1)-th largest entry is positive (KOUT = K + 1), or there is none
            over = tl.sum(((o == K) & (o < KOUT) & (v > 0.0)).to(tl.int32), axis=0) > 0
        tl.store(val_ptr + r * K + o, tl.where(keep, v, 0.0), mask=km)
        tl.store(idx_ptr + r * K + o, ix, mask=km)
        tl.store(ovf_ptr + r, over.to(tl.int8))
        tl.store(left_ptr + r, left.to(tl.int8))

    @triton.jit
    def _encode_kernel(x_ptr, w_ptr, x_desc, w_desc, b_ptr, thr_ptr, lo_ptr, buf_ptr, cnt_ptr,
                       act_ptr, N, S, D, CAP, stride_w, stride_b,
                       SAMPLE: tl.constexpr, HAS_THR: tl.constexpr, TMA: tl.constexpr,
                       IEEE: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr,
                       RLOW: tl.constexpr,
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
            acc = _tile_gemm(x_ptr, w_ptr, x_desc, w_desc, tile % num_pid_n, tile // num_pid_n,
                             N, S, D, stride_w, TMA, IEEE, UPCAST, BLOCK_N, BLOCK_S, BLOCK_D)
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
                if HAS_THR:
                    _count_active(pre, thr_ptr, act_ptr, rows, cols, rmask, cmask)
                lo = tl.load(lo_ptr + rows, mask=rmask, other=float("inf"))
                keep = (pre >= lo[:, None]) & valid
                slot = tl.atomic_add(tl.broadcast_to(cnt_ptr + rows[:, None], (BLOCK_N, BLOCK_S)),
                                     1, mask=keep, sem="relaxed")
                key = _pack(pre, cols[None, :], RLOW)
                if WIDE:
                    off = rows.to(tl.int64)[:, None] * CAP + slot
                else:
                    off = rows[:, None] * CAP + slot
                tl.store(buf_ptr + off, key, mask=keep & (slot < CAP))

    @triton.jit
    def _finite_rows_kernel(x_ptr, fin_ptr, D, BLOCK_D: tl.constexpr):
        """fin[r] = 1 if every entry of row r is finite, else 0 (torch.isfinite(x).all(1)
        without its N x D temporaries)."""
        r = tl.program_id(0).to(tl.int64)
        bad = tl.zeros((BLOCK_D,), dtype=tl.int32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            v = tl.load(x_ptr + r * D + d, mask=d < D, other=0.0).to(tl.float32)
            bad += (~(tl.abs(v) <= 3.4028234663852886e38)).to(tl.int32)  # inf; NaN compares false
        tl.store(fin_ptr + r, (tl.sum(bad, axis=0) == 0).to(tl.int8))

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
    def _edit_decode_kernel(out_ptr, x_ptr, base_ptr, coef_ptr, idx_ptr, w_ptr, a_ptr, m_ptr,
                            K, C, H, HAS_X: tl.constexpr, HAS_BASE: tl.constexpr,
                            HAS_COEF: tl.constexpr, HAS_H: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[n] = x[n] + base + sum_j coef[n, j] W[idx[n, j]] + sum_h a[n, h] M[h], summed in
        fp32 and rounded once (edit + decode: W = W_dec, a = act(h_pre), M = W_out W_dec)."""
        n = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if HAS_X:
            acc += tl.load(x_ptr + n * C + c, mask=cm, other=0.0).to(tl.float32)
        if HAS_BASE:
            acc += tl.load(base_ptr + c, mask=cm, other=0.0).to(tl.float32)
        if HAS_COEF:
            for k0 in range(0, K, BLOCK_K):
                j = k0 + tl.arange(0, BLOCK_K)
                jm = j < K
                cf = tl.load(coef_ptr + n * K + j, mask=jm, other=0.0).to(tl.float32)
                ix = tl.load(idx_ptr + n * K + j, mask=jm, other=0)
                w = tl.load(w_ptr + ix[:, None] * C + c[None, :],
                            mask=jm[:, None] & cm[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(cf[:, None] * w, axis=0)
        if HAS_H:
            h = tl.arange(0, BLOCK_H)
            hm = h < H
            a = tl.load(a_ptr + n * H + h, mask=hm, other=0.0)
            m = tl.load(m_ptr + h[:, None] * C + c[None, :], mask=hm[:, None] & cm[None, :],
                        other=0.0)
            acc += tl.sum(a[:, None] * m, axis=0)
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
                             src_ptr, sub_ptr, K, C, S,
                             HAS_SUB: tl.constexpr, BLOCK_E: tl.constexpr,
                             BLOCK_C: tl.constexpr):
        """out[s, c] = sum over the (token, slot) pairs e that selected latent s (a segment of
        the latent-sorted order) of coef[e] * src[token(e), c] (- total * sub[c]); csum[s] =
        the total of coef. BLOCK_E pairs' rows are gathered at once (independent loads in
        flight, not one dependent load chain per pair); a fixed order, so deterministic."""
        a = tl.program_id(0)
        pc = tl.program_id(1)
        s = tl.load(active_ptr + a)  # int64; S pads the list
        ok = s < S
        start = tl.load(off_ptr + s)
        end = tl.load(off_ptr + s + 1, mask=ok, other=0)
        end = tl.where(ok, end, start)
        c = pc * BLOCK_C + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        tot = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for e0 in range(start, end, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            em = e < end
            pos = tl.load(order_ptr + e, mask=em, other=0)
            w = tl.load(coef_ptr + pos, mask=em, other=0.0).to(tl.float32)
            rows = tl.load(src_ptr + (pos // K)[:, None] * C + c[None, :],
                           mask=em[:, None] & cm[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w[:, None] * rows, axis=0)
            tot += w
        total = tl.sum(tot, axis=0)
        if HAS_SUB:
            acc -= total * tl.load(sub_ptr + c, mask=cm, other=0.0).to(tl.float32)
        tl.store(out_ptr + s * C + c, acc, mask=cm & ok)
        if pc == 0:
            tl.store(csum_ptr + s, total, mask=ok)

    @triton.jit
    def _fold_kernel(out_ptr, a_ptr, w_ptr, R, S, D, S_PER,
                     IEEE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[p, r, d] = sum over latents s of split p (S_PER of them) of A[r, s] W[s, d], in
        fp32: W is read once, in its own dtype (A has W's dtype: the products are exact)."""
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
            a = tl.load(a_ptr + r.to(tl.int64)[:, None] * S + s[None, :],
                        mask=rm[:, None] & sm[None, :], other=0.0)
            w = tl.load(w_ptr + s.to(tl.int64)[:, None] * D + d[None, :],
                        mask=sm[:, None] & dm[None, :], other=0.0)
            acc = _dot(a, w, acc, IEEE, UPCAST)
        tl.store(out_ptr + (p * R + r.to(tl.int64))[:, None] * D + d[None, :], acc,
                 mask=rm[:, None] & dm[None, :])

    @triton.jit
    def _fold_t_kernel(out_ptr, g_ptr, w_ptr, R, S, D,
                       P: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[r, s] = sum_d G[r, d] W[s, d] in fp32, with G given as P parts in W's dtype
        (g_ptr: [P, R, D], summing to G): each W tile is read once and multiplied by every
        part in W's own dtype -- exact products on tensor cores, no upcast copies."""
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
            for p in tl.static_range(P):
                g = tl.load(g_ptr + (p * R + r)[:, None] * D + d[None, :],
                            mask=rm[:, None] & dm[None, :], other=0.0)
                acc = _dot(g, tl.trans(w), acc, IEEE, UPCAST)
        tl.store(out_ptr + r.to(tl.int64)[:, None] * S + s[None, :], acc,
                 mask=rm[:, None] & sm[None, :])

    @triton.jit
    def _fold_w_kernel(out_ptr, a_ptr, g_ptr, scale_ptr, R, S, D,
                       P: tl.constexpr, HAS_SCALE: tl.constexpr, IEEE: tl.constexpr,
                       UPCAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        """out[s, d] = sum_r A[r, s] G[r, d] (the folds' gradient for W), summed in fp32 and
        rounded once to out's dtype (W's), with G given as P parts in W's dtype (g_ptr:
        [P, R, D], summing to G times the scale): exact products on tensor cores, and no fp32
        [S, D] intermediate."""
        s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        sm = s < S
        dm = d < D
        acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            rm = r < R
            a = tl.load(a_ptr + r.to(tl.int64)[None, :] * S + s[:, None],
                        mask=sm[:, None] & rm[None, :], other=0.0)  # [BLOCK_S, BLOCK_R]
            for p in tl.static_range(P):
                g = tl.load(g_ptr + (p * R + r.to(tl.int64))[:, None] * D + d[None, :],
                            mask=rm[:, None] & dm[None, :], other=0.0)
                acc = _dot(a, g, acc, IEEE, UPCAST)
        if HAS_SCALE:
            acc = acc / tl.load(scale_ptr)
        tl.store(out_ptr + s.to(tl.int64)[:, None] * D + d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=sm[:, None] & dm[None, :])


def _p2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _check(*ts):
    for t in ts:
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"the triton backend takes fp32/bf16/fp16 tensors, got {t.dtype}")


# ------------------------------------------------------------------------- library functions


# Encode tuning knobs (module-level so benchmarks/encode_sweep.py can sweep them).
ENCODE = dict(
    # candidates kept per (row, latent tile); a row needs the fix-up when one of its tiles may
    # hide more. None: the smallest m for which about 1% of rows (or fewer) need it.
    top_m=None,
    # candidate / survivor buffers per row chunk (bounds extra memory): at shapes A-D of the
    # GPU issue 1/2/2/2 row chunks with int32 candidates (key32), 2/4/3/3 with int64 ones
    buffer_bytes=48 << 20,
    block_n=128, block_s=128, block_d=64, num_warps=8, num_stages=3,
    programs_per_sm=1,  # persistent grid: programs = SMs x this
    tma=True,  # tensor-descriptor (TMA) loads where the strides allow
    sample_stride=32,  # fallback path: threshold from every 32nd latent
    # a row with up to this many flagged tiles is settled on the device by recomputing those
    # tiles; more (heavy ties) go to the fallback after the one host sync
    fix_tiles=8,
    # latent tile of the fallback's append pass: its per-entry atomics need the registers
    # (128 spills on sm_90 once the launch specializes N, S, D as multiples of 16)
    append_block_s=64,
    # candidates per row in one select (a power of two); larger dictionaries are encoded in
    # latent chunks of at most this many candidates per row, merged
    max_candidates=8192,
    # bf16/fp16 input: rank pre-activations rounded to odd at 16 mantissa bits (18 with the
    # interpreter's 32-latent tiles), packed with the tile column into one int32, so the
    # per-tile top-m epilogue is integer max reductions (_encode_top_kernel). The values
    # returned after rounding to bf16/fp16 are the same; only entries that agree to 17
    # significant bits may swap places (smaller index first). False: the fp32 argmax epilogue.
    key32=True,
    # the candidate select: a top-k over the tile maxima, then over the candidates of the k
    # tiles it picks (where that is less work); False: one top-k over all of a row's candidates
    select_by_tile=True,
)
# Backward segment reduction: (token, slot) pairs gathered per step x columns per program.
# Not tuned on a GPU yet (the earlier one-pair-per-step loop measured 0.43 ms per call at
# shape A on an H100, latency-bound).
SEGMENT = dict(block_e=16, block_c=256, num_warps=4)
# Gather decode (_edit_decode_kernel): columns per program, gathered rows per step, warps.
# At these values an H100 measured 0.7-1.4 TB/s on the gathered bytes (target >= 2):
# benchmarks/decode_sweep.py sweeps them.
DECODE = dict(block_c=256, block_k=32, num_warps=4)
# Its backward (_gather_dot_kernel: all k rows x block_c columns per step). At 128 columns and
# k = 64: 64 registers on sm_90 when D is a multiple of 16 (the launch specializes it; 254
# without); tests/hopper_compile.py. Not tuned on a GPU.
GATHER_DOT = dict(block_c=128, num_warps=4)
# The edit's dense folds (M = W_out W_dec, c = bias W_dec: _fold_kernel, split over latents)
# and their backward (_fold_t_kernel): W_dec streams once per product in its own dtype.
# Tiles: [rows of A (<= 64; 32 for fp32), block_n] of fp32 sums over block_k steps (forward:
# n = columns of W_dec, k = latents; backward: n = latents, k = columns). The gradient for a
# trainable W_dec (_fold_w_kernel) writes w_tile blocks of dW. Not tuned on a GPU.
FOLD = dict(block_k=32, block_n=128, num_warps=4, num_stages=3, programs_per_sm=4,
            w_tile=(64, 128))  # fold_w: [latents, columns] of dW per program
_ERR_UNIT = 2.0 ** -22  # per-operation error unit of a tensor-core fp32 sum; 2x the ulp bound
_SM_COUNT = {}


def _blocks(D):
    if interpreting():
        return 16, 32, min(64, _p2(D))
    return ENCODE["block_n"], ENCODE["block_s"], min(ENCODE["block_d"], _p2(D))


def _top_m(kk: int, nt: int) -> int:
    """A row is redone when one of its nt tiles holds m of its kk largest entries; for random
    positions the expected number of such tiles is about C(kk, m) / nt^(m-1)."""
    if ENCODE["top_m"]:
        return ENCODE["top_m"]
    m = 2
    while m < 8 and math.comb(kk, m) / nt ** (m - 1) > 0.01:
        m += 1
    return m


def _rlow(dtype, D: int) -> int:
    """The low-bit mask every encode kernel rounds keys at (ENCODE["key32"]); 0: exact.
    The tile column takes log2(block_s) of fp32's 24 significant bits; rounding to odd and
    then to fp16 (11 bits) is correct with >= 13 left, so tiles wider than 2048 keep exact
    keys."""
    BS = _blocks(D)[1]
    if ENCODE["key32"] and dtype in (torch.bfloat16, torch.float16) and BS <= 2048:
        return BS - 1
    return 0


def _sm_count(device) -> int:
    if interpreting():
        return 4
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


def _programs(device, tiles: int) -> int:
    if interpreting():
        return min(tiles, 4)
    return max(1, min(tiles, _sm_count(device) * ENCODE["programs_per_sm"]))


def _gemm_args(xc, W, stride=1, block_s=None):
    """Shared launch arguments of the encode kernels: (x_desc, w_desc, TMA, IEEE, UPCAST, blocks,
    programs, launch options); block_s: a narrower latent tile than _blocks(D)'s."""
    N, D = xc.shape
    S = (W.shape[0] + stride - 1) // stride
    BN, BS, BD = _blocks(D)
    BS = min(BS, block_s or BS)
    es = xc.element_size()
    # TMA for the tensor-core (bf16/fp16) products; fp32's IEEE product is not one, and fed
    # from TMA tiles it spills registers (ptxas, sm_90: tests/hopper_compile.py)
    tma = (ENCODE["tma"] and (xc.dtype != torch.float32 or interpreting())
           and (D * es) % 16 == 0 and xc.data_ptr() % 16 == 0 and W.data_ptr() % 16 == 0)
    x_desc = w_desc = None
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        x_desc = TensorDescriptor(xc, [N, D], [D, 1], [BN, BD])
        w_desc = TensorDescriptor(W, [S, D], [stride * D, 1], [BS, BD])
    nprog = _programs(xc.device, triton.cdiv(N, BN) * triton.cdiv(S, BS))
    meta = dict(TMA=tma, IEEE=xc.dtype == torch.float32 or interpreting(), UPCAST=interpreting(),
                RLOW=_rlow(xc.dtype, D), BLOCK_N=BN, BLOCK_S=BS, BLOCK_D=BD, NUM_PROGS=nprog,
                num_warps=1 if interpreting() else ENCODE["num_warps"],
                num_stages=1 if interpreting() else ENCODE["num_stages"])
    return (x_desc, w_desc), nprog, meta


def _centered(x, b_pre, fin):
    """xc = x - b_pre (x itself without b_pre), the rows the GEMM reads; fin [N] int8 <- 1 for
    the rows of xc that are all finite (_finite_rows_kernel: no N x D temporaries)."""
    xc = (x - b_pre if b_pre is not None else x).contiguous()
    N, D = xc.shape
    if N and D:
        _finite_rows_kernel[(N,)](xc, fin, D, BLOCK_D=min(1024, _p2(D)),
                                  num_warps=1 if interpreting() else 4)
    elif N:
        fin.fill_(1)
    return xc


def _encode_top(xc, W, b, kk, thr, act, fin, top_m, keys, bad, col0=0):
    """Main path, one row chunk (and latent chunk: W, b, thr hold latents col0 ...): keys
    [N, kk] (descending; ties -> smaller index), exact unless bad [N] > 0 -- the number of
    tiles whose top_m candidates all reached the kk-th key, each of which may hide one more.
    The rows with 1..fix_tiles such tiles are settled on the device (bad -> 0)."""
    N, D = xc.shape
    S = W.shape[0]
    BS = _blocks(D)[1]
    nt = triton.cdiv(S, BS)
    L = nt * top_m
    (x_desc, w_desc), nprog, meta = _gemm_args(xc, W)
    cand = torch.empty(N, L, dtype=torch.int32 if meta["RLOW"] else torch.long,
                       device=xc.device)
    _encode_top_kernel[(nprog,)](xc, W, x_desc, w_desc, b, thr if thr is not None else b, cand,
                                 act, N, S, D, L, col0, TOPM=top_m, HAS_THR=thr is not None,
                                 **meta)
    rows = torch.empty(N, dtype=torch.int32, device=xc.device)  # the flagged rows' list
    nrows = torch.zeros(1, dtype=torch.int32, device=xc.device)
    block, KP = _p2(L), _p2(kk, 2)
    _select_top_kernel[(N,)](cand, keys, bad, rows, nrows, L, kk, nt, ENCODE["fix_tiles"], N,
                             col0, BLOCK=block, KP=KP, TOPM=top_m, BLOCK_T=_p2(nt), BLOCK_S=BS,
                             RLOW=meta["RLOW"], BY_TILE=_by_tile(kk, nt, top_m, block),
                             num_warps=1 if interpreting() else (4 if block <= 2048 else 8))
    _fixup_kernel[(N,)](rows, nrows, keys, bad, cand, fin, xc, W, b, kk, S, D, L,
                        nt, N, col0, TOPM=top_m, KP=KP, BLOCK_T=_p2(nt), BLOCK_S=BS,
                        TB=max(BS, KP), BLOCK_D=min(32, _p2(D)), RLOW=meta["RLOW"],
                        num_warps=1 if interpreting() else 4)


def _by_tile(kk: int, nt: int, top_m: int, block: int) -> bool:
    """Whether _select_top_kernel selects through the tiles with the kk largest maxima (a
    top-k over nt maxima and one over kk x top_m candidates) rather than one top-k over all
    its block >= nt x top_m candidates: when there are kk tiles, and it is less work."""
    KP, TP = _p2(kk, 2), _p2(top_m, 1)
    return ENCODE["select_by_tile"] and nt >= kk and KP * TP < block


def _finish(out, keys, fin, thr, act, k, bad=None):
    """keys -> out = (values, indices, overflow as int8, left as int8) for these rows, through
    _finish_kernel (left: rows the host must look at -- non-finite, or bad > 0)."""
    N, kk = keys.shape
    if N == 0:
        return
    values, indices, overflow, left = out
    _finish_kernel[(N,)](keys, bad if bad is not None else fin, fin,
                         thr if thr is not None else keys, act, values, indices, overflow, left,
                         k, kk, thr.shape[0] if thr is not None else 0,
                         HAS_BAD=bad is not None, HAS_THR=thr is not None, KP=_p2(kk, 2),
                         num_warps=1 if interpreting() else 4)


def _plan(kk: int, S: int, D: int):
    """The main path's plan: (top_m, latent chunks as (first, last + 1) tile bounds), or None
    when per-tile candidates cannot work (small S / large k: the fallback path). A row's
    candidates (tiles x top_m of them) must fit one select block (ENCODE["max_candidates"]),
    so a large dictionary is encoded in latent chunks whose top-k lists are merged."""
    nt = triton.cdiv(S, _blocks(D)[1])
    cap = ENCODE["max_candidates"]
    m = _top_m(kk, nt)
    chunks = 1
    if nt * m > cap:
        m = _top_m(kk, max(1, cap // m))
        chunks = triton.cdiv(nt, max(1, cap // m))
    bounds = [(c * nt // chunks, (c + 1) * nt // chunks) for c in range(chunks)]
    if (nt // chunks) * m < 2 * kk or max(t1 - t0 for t0, t1 in bounds) * m > cap:
        return None
    return m, bounds


def _append_stride(kk: int, S: int) -> int:
    """The fallback's sample stride: its threshold comes from every stride-th latent."""
    return max(1, min(ENCODE["sample_stride"], S // (4 * kk)))


def _append_rows(kk: int, S: int, D: int, xc_bytes: int) -> int:
    """Rows per fallback chunk, so that its per-row buffers -- the strided sample (fp32), the
    candidate buffer (int64, `cap` keys), the keys out and x - b_pre (xc_bytes per element,
    0 without b_pre) -- fit ENCODE["buffer_bytes"]. Without a sample (small S) every entry is
    a candidate: [rows, S] keys, which is what made the unchunked fallback N x S. At least
    256 rows (a multiple of 128, the GEMM's row tile): each chunk reads all of W again, which
    at fewer rows costs more than the chunk's GEMM (on an H100, S*D*2 bytes at 3.35 TB/s
    against 2*rows*S*D flops at ~1 PFLOP/s break even near 300 rows), so a very large k
    may take more than the budget."""
    stride = _append_stride(kk, S)
    cap = _p2(int(1.5 * kk * stride) + 64) if stride > 1 else S
    sample = 4 * ((S + stride - 1) // stride) if stride > 1 else 0
    per_row = 8 * cap + sample + 8 * kk + D * xc_bytes
    return max(256, ENCODE["buffer_bytes"] // per_row // 128 * 128)


def _encode_append(xc, W, b, kk, thr, act):
    """Fallback path (few candidates per tile would not do: small S / large k, and the rows
    the main path could not settle). A lower bound lo on each row's kk-th largest entry from a
    strided sample of latents; a GEMM pass appends every entry >= lo to a per-row buffer
    (atomic row counters); an exact top-kk over the buffer. Returns keys [N, kk]."""
    N, D = xc.shape
    S = W.shape[0]
    dev = xc.device
    stride = _append_stride(kk, S)
    if stride > 1:
        # The kk-th largest of the sample, minus twice the worst-case fp32 summation error of
        # one entry (both passes sum exact bf16/fp16/fp32 products in fp32: |error| <= gamma_D
        # sum_d |x_d w_d| <= gamma_D ||x|| ||w||) and the bias-add rounding.
        Ss = (S + stride - 1) // stride
        sample = torch.empty(N, Ss, dtype=torch.float32, device=dev)
        (x_desc, w_desc), nprog, meta = _gemm_args(xc, W, stride)
        _encode_kernel[(nprog,)](xc, W, x_desc, w_desc, b, b, sample, sample, act, act, N, Ss, D,
                                 0, stride * D, stride, SAMPLE=True, HAS_THR=False, WIDE=False,
                                 **meta)
        t = torch.topk(sample, kk, dim=1, sorted=False).values.amin(1)
        del sample
        gamma = 1.01 * (D + 2) * _ERR_UNIT
        w_max = torch.linalg.vector_norm(W[::stride], dim=1, dtype=torch.float32).amax()
        b_max = b[::stride].abs().amax().float()
        x_norm = torch.linalg.vector_norm(xc, dim=1, dtype=torch.float32)
        lo = t - 2 * gamma * x_norm * w_max - 4 * _ERR_UNIT * (t.abs() + b_max)
        cap = _p2(int(1.5 * kk * stride) + 64)
    else:  # small S: keep every entry
        lo = torch.full((N,), float("-inf"), device=dev)
        cap = S
    while True:
        cnt = torch.zeros(N, dtype=torch.int32, device=dev)
        act.zero_()
        buf = torch.empty(N, cap, dtype=torch.long, device=dev)
        (x_desc, w_desc), nprog, meta = _gemm_args(xc, W, block_s=ENCODE["append_block_s"])
        _encode_kernel[(nprog,)](xc, W, x_desc, w_desc, b, thr if thr is not None else b,
                                 lo.contiguous(), buf, cnt, act, N, S, D, cap, D, 1, SAMPLE=False,
                                 HAS_THR=thr is not None, WIDE=N * cap >= 2 ** 31, **meta)
        need = int(cnt.max())
        if need <= cap:
            break
        cap = _p2(need)  # a row had more survivors than the buffer holds
    keys = torch.empty(N, kk, dtype=torch.long, device=dev)
    if cap <= 8192:
        block = _p2(cap)
        _select_kernel[(N,)](buf, cnt, keys, cap, kk, BLOCK=block, KP=_p2(kk, 2),
                             num_warps=1 if interpreting() else (4 if block <= 2048 else 8))
    else:  # very large k: the unwritten tail of each row must not take part
        live = torch.arange(cap, device=dev)[None, :] < cnt[:, None]
        keys.copy_(torch.topk(buf.masked_fill_(~live, torch.iinfo(torch.long).min), kk,
                              dim=1).values)
    return keys


def _encode_main(x, b_pre, W, b, kk, thr, act, k, fin, out, top_m, bounds):
    """The main path over row chunks (bounded memory: the chunk's candidates and, with b_pre,
    its x - b_pre) and latent chunks."""
    N, D = x.shape
    S = W.shape[0]
    BS = _blocks(D)[1]
    dev = x.device
    L = max(t1 - t0 for t0, t1 in bounds) * top_m
    per = 4 if _rlow(x.dtype, D) else 8  # bytes per candidate (int32 keys / int64 keys)
    per_row = per * L + (D * x.element_size() if b_pre is not None else 0)
    rows = max(128, ENCODE["buffer_bytes"] // per_row // 128 * 128)
    keys = torch.empty(N, kk, dtype=torch.long, device=dev)
    bad = torch.empty(N, dtype=torch.int32, device=dev)
    for r in range(0, N, rows):
        sl = slice(r, r + rows)
        xc = _centered(x[sl], b_pre, fin[sl])
        if len(bounds) == 1:
            _encode_top(xc, W, b, kk, thr, act[sl], fin[sl], top_m, keys[sl], bad[sl])
            _finish(tuple(t[sl] for t in out), keys[sl], fin[sl], thr, act[sl], k, bad[sl])
            continue
        # Latent chunks: each chunk's exact top-kk (settled on the device), merged into a
        # running top-kk -- the row's top-kk is among the chunks' top-kk lists.
        run = unsettled = None
        for t0, t1 in bounds:
            s0, s1 = t0 * BS, min(S, t1 * BS)
            _encode_top(xc, W[s0:s1], b[s0:s1], kk, thr[s0:s1] if thr is not None else None,
                        act[sl], fin[sl], top_m, keys[sl], bad[sl], col0=s0)
            unsettled = bad[sl].clone() if unsettled is None else unsettled.add_(bad[sl])
            both = keys[sl] if run is None else torch.cat([run, keys[sl]], 1)
            run = torch.topk(both, kk, dim=1).values
        _finish(tuple(t[sl] for t in out), run, fin[sl], thr, act[sl], k, unsettled)


def topk_encode(x, W, b, k, b_pre, thr):
    _check(x, W, b, b_pre, thr)
    N, D = x.shape
    S = W.shape[0]
    dev = x.device
    x = x.contiguous()
    W, b = W.contiguous(), b.contiguous()  # the kernels index b and thr with stride 1
    thr = thr.contiguous() if thr is not None else None
    # fp32 values, rounded by torch after (the interpreter's fp32 -> bf16 store truncates)
    values = torch.empty(N, k, dtype=torch.float32, device=dev)
    indices = torch.empty(N, k, dtype=torch.long, device=dev)
    overflow = torch.empty(N, dtype=torch.int8, device=dev)
    left = torch.empty(N, dtype=torch.int8, device=dev)
    act = torch.zeros(N, dtype=torch.int32, device=dev)
    if N == 0:
        return values.to(x.dtype), indices, overflow.bool()
    # Without a JumpReLU threshold, "more than k active latents" is "the (k+1)-th largest
    # pre-activation is > 0", so the kernels select k+1.
    kk = min(S, k + 1) if thr is None else k
    fin = torch.empty(N, dtype=torch.int8, device=dev)  # rows of x - b_pre all finite
    out = (values, indices, overflow, left)
    plan = _plan(kk, S, D)
    if plan is not None:
        _encode_main(x, b_pre, W, b, kk, thr, act, k, fin, out, *plan)
    else:  # row chunks: the fallback's candidate buffer holds up to `cap` keys per row
        rows = _append_rows(kk, S, D, x.element_size() if b_pre is not None else 0)
        for r in range(0, N, rows):
            sl = slice(r, r + rows)
            xc = _centered(x[sl], b_pre, fin[sl])
            keys = _encode_append(xc, W, b, kk, thr, act[sl])
            _finish(tuple(t[sl] for t in out), keys, fin[sl], thr, act[sl], k)
            del xc, keys
    # The main path's one host sync (the fallback adds one per row chunk, for its buffer
    # size): rows the kernels handed back -- non-finite input (an error), or
    # flagged rows the fix-up did not take (more flagged tiles than ENCODE["fix_tiles"], i.e.
    # heavy ties); normally none.
    redo = left.nonzero().reshape(-1)
    if redo.numel():
        nonfinite = redo[fin[redo] == 0]
        if nonfinite.numel():  # checked here rather than by a pass + sync before the kernels
            rows = nonfinite[:8].tolist()
            more = f" and {nonfinite.numel() - 8} more" if nonfinite.numel() > 8 else ""
            what = "x" if b_pre is None else "x - b_pre"
            raise ValueError(f"x contains NaN or inf ({what} is not finite in rows {rows}{more} "
                             f"of the [{N}, {D}] input)")
        sub = tuple(torch.empty_like(t[redo]) for t in out)
        a = act[redo]
        xr = x[redo] - b_pre if b_pre is not None else x[redo]
        keys = _encode_append(xr, W, b, kk, thr, torch.zeros_like(a))
        _finish(sub, keys, fin[redo], thr, a, k)
        for t, u in zip(out, sub):
            t[redo] = u
    return values.to(x.dtype), indices, overflow.view(torch.bool)


def _gather_decode(out, coef, idx, W, x=None, base=None, a=None, M=None):
    """out = x + base + sum_j coef[:, j] W[idx[:, j]] + a M (each term optional), through
    _edit_decode_kernel; out's dtype is the one written."""
    N, K = idx.shape
    C = W.shape[1]
    if N == 0 or C == 0:
        return out
    H = a.shape[1] if a is not None else 0
    BLOCK_C = min(DECODE["block_c"], _p2(C))
    dummy = idx
    _edit_decode_kernel[(N, triton.cdiv(C, BLOCK_C))](
        out, x.contiguous() if x is not None else dummy,
        base.contiguous() if base is not None else dummy,
        coef.contiguous() if coef is not None else dummy, idx.contiguous(), W.contiguous(),
        a.contiguous() if a is not None else dummy, M.contiguous() if a is not None else dummy,
        K, C, H, HAS_X=x is not None, HAS_BASE=base is not None, HAS_COEF=coef is not None,
        HAS_H=a is not None, BLOCK_K=min(DECODE["block_k"], _p2(K)), BLOCK_C=BLOCK_C,
        BLOCK_H=_p2(H), num_warps=1 if interpreting() else DECODE["num_warps"])
    return out


def _gather_dot(a, idx, W):
    """out[n, j] = a[n] . W[idx[n, j]] in fp32 (the decode's backward)."""
    N, K = idx.shape
    out = torch.empty(N, K, dtype=torch.float32, device=a.device)
    if N == 0:
        return out
    C = W.shape[1]
    _gather_dot_kernel[(N,)](out, a.contiguous(), idx.contiguous(), W.contiguous(), K, C,
                             BLOCK_K=_p2(K), BLOCK_C=min(GATHER_DOT["block_c"], _p2(C)),
                             num_warps=1 if interpreting() else GATHER_DOT["num_warps"])
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
    dev = values.device
    base = b_dec.float() if (mode != 0 and b_dec is not None) else None
    if c is not None:
        base = c.float() if base is None else base + c.float()
    coef = decode_coef(values.float(), indices, gain.float() if gain is not None else None,
                       _MODES[mode])
    h_pre = a = None
    if W_in is not None:
        h_pre = _gather_decode(torch.empty(N, W_in.shape[1], dtype=torch.float32, device=dev),
                               values.float(), indices, W_in,
                               base=b_in.float() if b_in is not None else None)
        a = activation_fn(_ACTS[act])(h_pre)
        h_pre = h_pre.to(values.dtype)
    y = _gather_decode(torch.empty(N, D, dtype=values.dtype, device=dev), coef, indices, W_dec,
                       x=x if mode == 0 else None, base=base, a=a,
                       M=M.float() if a is not None else None)
    return y, h_pre


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
    """(token, slot) pairs grouped by latent, without a host sync: order [N*k] (a stable sort
    by latent), offsets [S + 1] (latent s owns order[offsets[s]:offsets[s + 1]]) and active
    [min(N*k, S)], the latents with pairs in increasing order, padded with S -- or, when
    N*k >= S, all S latents (those without pairs have empty segments). Static sizes, so
    torch.compile needs no data-dependent shapes."""
    # latent ids as int32 when they fit: a radix sort over half the key bits of int64
    it = torch.int32 if S < 2 ** 31 - 1 else torch.int64
    flat = indices.reshape(-1).to(it)
    dev = indices.device
    by_latent, order = torch.sort(flat, stable=True)
    offsets = torch.searchsorted(by_latent, torch.arange(S + 1, device=dev, dtype=it))
    if flat.numel() >= S:  # as many slots as latents: every latent, active or not (so
        return offsets, order, torch.arange(S, device=dev)  # segment_rows writes every row)
    seen = torch.cumsum(offsets[1:] > offsets[:-1], 0)  # active latents among 0..s
    active = torch.searchsorted(seen, torch.arange(1, flat.numel() + 1, device=dev))  # S: pad
    return offsets, order, active


def segment_rows(offsets, order, active, coef, src, sub, S, k):
    C = src.shape[1]
    # active holds all S latents when N*k >= S (latent_csr): the kernel then writes every row,
    # zeros for latents without pairs, and the [S, C] gradient needs no zero fill first
    new = torch.empty if active.numel() == S else torch.zeros
    out = new(S, C, dtype=src.dtype, device=src.device)  # the kernel rounds once
    csum = new(S, dtype=torch.float32, device=src.device)
    A = active.numel()
    if A:
        BLOCK_C = min(SEGMENT["block_c"], _p2(max(C, 1)))
        _segment_rows_kernel[(A, max(1, triton.cdiv(C, BLOCK_C)))](
            out, csum, offsets, order, active, coef.contiguous(), src.contiguous(),
            sub.contiguous() if sub is not None else coef, k, C, S,
            HAS_SUB=sub is not None, BLOCK_E=4 if interpreting() else SEGMENT["block_e"],
            BLOCK_C=BLOCK_C, num_warps=1 if interpreting() else SEGMENT["num_warps"])
    return out, csum.to(src.dtype)


def _fold_blocks(R, dtype):
    """(rows of A, n, k) of a fold tile; see FOLD. fp32's IEEE products need more registers
    (64 rows spill on sm_90)."""
    if interpreting():
        return min(32, _p2(R)), 32, 16
    return min(32 if dtype == torch.float32 else 64, _p2(R)), FOLD["block_n"], FOLD["block_k"]


def fold(A, W):
    """A [R, S] @ W [S, D] -> fp32 [R, D] (A in W's dtype), W read once in its own dtype:
    products exact (tensor cores for bf16/fp16, IEEE fp32 for fp32), fp32 sums. The latents
    are split across programs so a short-D product still fills the GPU; the partial sums are
    added by torch (deterministic)."""
    _check(A, W)
    if A.dtype != W.dtype:
        raise TypeError(f"fold: A ({A.dtype}) must have W's dtype ({W.dtype})")
    R, S = A.shape
    D = W.shape[1]
    if R == 0 or S == 0 or D == 0:
        return torch.zeros(R, D, dtype=torch.float32, device=W.device)
    A, W = A.contiguous(), W.contiguous()
    BR, BD, BS = _fold_blocks(R, W.dtype)
    grid_d, grid_r = triton.cdiv(D, BD), triton.cdiv(R, BR)
    want = _sm_count(W.device) * FOLD["programs_per_sm"]
    split = max(1, min(triton.cdiv(S, BS), want // (grid_d * grid_r)))
    per = triton.cdiv(triton.cdiv(S, split), BS) * BS
    split = triton.cdiv(S, per)
    part = torch.empty(split, R, D, dtype=torch.float32, device=W.device)
    _fold_kernel[(grid_d, split, grid_r)](
        part, A, W, R, S, D, per, IEEE=W.dtype == torch.float32 or interpreting(),
        UPCAST=interpreting(), BLOCK_R=BR, BLOCK_S=BS, BLOCK_D=BD,
        num_warps=1 if interpreting() else FOLD["num_warps"],
        num_stages=1 if interpreting() else FOLD["num_stages"])
    return part[0] if split == 1 else part.sum(0)


def _split(G, dtype):
    """fp32 G as P parts in dtype, sum(parts) = G * scale to about fp32 precision: 3 bf16
    parts (8 significant bits each), or 2 fp16 parts (11 each) after scaling by a power of
    two that puts max |G| near 2^14 (fp16's range; computed on the device, no sync).
    -> (parts [P, R, D], scale: a 0-dim tensor or None)."""
    scale = None
    if dtype == torch.float16:
        amax = G.abs().amax()
        scale = torch.where(amax > 0, torch.exp2(14 - torch.ceil(torch.log2(amax))),
                            torch.ones_like(amax))
        G = G * scale
    parts = []
    for _ in range(3 if dtype == torch.bfloat16 else 2):
        parts.append(G.to(dtype))
        G = G - parts[-1].float()
    return torch.stack(parts), scale


def fold_w(A, G):
    """A [R, S] (W's dtype) and G [R, D] (fp32) -> A^T G [S, D] in A's dtype: the folds'
    gradient for W, summed in fp32 and rounded once, without an fp32 [S, D] intermediate
    (G split into exact bf16 / scaled fp16 parts for tensor cores, as in fold_t)."""
    _check(A)
    R, S = A.shape
    D = G.shape[1]
    out = torch.empty(S, D, dtype=A.dtype, device=A.device)
    if S == 0 or D == 0:
        return out
    if R == 0:
        return out.zero_()
    A = A.contiguous()
    if A.dtype == torch.float32:
        parts, scale = G.float().contiguous()[None], None
    else:
        parts, scale = _split(G.float(), A.dtype)
    BR = _fold_blocks(R, A.dtype)[0]
    BS, BD = (16, 32) if interpreting() else FOLD["w_tile"]
    _fold_w_kernel[(triton.cdiv(S, BS), triton.cdiv(D, BD))](
        out, A, parts, scale if scale is not None else parts, R, S, D, P=parts.shape[0],
        HAS_SCALE=scale is not None, IEEE=A.dtype == torch.float32 or interpreting(),
        UPCAST=interpreting(), BLOCK_R=BR, BLOCK_S=BS, BLOCK_D=BD,
        num_warps=1 if interpreting() else FOLD["num_warps"])
    return out


def fold_t(G, W):
    """G [R, D] @ W [S, D]^T -> fp32 [R, S] (the folds' backward; G fp32). W is read once in
    its own dtype; for bf16/fp16 W, G goes in as 3 bf16 / 2 fp16 parts (_split) so every
    product runs on tensor cores and is exact, and the sum is fp32-grade."""
    R, D = G.shape
    S = W.shape[0]
    if R == 0 or S == 0 or D == 0:
        return torch.zeros(R, S, dtype=torch.float32, device=W.device)
    W = W.contiguous()
    if W.dtype == torch.float32:
        parts, scale = G.float().contiguous()[None], None
    else:
        parts, scale = _split(G.float(), W.dtype)
    BR, BS, BD = _fold_blocks(R, W.dtype)
    out = torch.empty(R, S, dtype=torch.float32, device=W.device)
    _fold_t_kernel[(triton.cdiv(S, BS), triton.cdiv(R, BR))](
        out, parts, W, R, S, D, P=parts.shape[0],
        IEEE=W.dtype == torch.float32 or interpreting(), UPCAST=interpreting(), BLOCK_R=BR,
        BLOCK_S=BS, BLOCK_D=BD, num_warps=1 if interpreting() else FOLD["num_warps"],
        num_stages=1 if interpreting() else FOLD["num_stages"])
    return out if scale is None else out / scale
