"""Sweep the triton gather decode's knobs (sae_sparse.triton.DECODE) and its backward's
(TOKEN: the per-token backward kernel) on shapes A-D of the GPU issue: plain sparse_decode
through the fused edit + decode kernel and the p = dy . W_dec[i] of its backward, effective
TB/s on the N*k*D gathered bytes, against F.embedding_bag in the same run; every config's
output checked. Then the edit's dense folds (FOLD: fold, fold_t) against the torch path they
replaced, TB/s on one read of W_dec.

    python benchmarks/decode_sweep.py [--shapes A,C]
    TRITON_INTERPRET=1 python benchmarks/decode_sweep.py --smoke   # plumbing check, CPU
"""
import argparse
import itertools

import torch
import torch.nn.functional as F

from _bench import Bench, table
from sae_sparse import triton as T
from sae_sparse.triton import backward as BW
from sae_sparse.triton import edit_decode as ED
from sae_sparse._autograd import fold_t_torch, fold_torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="A,B,C,D")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU (needs TRITON_INTERPRET=1): checks the script runs")
    a = ap.parse_args()
    B = Bench(a.smoke)
    dev = B.device
    grid = [dict()] + [dict(block_c=c, block_k=kb, num_warps=w) for c, kb, w in
                       itertools.product((128, 256, 512, 1024), (8, 32, 64), (4, 8))]
    if a.smoke:
        grid = grid[:3]
    print(B.banner())
    rows = []
    for name, N, D, S, k, g in B.each_shape(a.shapes):
        W = (torch.randn(S, D, device=dev, generator=g) / D ** 0.5).bfloat16()
        idx = torch.randint(0, S, (N, k), device=dev, generator=g)
        vals = torch.rand(N, k, device=dev, generator=g).bfloat16()
        gathered = N * k * D * W.element_size()
        ref = F.embedding_bag(idx, W.float(), per_sample_weights=vals.float(), mode="sum")
        t0 = B.ms(lambda: F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum"))
        rows.append((name, "embedding_bag", t0, gathered / t0 / 1e9, ""))
        def plain():  # sparse_decode through the fused edit + decode kernel
            return ED.edit_decode_fwd(None, vals, idx, W, None, None, None, None, None, 0,
                                      ED.PLAIN)[0]

        def decode():
            t = B.ms(plain)
            err = ((plain().float() - ref).abs().max() / ref.abs().max()).item()
            return t, gathered / t / 1e9, f"rel err {err:.1e}"
        B.sweep(rows, name, "decode", T.DECODE, grid, decode)
        # the decode's backward: dvalues[n, j] = dy[n] . W[idx[n, j]]
        dy = torch.randn(N, D, device=dev, generator=g).bfloat16()
        want = (W.float()[idx] * dy.float()[:, None, :]).sum(-1)

        def p_only():  # the per-token backward kernel computing just p = dy . W[idx]
            return BW.token_bwd(dy, vals, idx, W, mode=ED.PLAIN, store_p=True,
                                mask_dpre=False)["p"]

        def gather_dot():
            t = B.ms(p_only)
            err = ((p_only() - want).abs().max() / want.abs().max()).item()
            return t, gathered / t / 1e9, f"rel err {err:.1e}"
        gd_grid = [dict()] + [dict(block_d=c, num_warps=w)
                              for c, w in itertools.product((32, 64, 128, 256), (4, 8))]
        B.sweep(rows, name, "token_bwd (p)", T.TOKEN, gd_grid[:2] if a.smoke else gd_grid,
                gather_dot)
        # The edit's dense folds (adapter h = 16 plus its bias: 17 rows), TB/s on one read of
        # W: the Triton kernels against torch's chunked fp32 upcast (what they replaced).
        A = torch.randn(17, S, device=dev, generator=g).bfloat16()
        G = torch.randn(17, D, device=dev, generator=g)
        wb = S * D * W.element_size()
        ref_f = A.double() @ W.double()
        ref_t = G.double() @ W.double().T

        def run(fn, ref):
            t = B.ms(fn)
            err = ((fn().double() - ref).abs().max() / ref.abs().max()).item()
            return t, wb / t / 1e9, f"rel err {err:.1e}"
        for what, fn, ref in (("fold, torch", lambda: fold_torch(A, W), ref_f),
                              ("fold_t, torch", lambda: fold_t_torch(G, W), ref_t)):
            rows.append((name, what, *run(fn, ref)))
            print(*rows[-1], flush=True)
        fgrid = [dict()] + [dict(block_k=bk, block_n=bn, num_warps=w) for bk, bn, w in
                            itertools.product((32, 64), (64, 128, 256), (4, 8))]
        for what, fn, ref in (("fold", lambda: T.fold(A, W), ref_f),
                              ("fold_t", lambda: T.fold_t(G, W), ref_t)):
            B.sweep(rows, name, what, T.FOLD, fgrid[:2] if a.smoke else fgrid,
                    lambda fn=fn, ref=ref: run(fn, ref))
    table(rows, "TB/s gathered (folds: TB/s of W)")


if __name__ == "__main__":
    main()
