"""Sweep the triton encode's tuning knobs (sae_sparse.triton.ENCODE) on shapes A-D of the GPU
issue and time its parts, against the bare GEMM measured in the same run.

    python benchmarks/encode_sweep.py [--shapes A,C] [--quick]
    TRITON_INTERPRET=1 python benchmarks/encode_sweep.py --smoke --quick   # plumbing check, CPU

Per shape: bare `x @ W_enc.T`, `F.linear` + `torch.topk`, then for each config the whole
topk_encode and (for the default config) its passes alone: the GEMM with its top-m epilogue,
the exact selection over the candidates, and the per-row settle (the device fix-up of the
flagged rows and the finish: values/indices/overflow). Every config's output is checked
against `F.linear` + `torch.topk` (fraction of selected indices that agree; the rest must be
near-ties). Medians of do_bench.
"""
import argparse

import torch
import torch.nn.functional as F
import triton

from _bench import Bench, table
from sae_sparse.triton import encode as T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="A,B,C,D")
    ap.add_argument("--quick", action="store_true", help="fewer configs")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU (needs TRITON_INTERPRET=1): checks the script runs")
    a = ap.parse_args()
    B = Bench(a.smoke)
    dev = B.device
    # key32=False: the fp32 argmax epilogue; select_by_tile=False: one top-k over all of a
    # row's candidates; top_m=3: fewer candidates per tile, more rows
    # (~8% at A) settled by the device fix-up
    grid = [dict(), dict(key32=False), dict(select_by_tile=False), dict(top_m=3), dict(top_m=5),
            dict(programs_per_sm=2), dict(tma=False), dict(num_stages=4), dict(num_warps=4)]
    if a.smoke:
        grid = grid[:3] + [dict(tma=False)]
    elif not a.quick:
        grid += [dict(block_n=128, block_s=64, num_warps=4, num_stages=4),
                 dict(block_n=64, block_s=128, num_warps=4, num_stages=4),
                 dict(block_d=128, num_stages=2), dict(block_n=256, block_s=128, num_stages=2)]
    print(B.banner())
    rows = []
    for name, N, D, S, k, g in B.each_shape(a.shapes):
        x = torch.randn(N, D, device=dev, generator=g).bfloat16()
        W = (torch.randn(S, D, device=dev, generator=g) / D ** 0.5).bfloat16()
        b = (0.1 * torch.randn(S, device=dev, generator=g)).bfloat16()
        gemm = B.ms(lambda: x @ W.T)
        base = B.ms(lambda: torch.topk(F.linear(x, W, b), k))
        ref_idx = torch.topk(F.linear(x, W, b).float(), k).indices.sort(1).values
        rows.append((name, "gemm", gemm, 1.0, ""))
        rows.append((name, "linear+topk", base, base / gemm, ""))

        def encode():
            t = B.ms(lambda: T.topk_encode(x, W, b, k, None, None))
            _, idx, _ = T.topk_encode(x, W, b, k, None, None)
            agree = (idx.sort(1).values == ref_idx).float().mean().item()
            mem = B.peak_extra(lambda: T.topk_encode(x, W, b, k, None, None))
            return t, t / gemm, f"agree {agree:.4f}, peak +{mem:.0f} MiB"
        B.sweep(rows, name, "encode", T.ENCODE, grid, encode)
        # the parts, default config, one row chunk
        kk = k + 1
        top_m, bounds = T._plan(kk, S, D)
        assert len(bounds) == 1, "latent chunks: time the whole encode instead"
        nt = triton.cdiv(S, T._blocks(D)[1])
        L = nt * top_m
        per = 4 if T._rlow(x.dtype, D) else 8  # bytes per candidate, as _encode_main
        rws = min(N, max(128, T.ENCODE["buffer_bytes"] // (per * L) // 128 * 128))
        xs = x[:rws].contiguous()
        act = torch.zeros(rws, dtype=torch.int32, device=dev)
        fin = torch.ones(rws, dtype=torch.int8, device=dev)
        (xd, wd), nprog, meta = T._gemm_args(xs, W)
        cand = torch.empty(rws, L, dtype=torch.int32 if meta["RLOW"] else torch.long,
                           device=dev)
        t1 = B.ms(lambda: T._encode_top_kernel[(nprog,)](xs, W, xd, wd, b, b, cand, act, rws, S,
                                                         D, L, 0, TOPM=top_m, HAS_THR=False,
                                                         **meta))
        # the same GEMM with the least epilogue (one candidate per tile): what the top-m
        # work costs on top of the tiles themselves
        t0 = B.ms(lambda: T._encode_top_kernel[(nprog,)](xs, W, xd, wd, b, b, cand, act, rws, S,
                                                         D, L, 0, TOPM=1, HAS_THR=False, **meta))
        keys = torch.empty(rws, kk, dtype=torch.long, device=dev)
        bad = torch.empty(rws, dtype=torch.int32, device=dev)
        block = T.p2(L)
        by_tile = T._by_tile(kk, nt, top_m, block)

        def select(tiles):
            T._select_top_kernel[(rws,)](cand, keys, bad, xs, fin, L, kk, nt, D, 0, BLOCK=block,
                                         KP=T.p2(kk, 2), TOPM=top_m, BLOCK_T=T.p2(nt),
                                         BLOCK_S=T._blocks(D)[1], RLOW=meta["RLOW"],
                                         BY_TILE=tiles, CHECK_FIN=True,
                                         BLOCK_D=min(1024, T.p2(D)),
                                         num_warps=1 if a.smoke else (4 if block <= 2048 else 8))
        t2all = B.ms(lambda: select(False))
        t2 = B.ms(lambda: select(by_tile))
        nbad = int((bad > 0).sum())
        out = T._Out(torch.empty(rws, k, dtype=x.dtype, device=dev),
                     torch.empty(rws, k, dtype=torch.long, device=dev), None,
                     torch.empty(rws, dtype=torch.int8, device=dev), None)
        keys0, bad0 = keys.clone(), bad.clone()

        def settle():  # on the select's keys (each call settles a fresh copy)
            keys.copy_(keys0)
            bad.copy_(bad0)
            T._settle(out, keys, bad, fin, xs, W, b, None, k, S, fix=1, finish=True, cand=cand,
                      L=L, top_m=top_m)
        t_copy = B.ms(lambda: (keys.copy_(keys0), bad.copy_(bad0)))
        t4 = B.ms(settle) - t_copy
        scale = N / rws
        parts = [("GEMM + top-1 epilogue", t0, f"{nprog} programs"),
                 ("GEMM + top-m epilogue", t1, f"{nprog} programs, top_m={top_m}, "
                                                f"int32 keys={bool(meta['RLOW'])}"),
                 ("select, a top-k over all candidates", t2all, f"{L} per row"),
                 ("select (default)", t2, f"{nbad} of {rws} rows flagged, "
                                          f"by tile: {by_tile}"),
                 ("settle (fix-up of the flagged rows, finish)", t4, "")]
        for part, t, note in parts:
            rows.append((name, f"part: {part} (x{scale:.0f} chunks of {rws} rows)", t * scale,
                         t * scale / gemm, note))
            print(*rows[-1], flush=True)
    table(rows, "x gemm")

if __name__ == "__main__":
    main()
