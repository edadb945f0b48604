"""An adapter's training step over dictionaries of millions of latents on one GPU.

For each S: a frozen bf16 SAE (one [S, D] matrix serves as W_enc and W_dec, so a 16M-latent
dictionary at D=768 takes 24 GiB, not 48) and a gain + bias + FFN (h=16) LatentAdapter in
fp32 trained with Adam. One step = topk_encode + edit_decode forward, backward, Adam step.
Rows: the step's median ms and peak extra memory, the bare GEMM x @ W.T at that S (the
encode's floor; by row chunks into a buffer of at most 2 GiB) for scale, and the same step
with the dense latent adapter (an N x S code; it runs out of memory first) and a rank-16
residual LoRA (independent of S) as baselines.

    python benchmarks/bench_scale.py [--S 1048576,4194304,16777216] [--save]
    TRITON_INTERPRET=1 python benchmarks/bench_scale.py --smoke    # plumbing check on CPU
"""
import argparse
import datetime
import os
import subprocess

import torch

import sae_sparse as ss
from _bench import Bench, write_result
from sae_sparse.reference import dense_sae_edit

HERE = os.path.dirname(os.path.abspath(__file__))


def unit_rows(S, D, dtype, device, seed=0, chunk=1 << 20):
    """[S, D] random unit rows in `dtype`, made a chunk of rows at a time (an fp32 copy of
    the whole matrix would not fit next to it at the largest S)."""
    g = torch.Generator(device=device).manual_seed(seed)
    W = torch.empty(S, D, dtype=dtype, device=device)
    for s in range(0, S, chunk):
        w = torch.randn(min(chunk, S - s), D, device=device, generator=g)
        W[s:s + chunk] = w / w.norm(dim=1, keepdim=True)
    return W


def rows_for(B, S, N, D, k, h):
    dev = B.device
    W = unit_rows(S, D, torch.bfloat16, dev)
    b = torch.zeros(S, dtype=torch.bfloat16, device=dev)
    b_dec = torch.zeros(D, dtype=torch.bfloat16, device=dev)
    x = torch.randn(N, D, device=dev).to(torch.bfloat16)
    backend = "triton"

    def adapter_step(dense=False):
        ad = ss.LatentAdapter(S, hidden=h, device=dev)
        opt = torch.optim.Adam(ad.parameters(), lr=1e-3)

        def step():
            # what sae_edit does (its SAE module would hold W_enc and W_dec apart)
            values, indices = ss.topk_encode(x, W, b, k, backend=backend)
            p = {n: t.to(W.dtype) for n, t in ad.edit_params().items()}
            if dense:  # the same math on a dense [N, S] code
                y = dense_sae_edit(x, values, indices, W, b_dec, activation=ad.activation,
                                   mode="delta", **p)
            else:
                y = ss.edit_decode(x, values, indices, W, b_dec, activation=ad.activation,
                                   mode="delta", backend=backend, **p)
            y.float().square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    lora = ss.ResidualLoRA(D, rank=16, device=dev)
    lora_opt = torch.optim.Adam(lora.parameters(), lr=1e-3)

    def lora_step():
        lora(x.float()).square().mean().backward()
        lora_opt.step()
        lora_opt.zero_grad(set_to_none=True)

    # The encode's floor: x @ W.T, by row chunks into one output buffer of at most 2 GiB (the
    # whole [N, S] product is 128 GiB at 16M latents).
    rows = max(1, min(N, (2 << 30) // (S * W.element_size())))

    def gemm():
        buf = torch.empty(rows, S, dtype=W.dtype, device=dev)
        for r in range(0, N, rows):
            torch.mm(x[r:r + rows], W.T, out=buf[:min(rows, N - r)])

    fns = {"gemm x @ W.T": gemm, "adapter step": adapter_step(),
           "dense latent adapter step": adapter_step(dense=True),
           "residual LoRA r=16 step": lora_step}
    out = {}
    for name, fn in fns.items():
        try:
            peak = B.peak_extra(fn)
            out[name] = (B.ms(fn), peak)
        except torch.cuda.OutOfMemoryError:
            out[name] = None
        except Exception as e:  # report, keep going
            if B.smoke:
                raise
            print(f"S={S} {name}: {type(e).__name__}: {e}")
            out[name] = (float("nan"), float("nan"))
        if dev == "cuda":
            torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--S", default="1048576,4194304,16777216")
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--D", type=int, default=768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--h", type=int, default=16)
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU (needs TRITON_INTERPRET=1): checks the script runs")
    a = ap.parse_args()
    B = Bench(a.smoke)
    sizes = [600, 2100] if a.smoke else [int(s) for s in a.S.split(",")]
    N, D, k, h = (24, 32, 4, 4) if a.smoke else (a.N, a.D, a.k, a.h)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    lines = [f"# Adapter steps over large dictionaries\n\n{B.banner()}; sae_sparse @ {commit}; "
             f"{datetime.date.today()}\n", f"N={N} D={D} k={k}, gain+bias+FFN h={h} adapter "
             "(fp32, Adam), frozen bf16 SAE with W_enc = W_dec\n",
             "| S | W MiB | op | median ms | × gemm | peak extra MiB |",
             "|---|---|---|---|---|---|"]
    for S in sizes:
        res = rows_for(B, S, N, D, k, h)
        g = res["gemm x @ W.T"][0] if res["gemm x @ W.T"] else float("nan")
        for name, r in res.items():
            if r is None:
                lines.append(f"| {S} | {S * D * 2 / 2 ** 20:.0f} | {name} | out of memory | | |")
                continue
            ms, peak = r
            lines.append(f"| {S} | {S * D * 2 / 2 ** 20:.0f} | {name} | {ms:.2f} | "
                         f"{ms / g:.2f} | {peak:.0f} |")
    text = "\n".join(lines)
    print(text)
    if a.save and not a.smoke:
        write_result(text, f"scale-{B.card().replace(' ', '_')}-{datetime.date.today()}.md")


if __name__ == "__main__":
    main()
