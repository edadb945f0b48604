"""Where the time of the edit step and the SAE training step goes (torch.profiler, CUDA time),
shape A of the GPU issue by default.

    python benchmarks/profile_steps.py [--shape A] [--rows 18]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import sae_sparse as ss
from sae_sparse.doctor import GPU_SHAPES

SHAPES = GPU_SHAPES  # (N, D, S, k), defined once in sae_sparse.doctor


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="A")
    ap.add_argument("--rows", type=int, default=18)
    a = ap.parse_args()
    N, D, S, k = SHAPES[a.shape]
    torch.manual_seed(0)
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    sae = ss.SAE.random(D, S, k, b_pre=True, device="cuda", dtype=torch.bfloat16)
    frozen = ss.SAE.random(D, S, k, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    ad = ss.LatentAdapter(S, 16, device="cuda")

    def edit_step():
        xg = x.clone().requires_grad_(True)
        ss.sae_edit(xg, frozen, ad, backend="triton").float().square().mean().backward()

    def sae_step():
        (sae(x, backend="triton").float() - x.float()).square().sum(-1).mean().backward()

    for name, fn in (("edit step", edit_step), ("SAE step", sae_step)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(f"== {name}, shape {a.shape}, 5 steps")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows,
                                        max_name_column_width=60))


if __name__ == "__main__":
    main()
