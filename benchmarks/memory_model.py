"""Prints the README's memory table for latent-sharded dictionaries
(sae_sparse.distributed.memory_model): bytes per rank and the largest S that fits a GPU.

    python benchmarks/memory_model.py [--gib 141] [--D 4096]
"""
import argparse

from sae_sparse.distributed import memory_model


def largest_S(P, budget, **kw):
    lo, hi = 1, 1 << 34
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory_model(mid, P=P, **kw)["total"] <= budget:  # D, k, N in kw
            lo = mid
        else:
            hi = mid - 1
    return lo


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=141.0, help="memory per GPU (H200: 141)")
    ap.add_argument("--reserve", type=float, default=0.15,
                    help="fraction kept for the model, its activations and the allocator")
    ap.add_argument("--D", type=int, default=4096)
    ap.add_argument("--N", type=int, default=8192, help="tokens per step")
    ap.add_argument("--k", type=int, default=32)
    a = ap.parse_args()
    budget = a.gib * (1 - a.reserve) * 2 ** 30
    gib = 2 ** 30
    print(f"D = {a.D}, N = {a.N} tokens, k = {a.k}, bf16 SAE weights, "
          f"{a.gib:g} GiB per GPU with {a.reserve:.0%} reserved\n")
    print("| ranks P | S = 2^24: weights / rank | adapter (gain+bias+ffn:16) | SAE training "
          "(+ fp32 grads, AdamW) | comm / step | largest S, adapter | largest S, SAE "
          "training |")
    print("|---|---|---|---|---|---|---|")
    for P in (1, 2, 4, 8, 16):
        kw = dict(D=a.D, k=a.k, N=a.N)
        m = memory_model(1 << 24, P=P, **kw)
        t = memory_model(1 << 24, P=P, train_sae=True, **kw)
        print(f"| {P} | {m['weights'] / gib:.1f} GiB | {m['adapter'] / gib:.1f} GiB | "
              f"{t['total'] / gib:.1f} GiB | {m['comm_per_step'] / 2 ** 20:.0f} MiB | "
              f"{largest_S(P, budget, **kw) / 2 ** 20:.1f} M | "
              f"{largest_S(P, budget, train_sae=True, **kw) / 2 ** 20:.1f} M |")


if __name__ == "__main__":
    main()
