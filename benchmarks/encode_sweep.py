"""Sweep the triton encode's tuning knobs (sae_sparse._triton.ENCODE) on shapes A-D of the GPU
issue and time its parts, against the bare GEMM measured in the same run.

    python benchmarks/encode_sweep.py [--shapes A,C] [--quick]

Per shape: bare `x @ W_enc.T`, `F.linear` + `torch.topk`, then for each config the whole
topk_encode and (for the default config) its three passes alone: the GEMM with its top-m
epilogue, the exact selection over the candidates, and the finish (device fix-up of the flagged
rows, values/indices/overflow). Every config's output is checked against `F.linear` + `torch.topk`
(fraction of selected indices that agree; the rest must be near-ties). Medians of do_bench.
"""
import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

import sae_sparse as ss
from sae_sparse import _triton as T

SHAPES = {"A": (8192, 768, 32768, 32), "B": (8192, 768, 131072, 32),
          "C": (8192, 2304, 65536, 64), "D": (4096, 4096, 131072, 64)}


def ms(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_extra(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="A,B,C,D")
    ap.add_argument("--quick", action="store_true", help="fewer configs")
    a = ap.parse_args()
    default = dict(T.ENCODE)
    grid = [dict(), dict(top_m=3), dict(top_m=5), dict(programs_per_sm=2), dict(tma=False),
            dict(num_stages=4), dict(num_warps=4)]
    if not a.quick:
        grid += [dict(block_n=128, block_s=64, num_warps=4, num_stages=4),
                 dict(block_n=64, block_s=128, num_warps=4, num_stages=4),
                 dict(block_d=128, num_stages=2), dict(block_n=256, block_s=128, num_stages=2)]
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    rows = []
    for name in a.shapes.split(","):
        N, D, S, k = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(N, D, device="cuda", generator=g).bfloat16()
        W = (torch.randn(S, D, device="cuda", generator=g) / D ** 0.5).bfloat16()
        b = (0.1 * torch.randn(S, device="cuda", generator=g)).bfloat16()
        gemm = ms(lambda: x @ W.T)
        base = ms(lambda: torch.topk(F.linear(x, W, b), k))
        ref_idx = torch.topk(F.linear(x, W, b).float(), k).indices.sort(1).values
        rows.append((name, "gemm", gemm, 1.0, ""))
        rows.append((name, "linear+topk", base, base / gemm, ""))
        for cfg in grid:
            T.ENCODE.clear()
            T.ENCODE.update(default, **cfg)
            label = ",".join(f"{k_}={v}" for k_, v in cfg.items()) or "default"
            try:
                t = ms(lambda: T.topk_encode(x, W, b, k, None, None))
                _, idx, _ = T.topk_encode(x, W, b, k, None, None)
                agree = (idx.sort(1).values == ref_idx).float().mean().item()
                mem = peak_extra(lambda: T.topk_encode(x, W, b, k, None, None))
                rows.append((name, "encode " + label, t, t / gemm,
                             f"agree {agree:.4f}, peak +{mem:.0f} MiB"))
            except Exception as e:  # report and go on
                rows.append((name, "encode " + label, float("nan"), float("nan"),
                             f"{type(e).__name__}: {str(e)[:80]}"))
            print(*rows[-1], flush=True)
        T.ENCODE.clear()
        T.ENCODE.update(default)
        # the parts, default config
        kk = k + 1
        nt = triton.cdiv(S, T.ENCODE["block_s"])
        top_m, bounds = T._plan(kk, S, D)
        assert len(bounds) == 1, "latent chunks: time the whole encode instead"
        L = nt * top_m
        rws = min(N, max(128, T.ENCODE["buffer_bytes"] // (8 * L) // 128 * 128))
        xs = x[:rws].contiguous()
        act = torch.zeros(rws, dtype=torch.int32, device="cuda")
        cand = torch.empty(rws, L, dtype=torch.long, device="cuda")
        (xd, wd), nprog, meta = T._gemm_args(xs, W)
        t1 = ms(lambda: T._encode_top_kernel[(nprog,)](xs, W, xd, wd, b, b, cand, act, rws, S, D,
                                                       L, TOPM=top_m, HAS_THR=False,
                                                       **meta))
        keys = torch.empty(rws, kk, dtype=torch.long, device="cuda")
        bad = torch.empty(rws, dtype=torch.int32, device="cuda")
        t2 = ms(lambda: T._select_top_kernel[(rws,)](cand, keys, bad, L, kk, nt, BLOCK=T._p2(L),
                                                     KP=T._p2(kk, 2), TOPM=top_m,
                                                     BLOCK_T=T._p2(nt), num_warps=4))
        fin = torch.ones(rws, dtype=torch.int8, device="cuda")
        out = (torch.empty(rws, k, device="cuda"), torch.empty(rws, k, dtype=torch.long,
                                                                 device="cuda"),
               torch.empty(rws, dtype=torch.int8, device="cuda"),
               torch.empty(rws, dtype=torch.int8, device="cuda"))
        t3 = ms(lambda: T._finish(out, keys, fin, xs, W, b, None, act, k,
                                  fix=(bad, cand, top_m)))
        nbad = int((bad > 0).sum())
        nleft = int(out[3].sum())
        scale = N / rws
        notes = {"GEMM + top-m epilogue": f"{nprog} programs, top_m={top_m}",
                 "select": f"{nbad} of {rws} rows flagged",
                 "finish (device fix-up of flagged rows)": f"{nleft} rows left to the host"}
        for part, t in zip(notes, (t1, t2, t3)):
            rows.append((name, f"part: {part} (x{scale:.0f} chunks of {rws} rows)", t * scale,
                         t * scale / gemm, notes[part]))
            print(*rows[-1], flush=True)
    print("\n| shape | what | median ms | x gemm | note |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.2f} | {r[4]} |")


if __name__ == "__main__":
    main()
