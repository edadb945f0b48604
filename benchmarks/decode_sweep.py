"""Sweep the triton gather decode's knobs (sae_sparse._triton.DECODE) and its backward's
(GATHER_DOT) on shapes A-D of the GPU issue: plain sparse_decode through the kernel library and
the gather-dot of its backward, effective TB/s on the N*k*D gathered bytes, against
F.embedding_bag in the same run; every config's output checked.

    python benchmarks/decode_sweep.py [--shapes A,C]
    TRITON_INTERPRET=1 python benchmarks/decode_sweep.py --smoke   # plumbing check, CPU
"""
import argparse
import itertools

import torch
import torch.nn.functional as F

from _bench import Bench, table
from sae_sparse import _triton as T


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
        out = torch.empty(N, D, dtype=W.dtype, device=dev)

        def decode():
            t = B.ms(lambda: T._gather_decode(out, vals, idx, W))
            T._gather_decode(out, vals, idx, W)
            err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            return t, gathered / t / 1e9, f"rel err {err:.1e}"
        B.sweep(rows, name, "decode", T.DECODE, grid, decode)
        # the decode's backward: dvalues[n, j] = dy[n] . W[idx[n, j]]
        dy = torch.randn(N, D, device=dev, generator=g).bfloat16()
        want = (W.float()[idx] * dy.float()[:, None, :]).sum(-1)

        def gather_dot():
            t = B.ms(lambda: T._gather_dot(dy, idx, W))
            err = ((T._gather_dot(dy, idx, W) - want).abs().max() / want.abs().max()).item()
            return t, gathered / t / 1e9, f"rel err {err:.1e}"
        gd_grid = [dict()] + [dict(block_c=c, num_warps=w)
                              for c, w in itertools.product((32, 64, 128, 256), (4, 8))]
        B.sweep(rows, name, "gather_dot", T.GATHER_DOT, gd_grid[:2] if a.smoke else gd_grid,
                gather_dot)
    table(rows, "TB/s gathered")


if __name__ == "__main__":
    main()
