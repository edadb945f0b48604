"""Top-k encode: ``(x - b_pre) W_enc^T + b_enc``, per row the k largest, no N x S tensor and
no host sync.

Main path, per row chunk (three launches):

* ``_encode_top_kernel``: a persistent tensor-core GEMM (TMA loads where strides allow) over
  (row block, 128-latent tile) pairs; its epilogue keeps each row's top-m entries of the tile
  (row reductions in the accumulator's layout, no atomics). Keys are packed int64
  (order-preserving 32-bit value << 32 | ~index: one integer order sorts by value and breaks
  ties by the smaller index). For bf16/fp16 input the epilogue works on one int32 per entry
  instead (value rounded to odd at 16 mantissa bits, tile column in the low 7; see
  ``_load_cand``).
* ``_select_top_kernel``: per row, exact top-(k+1) over the candidates (a top-k over the tile
  maxima picks the k+1 tiles that can hold them, a second one runs over those tiles'
  candidates); counts the tiles that had all m candidates at or above the result (each could
  hide one more), and flags rows of x - b_pre that are not all finite.
* ``_settle_kernel``: per row, recomputes each tile still flagged against the running
  (k+1)-th key (a 128 x D GEMV; ~1% of rows have one, rows of heavy ties have many) and merges
  it, then writes values (in x's dtype), indices, int32 ids and the overflow flag. A row of
  x - b_pre with a NaN or inf comes back as NaN values (indices 0..k-1), so the step's loss
  is NaN rather than the op stopping for a host check.

Dictionaries too wide for one candidate select run in latent chunks whose top-k lists are
merged. Fallback for small S or large k (``_encode_kernel`` + ``_select_kernel``): a rigorous
per-row lower bound from a strided sample of latents, a GEMM pass that appends every entry
above it to a per-row buffer (relaxed atomic row counters), an exact top-k; a row whose
survivors overflowed the buffer is rescanned exactly on the device by ``_settle_kernel``.
"""
from __future__ import annotations

import math

import torch

from . import paths
from ._common import check_dtypes, p2, sm_count, tl, triton

if triton is not None:
    from ._common import KEY_MAX, KEY_MIN, dot, pack, round_odd, unpack

if triton is not None:
    @triton.jit
    def _tile_gemm(x_ptr, w_ptr, x_desc, w_desc, pid_n, pid_s, N, S, D, stride_w,
                   TMA: tl.constexpr, IEEE: tl.constexpr,
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
            acc = dot(xt, tl.trans(wt), acc, IEEE)
        return acc


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
                           IEEE: tl.constexpr, RLOW: tl.constexpr,
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
                             N, S, D, D, TMA, IEEE, BLOCK_N, BLOCK_S, BLOCK_D)
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
                bits = round_odd(pre.to(tl.int32, bitcast=True), RLOW)
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
                    key = tl.where((col < S) & (v > float("-inf")), pack(v, col + COL0, 0),
                                   KEY_MIN)
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
            return tl.load(row_ptr + pos, mask=mask, other=KEY_MIN)
        else:
            c = tl.load(row_ptr + pos, mask=mask, other=-2 ** 31)
            col = (pos // TOPM) * BLOCK_S + (RLOW - (c & RLOW)) + COL0
            hi = tl.where(c < 0, c | RLOW, c & ~RLOW)  # _pack's high word
            key = (hi.to(tl.int64) << 32) | (0xFFFFFFFF - col.to(tl.int64))
            return tl.where(c != -2 ** 31, key, KEY_MIN)

    @triton.jit
    def _row_finite(x_ptr, r, D, BLOCK_D: tl.constexpr):
        """Whether row r of x [*, D] is all finite (no N x D temporaries)."""
        bad = tl.zeros((BLOCK_D,), dtype=tl.int32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            v = tl.load(x_ptr + r * D + d, mask=d < D, other=0.0).to(tl.float32)
            bad += (~(tl.abs(v) <= 3.4028234663852886e38)).to(tl.int32)  # inf; NaN compares false
        return tl.sum(bad, axis=0) == 0

    @triton.jit
    def _select_top_kernel(cand_ptr, out_ptr, bad_ptr, x_ptr, fin_ptr, L, KOUT, NT, D, COL0,
                           BLOCK: tl.constexpr, KP: tl.constexpr, TOPM: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, RLOW: tl.constexpr,
                           BY_TILE: tl.constexpr, CHECK_FIN: tl.constexpr,
                           BLOCK_D: tl.constexpr):
        """out[r] = the KOUT largest candidates of row r; bad[r] = how many tiles had all TOPM
        candidates at or above the KOUT-th (each may hide one more top entry); CHECK_FIN:
        fin[r] = row r of x is all finite.

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
            _, col = unpack(heads)
            TP: tl.constexpr = 1 << (TOPM - 1).bit_length()  # arange needs a power of 2
            m = tl.arange(0, TP)[None, :]
            pos = ((col - COL0) // BLOCK_S).to(tl.int32)[:, None] * TOPM + m
            # a tile whose maximum is KEY_MIN (NaN input: the row comes back NaN) has
            # nothing to read, and its column is not an address
            ok = (o < KOUT) & (heads != KEY_MIN)
            c = _load_cand(row, pos, ok[:, None] & (m < TOPM), COL0, TOPM, BLOCK_S, RLOW)
            top = tl.topk(tl.reshape(c, [KP * TP]), KP)
        else:
            j = tl.arange(0, BLOCK)
            top = tl.topk(_load_cand(row, j, j < L, COL0, TOPM, BLOCK_S, RLOW), KP)
        tl.store(out_ptr + r * KOUT + o, top, mask=o < KOUT)
        kth = tl.min(tl.where(o < KOUT, top, KEY_MAX), axis=0)
        last = _load_cand(row, t * TOPM + (TOPM - 1), t < NT, COL0, TOPM, BLOCK_S, RLOW)
        tl.store(bad_ptr + r, tl.sum(((last >= kth) & (t < NT)).to(tl.int32), axis=0))
        if CHECK_FIN:
            tl.store(fin_ptr + r, _row_finite(x_ptr, r, D, BLOCK_D).to(tl.int8))

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
        tk = tl.topk(tl.where(cm, pack(pre, cols + COL0, RLOW), KEY_MIN), KP)
        _, ix = unpack(keys)
        lo = tile * BLOCK_S + COL0
        keys = tl.where((ix >= lo) & (ix < lo + BLOCK_S), KEY_MIN, keys)
        return tl.topk(tl.reshape(tl.join(keys, tk), 2 * KP, can_reorder=True), KP)


    @triton.jit
    def _settle_kernel(keys_ptr, bad_ptr, cand_ptr, fin_ptr, x_ptr, w_ptr, b_ptr, thr_ptr,
                       act_ptr, val_ptr, idx_ptr, id32_ptr, ovf_ptr,
                       K, KOUT, S, D, L, NT, COL0, LIMIT, S_ALL,
                       FIX: tl.constexpr, FINISH: tl.constexpr, HAS_THR: tl.constexpr,
                       HAS_ID32: tl.constexpr, TOPM: tl.constexpr, KP: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, TB: tl.constexpr,
                       BLOCK_D: tl.constexpr, RLOW: tl.constexpr):
        """Row r's keys made exact (FIX) and written out (FINISH), on the device.

        FIX == 1 (main path): each tile still flagged against the running KOUT-th key (its
        TOPM-th candidate reaches it; bad[r] of them at most) is recomputed in full -- a
        [BLOCK_S, D] GEMV -- and merged; the flagged set only shrinks as the KOUT-th key
        rises. FIX == 2 (fallback): a row whose survivors overflowed its buffer (bad[r] =
        its count > LIMIT) is rescanned over all NT tiles. W, b: latents COL0 ...

        FINISH: values [N, K] (val_ptr's dtype), indices [N, K] int64 (and int32 ids),
        overflow [N] int8. Without a threshold KOUT = K + 1 and the row overflows when the
        (K+1)-th entry is positive; with one, when more than K entries passed it (act). A row
        of x - b_pre that is not all finite (fin[r] == 0) gets NaN values and indices
        0..K-1 (S_ALL latents in all)."""
        r = tl.program_id(0).to(tl.int64)
        o = tl.arange(0, KP)
        keys = tl.load(keys_ptr + r * KOUT + o, mask=o < KOUT, other=KEY_MIN)
        fin = tl.load(fin_ptr + r) != 0
        if FIX == 1:
            nb = tl.load(bad_ptr + r)
            if fin & (nb > 0):
                t = tl.arange(0, BLOCK_T)
                last = _load_cand(cand_ptr + r * L, t * TOPM + (TOPM - 1), t < NT, COL0, TOPM,
                                  BLOCK_S, RLOW)
                prev = -1
                for _ in range(nb):
                    kth = tl.min(tl.where(o < KOUT, keys, KEY_MAX), axis=0)
                    nxt = tl.min(tl.where((last >= kth) & (t > prev) & (t < NT), t, NT), axis=0)
                    if nxt < NT:
                        keys = _merge_tile(keys, x_ptr, w_ptr, b_ptr, r, nxt, S, D, COL0, KP,
                                           BLOCK_S, TB, BLOCK_D, RLOW)
                    prev = nxt
                if not FINISH:
                    tl.store(keys_ptr + r * KOUT + o, keys, mask=o < KOUT)
        if FIX == 2:
            if fin & (tl.load(bad_ptr + r) > LIMIT):
                keys = tl.full((KP,), KEY_MIN, tl.int64)
                for tile in range(NT):
                    keys = _merge_tile(keys, x_ptr, w_ptr, b_ptr, r, tile, S, D, COL0, KP,
                                       BLOCK_S, TB, BLOCK_D, RLOW)
                if not FINISH:
                    tl.store(keys_ptr + r * KOUT + o, keys, mask=o < KOUT)
        if FINISH:
            v, ix = unpack(keys)
            km = o < K
            keep = v > 0.0
            if HAS_THR:
                th = tl.load(thr_ptr + ix, mask=km & (ix < S_ALL), other=0.0).to(tl.float32)
                keep = keep & (v > th)
                over = tl.load(act_ptr + r) > K
            else:  # the (K+1)-th largest entry is positive (KOUT = K + 1), or there is none
                over = tl.sum(((o == K) & (o < KOUT) & (v > 0.0)).to(tl.int32), axis=0) > 0
            v = tl.where(keep, v, 0.0)
            v = tl.where(fin, v, float("nan"))
            ix = tl.where(fin, ix, tl.minimum(o, S_ALL - 1).to(tl.int64))
            tl.store(val_ptr + r * K + o, v, mask=km)
            tl.store(idx_ptr + r * K + o, ix, mask=km)
            if HAS_ID32:
                tl.store(id32_ptr + r * K + o, ix.to(tl.int32), mask=km)
            tl.store(ovf_ptr + r, (over & fin).to(tl.int8))

    @triton.jit
    def _encode_kernel(x_ptr, w_ptr, x_desc, w_desc, b_ptr, thr_ptr, lo_ptr, buf_ptr, cnt_ptr,
                       act_ptr, N, S, D, CAP, stride_w, stride_b,
                       SAMPLE: tl.constexpr, HAS_THR: tl.constexpr, TMA: tl.constexpr,
                       IEEE: tl.constexpr, WIDE: tl.constexpr,
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
                             N, S, D, stride_w, TMA, IEEE, BLOCK_N, BLOCK_S, BLOCK_D)
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
                key = pack(pre, cols[None, :], RLOW)
                if WIDE:
                    off = rows.to(tl.int64)[:, None] * CAP + slot
                else:
                    off = rows[:, None] * CAP + slot
                tl.store(buf_ptr + off, key, mask=keep & (slot < CAP))


    @triton.jit
    def _select_kernel(buf_ptr, cnt_ptr, out_ptr, x_ptr, fin_ptr, CAP, KOUT, D,
                       BLOCK: tl.constexpr, KP: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[r, :KOUT] = the KOUT largest of row r's min(cnt[r], CAP) keys, descending
        (a row with more than CAP is rescanned by _settle_kernel); fin[r] = row r of x is
        all finite."""
        r = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK)
        n = tl.minimum(tl.load(cnt_ptr + r), CAP)
        keys = tl.load(buf_ptr + r * CAP + j, mask=j < n, other=KEY_MIN)
        top = tl.topk(keys, KP)
        o = tl.arange(0, KP)
        tl.store(out_ptr + r * KOUT + o, top, mask=o < KOUT)
        tl.store(fin_ptr + r, _row_finite(x_ptr, r, D, BLOCK_D).to(tl.int8))


# ------------------------------------------------------------------------------- launchers

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
    # latent tile of the fallback's append pass: its per-entry atomics need the registers
    # (128 spills on sm_90 once the launch specializes N, S, D as multiples of 16)
    append_block_s=64,
    # latent tile of the fallback's exact rescan of a row whose survivors overflowed its
    # buffer (rare: a GEMV over all of W for that row)
    rescan_block_s=128,
    # candidates per row in one select (a power of two); larger dictionaries are encoded in
    # latent chunks of at most this many candidates per row, merged
    max_candidates=8192,
    # bf16/fp16 input: rank pre-activations rounded to odd at 16 mantissa bits, packed with
    # the tile column into one int32, so the per-tile top-m epilogue is integer max
    # reductions (_encode_top_kernel). The values returned after rounding to bf16/fp16 are
    # the same; only entries that agree to 17 significant bits may swap places (smaller
    # index first). False: the fp32 argmax epilogue.
    key32=True,
    # the candidate select: a top-k over the tile maxima, then over the candidates of the k
    # tiles it picks (where that is less work); False: one top-k over all of a row's candidates
    select_by_tile=True,
)
# Backward segment reduction: (token, slot) pairs gathered per step x columns per program.
# Not tuned on a GPU yet (the earlier one-pair-per-step loop measured 0.43 ms per call at
# shape A on an H100, latency-bound).


def _blocks(D):
    return ENCODE["block_n"], ENCODE["block_s"], min(ENCODE["block_d"], p2(D))


def _top_m(kk: int, nt: int) -> int:
    """A row is settled by recomputing a tile when one of its nt tiles holds m of its kk
    largest entries; for random positions the expected number of such tiles is about
    C(kk, m) / nt^(m-1)."""
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


def _programs(device, tiles: int) -> int:
    return max(1, min(tiles, sm_count(device) * ENCODE["programs_per_sm"]))


def _gemm_args(xc, W, stride=1, block_s=None):
    """Shared launch arguments of the encode GEMMs: ((x_desc, w_desc), programs, meta);
    block_s: a narrower latent tile than _blocks(D)'s."""
    N, D = xc.shape
    S = (W.shape[0] + stride - 1) // stride
    BN, BS, BD = _blocks(D)
    BS = min(BS, block_s or BS)
    es = xc.element_size()
    # TMA for the tensor-core (bf16/fp16) products; fp32's IEEE product is not one, and fed
    # from TMA tiles it spills registers (ptxas, sm_90: tests/hopper_compile.py)
    tma = (ENCODE["tma"] and xc.dtype != torch.float32
           and (D * es) % 16 == 0 and xc.data_ptr() % 16 == 0 and W.data_ptr() % 16 == 0)
    x_desc = w_desc = None
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        x_desc = TensorDescriptor(xc, [N, D], [D, 1], [BN, BD])
        w_desc = TensorDescriptor(W, [S, D], [stride * D, 1], [BS, BD])
    nprog = _programs(xc.device, triton.cdiv(N, BN) * triton.cdiv(S, BS))
    meta = dict(TMA=tma, IEEE=xc.dtype == torch.float32,
                RLOW=_rlow(xc.dtype, D), BLOCK_N=BN, BLOCK_S=BS, BLOCK_D=BD, NUM_PROGS=nprog,
                num_warps=ENCODE["num_warps"],
                num_stages=ENCODE["num_stages"])
    return (x_desc, w_desc), nprog, meta


def _centered(x, b_pre):
    """xc = x - b_pre (x itself without b_pre): the rows the GEMM reads."""
    return (x - b_pre if b_pre is not None else x).contiguous()


class _Out:
    """The encode's outputs for a block of rows (views into the whole batch's)."""

    def __init__(self, values, indices, id32, overflow, act):
        self.values, self.indices, self.id32 = values, indices, id32
        self.overflow, self.act = overflow, act

    def rows(self, sl):
        return _Out(*(t[sl] if t is not None else None
                      for t in (self.values, self.indices, self.id32, self.overflow, self.act)))


def _settle(out, keys, bad, fin, xc, W, b, thr, k, S_all, *, fix, finish, cand=None, L=1,
            top_m=1, col0=0, limit=0, block_s=None):
    """One _settle_kernel launch over keys' rows (see its docstring); W, b: the latents
    col0 ... the keys were taken from (fix) -- all of them for the finish alone."""
    N, kk = keys.shape
    if N == 0:
        return
    D = xc.shape[1]
    S = W.shape[0]
    BS = block_s or _blocks(D)[1]
    nt = triton.cdiv(S, BS)
    KP = p2(kk, 2)
    has_thr = thr is not None
    dummy = keys
    _settle_kernel[(N,)](
        keys, bad if bad is not None else dummy, cand if cand is not None else dummy, fin, xc,
        W, b, thr if has_thr else b, out.act if has_thr else dummy,
        out.values if finish else dummy, out.indices if finish else dummy,
        out.id32 if out.id32 is not None else dummy, out.overflow if finish else dummy,
        k, kk, S, D, L, nt, col0, limit, S_all,
        FIX=fix, FINISH=finish, HAS_THR=has_thr, HAS_ID32=out.id32 is not None, TOPM=top_m,
        KP=KP, BLOCK_T=p2(nt), BLOCK_S=BS, TB=max(BS, KP), BLOCK_D=min(32, p2(D)),
        RLOW=_rlow(xc.dtype, D), num_warps=4)


def _encode_top(xc, W, b, kk, thr, act, fin, top_m, keys, bad, col0=0):
    """Main path, one row chunk (and latent chunk: W, b, thr hold latents col0 ...): the GEMM
    with its per-tile top-m epilogue, then the per-row select into keys [N, kk] (exact unless
    bad [N] > 0 -- the number of tiles whose top_m candidates all reached the kk-th key) and
    fin. Returns (cand, L), what _settle's fix-up reads."""
    N, D = xc.shape
    S = W.shape[0]
    BS = _blocks(D)[1]
    nt = triton.cdiv(S, BS)
    L = nt * top_m
    (x_desc, w_desc), nprog, meta = _gemm_args(xc, W)
    cand = torch.empty(N, L, dtype=torch.int32 if meta["RLOW"] else torch.long,
                       device=xc.device)
    _encode_top_kernel[(nprog,)](xc, W, x_desc, w_desc, b, thr if thr is not None else b, cand,
                                 act if act is not None else cand, N, S, D, L, col0, TOPM=top_m,
                                 HAS_THR=thr is not None, **meta)
    block, KP = p2(L), p2(kk, 2)
    _select_top_kernel[(N,)](cand, keys, bad, xc, fin, L, kk, nt, D, col0, BLOCK=block, KP=KP,
                             TOPM=top_m, BLOCK_T=p2(nt), BLOCK_S=BS, RLOW=meta["RLOW"],
                             BY_TILE=_by_tile(kk, nt, top_m, block), CHECK_FIN=col0 == 0,
                             BLOCK_D=min(1024, p2(D)),
                             num_warps=4 if block <= 2048 else 8)
    return cand, L


def _by_tile(kk: int, nt: int, top_m: int, block: int) -> bool:
    """Whether _select_top_kernel selects through the tiles with the kk largest maxima (a
    top-k over nt maxima and one over kk x top_m candidates) rather than one top-k over all
    its block >= nt x top_m candidates: when there are kk tiles, and it is less work."""
    KP, TP = p2(kk, 2), p2(top_m, 1)
    return ENCODE["select_by_tile"] and nt >= kk and KP * TP < block


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


def _append_cap(kk: int, S: int) -> int:
    """Candidate slots per row in the fallback's buffer: every latent without a sample (small
    S), else 1.5x the survivors expected above the sample's kk-th entry, plus 64. A row with
    more is rescanned exactly by _settle_kernel (FIX == 2)."""
    stride = _append_stride(kk, S)
    return p2(int(1.5 * kk * stride) + 64) if stride > 1 else S


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
    cap = _append_cap(kk, S)
    sample = 4 * ((S + stride - 1) // stride) if stride > 1 else 0
    per_row = 8 * cap + sample + 8 * kk + D * xc_bytes
    return max(256, ENCODE["buffer_bytes"] // per_row // 128 * 128)


_ERR_UNIT = 2.0 ** -22  # per-operation error unit of a tensor-core fp32 sum; 2x the ulp bound


def _encode_append(xc, W, b, kk, thr, out, k, fin):
    """Fallback path for one row chunk (few candidates per tile would not do: small S / large
    k). A lower bound lo on each row's kk-th largest entry from a strided sample of latents;
    a GEMM pass appends every entry >= lo to a per-row buffer (atomic row counters); an exact
    top-kk over the buffer; rows whose survivors overflowed it rescanned on the device; the
    outputs written. No host sync."""
    N, D = xc.shape
    S = W.shape[0]
    dev = xc.device
    stride = _append_stride(kk, S)
    cap = _append_cap(kk, S)
    if stride > 1:
        # The kk-th largest of the sample, minus twice the worst-case fp32 summation error of
        # one entry (both passes sum exact bf16/fp16/fp32 products in fp32: |error| <= gamma_D
        # sum_d |x_d w_d| <= gamma_D ||x|| ||w||) and the bias-add rounding.
        Ss = (S + stride - 1) // stride
        sample = torch.empty(N, Ss, dtype=torch.float32, device=dev)
        (x_desc, w_desc), nprog, meta = _gemm_args(xc, W, stride)
        _encode_kernel[(nprog,)](xc, W, x_desc, w_desc, b, b, sample, sample, sample, sample,
                                 N, Ss, D, 0, stride * D, stride, SAMPLE=True, HAS_THR=False,
                                 WIDE=False, **meta)
        t = torch.topk(sample, kk, dim=1, sorted=False).values.amin(1)
        del sample
        gamma = 1.01 * (D + 2) * _ERR_UNIT
        w_max = torch.linalg.vector_norm(W[::stride], dim=1, dtype=torch.float32).amax()
        b_max = b[::stride].abs().amax().float()
        x_norm = torch.linalg.vector_norm(xc, dim=1, dtype=torch.float32)
        lo = t - 2 * gamma * x_norm * w_max - 4 * _ERR_UNIT * (t.abs() + b_max)
    else:  # small S: keep every entry (the buffer holds all S: it cannot overflow)
        lo = torch.full((N,), float("-inf"), device=dev)
    cnt = torch.zeros(N, dtype=torch.int32, device=dev)
    buf = torch.empty(N, cap, dtype=torch.long, device=dev)
    (x_desc, w_desc), nprog, meta = _gemm_args(xc, W, block_s=ENCODE["append_block_s"])
    act = out.act if thr is not None else cnt
    _encode_kernel[(nprog,)](xc, W, x_desc, w_desc, b, thr if thr is not None else b,
                             lo.contiguous(), buf, cnt, act, N, S, D, cap, D, 1, SAMPLE=False,
                             HAS_THR=thr is not None, WIDE=N * cap >= 2 ** 31, **meta)
    keys = torch.empty(N, kk, dtype=torch.long, device=dev)
    if cap <= 8192:
        block = p2(cap)
        _select_kernel[(N,)](buf, cnt, keys, xc, fin, cap, kk, D, BLOCK=block, KP=p2(kk, 2),
                             BLOCK_D=min(1024, p2(D)), num_warps=4 if block <= 2048 else 8)
    else:  # very large k: the unwritten tail of each row must not take part
        live = torch.arange(cap, device=dev)[None, :] < cnt[:, None]
        keys.copy_(torch.topk(buf.masked_fill_(~live, torch.iinfo(torch.long).min), kk,
                              dim=1).values)
        fin.copy_(torch.isfinite(xc).all(1))
    del buf
    _settle(out, keys, cnt, fin, xc, W, b, thr, k, S, fix=2, finish=True, limit=cap,
            block_s=ENCODE["rescan_block_s"])


def _encode_main(x, b_pre, W, b, kk, thr, k, fin, out, top_m, bounds):
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
        xc = _centered(x[sl], b_pre)
        o = out.rows(sl)
        if len(bounds) == 1:
            cand, L = _encode_top(xc, W, b, kk, thr, o.act, fin[sl], top_m, keys[sl], bad[sl])
            _settle(o, keys[sl], bad[sl], fin[sl], xc, W, b, thr, k, S, fix=1, finish=True,
                    cand=cand, L=L, top_m=top_m)
            del cand, xc  # before the next chunk allocates its own (the memory plan)
            continue
        # Latent chunks: each chunk's exact top-kk (settled on the device), merged into a
        # running top-kk -- the row's top-kk is among the chunks' top-kk lists.
        run = None
        for t0, t1 in bounds:
            s0, s1 = t0 * BS, min(S, t1 * BS)
            Wc, bc = W[s0:s1], b[s0:s1]
            cand, L = _encode_top(xc, Wc, bc, kk, thr[s0:s1] if thr is not None else None,
                                  o.act, fin[sl], top_m, keys[sl], bad[sl], col0=s0)
            _settle(o, keys[sl], bad[sl], fin[sl], xc, Wc, bc, None, k, S, fix=1,
                    finish=False, cand=cand, L=L, top_m=top_m, col0=s0)
            del cand
            both = keys[sl] if run is None else torch.cat([run, keys[sl]], 1)
            run = torch.topk(both, kk, dim=1).values
        _settle(o, run.contiguous(), None, fin[sl], xc, W, b, thr, k, S, fix=0, finish=True)


def topk_encode(x, W, b, k, b_pre=None, thr=None, *, id32=False):
    """The triton top-k encode of 2-D x [N, D] against W [S, D], b [S] (optional b_pre [D],
    JumpReLU thr [S]). -> values [N, k] in x's dtype, indices [N, k] int64, overflow [N]
    bool (more than k active latents), and with ``id32`` the indices as int32 too (what the
    backward's grouping by latent sorts). No host sync: rows of x - b_pre with NaN or inf
    come back as NaN values. The fused kernels or, where it times faster (paths.py), the
    torch composition."""
    check_dtypes(x, W, b, b_pre, thr)
    key = paths.bucket("encode", x, W, b_pre, thr, k=k, id32=id32)
    path = paths.choose(key, x.device, {
        "fused": lambda: _topk_encode_fused(x, W, b, k, b_pre, thr, id32),
        "torch": lambda: _topk_encode_torch(x, W, b, k, b_pre, thr, id32)},
        compare=lambda got, want: encode_mismatch(got, want, x, W, b, b_pre, thr))
    fn = _topk_encode_fused if path == "fused" else _topk_encode_torch
    return fn(x, W, b, k, b_pre, thr, id32)


def encode_mismatch(got, want, x, W, b, b_pre=None, thr=None):
    """None when the encode outputs got (values, indices, overflow, ...) agree with want:
    values to a tolerance of x's dtype (paths.mismatch); indices equal, except at a near-tie,
    where got's latent must be a distinct, in-range latent whose own pre-activation gives
    got's value; overflow flags equal but for 1 row in 1000 (a (k+1)-th entry at 0). Else a
    sentence on the first difference found (host syncs: run once per shape bucket)."""
    (vg, ig, og), (vw, iw, ow) = got[:3], want[:3]
    N, k = vw.shape
    S = W.shape[0]
    why = paths.mismatch(vg, vw, "values", dtype=x.dtype)
    if why is not None:
        return why
    if ((ig < 0) | (ig >= S)).any():
        return "indices out of range"
    srt = ig.sort(1).values
    if (srt[:, 1:] == srt[:, :-1]).any():
        return "a row selects one latent twice"
    fin = torch.isfinite(vw).all(1, keepdim=True)
    r, j = ((ig != iw) & fin).nonzero(as_tuple=True)
    if r.numel():  # near-ties: got's latent must carry got's value
        i = ig[r, j]
        xr = x[r].float() - (b_pre.float() if b_pre is not None else 0.0)
        pre = (xr * W[i].float()).sum(1) + b[i].float()
        keep = pre > 0
        if thr is not None:
            keep &= pre > thr[i].float()
        act = torch.where(keep, pre, 0.0).to(x.dtype)
        why = paths.mismatch(act[:, None], vg[r, j][:, None], "the values of near-tied "
                             "latents", dtype=x.dtype,
                             scale=vw.float().abs().amax(1, keepdim=True)[r])
        if why is not None:
            return f"indices differ at {r.numel()} of {N * k} slots; {why}"
    n_ovf = int((og != ow).sum())
    if n_ovf > N // 1000 + 1:
        return f"the overflow flag differs on {n_ovf} of {N} rows"
    return None


def _keys(pre):
    """torch's twin of the kernels' pack(): int64 keys whose integer order is pre's order with
    exact ties to the smaller index (pre's fp32 bits high, ~column low; -0.0 as +0.0)."""
    bits = (pre.float() + 0.0).view(torch.int32)
    hi = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.long)
    col = torch.arange(pre.shape[1], device=pre.device)
    return (hi << 32) | (0xFFFFFFFF - col)


def _unkeys(keys):
    """Inverse of _keys: (fp32 values, int64 columns)."""
    hi = (keys >> 32).to(torch.int32)
    bits = torch.where(hi < 0, hi ^ 0x7FFFFFFF, hi)
    return bits.view(torch.float32), 0xFFFFFFFF - (keys & 0xFFFFFFFF)


_MM_OUT_DTYPE = [True]  # whether this torch's CUDA mm takes out_dtype (torch >= 2.8)


def _linear_fp32(xc, W, b):
    """xc W^T + b in fp32, as the fused path ranks it: products of the inputs' dtype summed
    in fp32, not rounded to bf16/fp16 (cuBLAS with an fp32 output on CUDA; on a CPU, e.g.
    under the interpreter, fp32 copies). A CUDA torch without mm(out_dtype=) rounds to x's
    dtype (cuBLAS's own output): ties among the rounded values then go to the smaller index,
    where the fused path ranks the fp32 sums -- near-ties the path check allows."""
    F = torch.nn.functional
    if xc.dtype == torch.float32:
        return F.linear(xc, W, b)
    if xc.is_cuda:
        if _MM_OUT_DTYPE[0]:
            try:
                return torch.mm(xc, W.T, out_dtype=torch.float32) + b.float()
            except (TypeError, RuntimeError, NotImplementedError):
                _MM_OUT_DTYPE[0] = False
        return F.linear(xc, W, b).float()  # no fp32 copy of W on the GPU
    return F.linear(xc.float(), W.float(), b.float())


def _topk_encode_torch(x, W, b, k, b_pre, thr, id32):
    """The same outputs from torch ops: per row chunk (ENCODE["buffer_bytes"] of fp32
    pre-activations and their int64 keys) an fp32 GEMM (_linear_fp32) and ``torch.topk`` of
    k + 1 keys (_keys: exact ties to the smaller index, as on the fused path). No host
    sync."""
    N, D = x.shape
    S = W.shape[0]
    dev = x.device
    kk = min(S, k + 1) if thr is None else k
    values = torch.empty(N, k, dtype=x.dtype, device=dev)
    indices = torch.empty(N, k, dtype=torch.long, device=dev)
    overflow = torch.empty(N, dtype=torch.bool, device=dev)
    rows = max(1, ENCODE["buffer_bytes"] // (12 * max(S, 1)))
    ar = torch.arange(k, device=dev)
    for r in range(0, N, rows):
        sl = slice(r, r + rows)
        xc = x[sl] - b_pre if b_pre is not None else x[sl]
        pre = _linear_fp32(xc, W, b)
        top, idx = _unkeys(torch.topk(_keys(pre), kk, dim=1).values)
        keep = top[:, :k] > 0
        if thr is not None:
            keep &= top[:, :k] > thr[idx[:, :k]]
            overflow[sl] = (pre > thr.clamp_min(0)).sum(1) > k
        else:
            overflow[sl] = (top[:, k] > 0) if kk > k else False
        fin = torch.isfinite(xc).all(1, keepdim=True)
        values[sl] = torch.where(fin, torch.where(keep, top[:, :k], 0), float("nan"))
        indices[sl] = torch.where(fin, idx[:, :k], ar)
        overflow[sl] &= fin[:, 0]
    out = (values, indices, overflow)
    return out + ((indices.to(torch.int32),) if id32 else ())


def _topk_encode_fused(x, W, b, k, b_pre, thr, id32):
    N, D = x.shape
    S = W.shape[0]
    dev = x.device
    x = x.contiguous()
    W, b = W.contiguous(), b.contiguous()  # the kernels index b and thr with stride 1
    thr = thr.contiguous() if thr is not None else None
    out = _Out(torch.empty(N, k, dtype=x.dtype, device=dev),
               torch.empty(N, k, dtype=torch.long, device=dev),
               torch.empty(N, k, dtype=torch.int32, device=dev) if id32 else None,
               torch.empty(N, dtype=torch.int8, device=dev),
               torch.zeros(N, dtype=torch.int32, device=dev) if thr is not None else None)
    result = (out.values, out.indices, out.overflow.view(torch.bool))
    if N == 0:
        return result + ((out.id32,) if id32 else ())
    # Without a JumpReLU threshold, "more than k active latents" is "the (k+1)-th largest
    # pre-activation is > 0", so the kernels select k+1.
    kk = min(S, k + 1) if thr is None else k
    fin = torch.empty(N, dtype=torch.int8, device=dev)  # rows of x - b_pre all finite
    plan = _plan(kk, S, D)
    if plan is not None:
        _encode_main(x, b_pre, W, b, kk, thr, k, fin, out, *plan)
    else:  # row chunks: the fallback's candidate buffer holds up to `cap` keys per row
        rows = _append_rows(kk, S, D, x.element_size() if b_pre is not None else 0)
        for r in range(0, N, rows):
            sl = slice(r, r + rows)
            _encode_append(_centered(x[sl], b_pre), W, b, kk, thr, out.rows(sl), k, fin[sl])
    return result + ((out.id32,) if id32 else ())
