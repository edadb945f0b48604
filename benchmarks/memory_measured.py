"""Peak memory per rank of a latent-sharded adapter step, measured, beside
``sae_sparse.distributed.memory_model``'s prediction for the same shape.

    python benchmarks/memory_measured.py --S 1048576 --D 576 --N 512 --P 1,2,4 --save

P gloo processes on this machine (one per rank, ``torch.multiprocessing``); each builds its
own shard of a random SAE (never the whole dictionary) and its slice of a gain + bias + ffn:16
adapter, then runs ``--steps`` training steps (``sharded_sae_edit``, a loss, backward, AdamW).
Measured: the rank's peak resident set (``VmHWM``) minus its resident set after
``init_process_group`` (torch imported, nothing of the step allocated), so the number is what
the step adds -- the quantity the model predicts. fp32 weights (``--weight-bytes 4``) unless
``--bf16``.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _bench import rss_kib  # noqa: E402




def _reset_peak():
    """Resets VmHWM to the current resident set (Linux: write 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rank(rank, world, init_file, a, out):
    from sae_sparse.distributed import ShardedSAE, shard_range, sharded_sae_edit
    from sae_sparse.modules import LatentAdapter

    torch.set_num_threads(max(1, a.threads // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        _reset_peak()
        base = rss_kib("VmRSS")
        s0, s1 = shard_range(a.S, rank, world)
        dtype = torch.bfloat16 if a.bf16 else torch.float32
        g = torch.Generator().manual_seed(rank)
        W_dec = torch.randn(s1 - s0, a.D, generator=g, dtype=dtype)
        W_dec /= W_dec.float().norm(dim=1, keepdim=True).to(dtype)
        W_enc = W_dec.clone()
        b_dec = torch.zeros(a.D, dtype=dtype)
        shard = ShardedSAE(W_enc, torch.zeros(s1 - s0, dtype=dtype), W_dec, b_dec, a.k,
                           d_sae=a.S, offset=s0, b_pre=b_dec, copy=False)
        shard.requires_grad_(False)
        del W_enc, W_dec
        # the adapter's slice, built at its own size (shard_adapter of a whole adapter
        # would hold every latent's parameters on every rank for a moment)
        ad = LatentAdapter(s1 - s0, 16)
        opt = torch.optim.AdamW(ad.parameters(), lr=1e-3)
        gx = torch.Generator().manual_seed(123)  # the same tokens on every rank
        for _ in range(a.steps):
            x = torch.randn(a.N, a.D, generator=gx).to(dtype)
            y = sharded_sae_edit(x, shard, ad)
            loss = (y.float() - x.float()).pow(2).mean() + y.float().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        peak = rss_kib("VmHWM")
        res = torch.tensor([float(peak - base), float(base)], dtype=torch.float64)
        parts = [torch.zeros_like(res) for _ in range(world)]
        dist.all_gather(parts, res)
        if rank == 0:
            out.put([p.tolist() for p in parts])
    finally:
        dist.destroy_process_group()


def measure(a, P):
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_rank, args=(P, os.path.join(d, "init"), a, q), nprocs=P,
                           join=True, start_method="spawn")
    return q.get()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--S", type=int, default=1 << 20)
    ap.add_argument("--D", type=int, default=576)
    ap.add_argument("--N", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--P", default="1,2,4")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--save", action="store_true")
    a = ap.parse_args()
    from sae_sparse.distributed import memory_model

    rows = []
    for P in [int(p) for p in a.P.split(",")]:
        got = measure(a, P)
        model = memory_model(a.S, a.D, P, k=a.k, N=a.N, hidden=16,
                             weight_bytes=2 if a.bf16 else 4)
        peak = max(g[0] for g in got) * 1024
        rows.append({"P": P, "measured_peak_per_rank": peak,
                     "measured_each_rank": [g[0] * 1024 for g in got],
                     "baseline_rss": got[0][1] * 1024, "model": model})
        print(f"P={P}: measured {peak / 2 ** 30:.3f} GiB per rank (largest), model "
              f"{model['total'] / 2 ** 30:.3f} GiB ({peak / model['total']:.2f}x)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    gib = 2 ** 30
    lines = ["# Latent-sharded adapter step: peak memory per rank, measured against "
             "`memory_model`\n",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
             f"{torch.__version__}; sae_sparse @ {commit}; {datetime.date.today()}. Command: "
             f"`python benchmarks/memory_measured.py --S {a.S} --D {a.D} --N {a.N} --P {a.P}"
             f"{' --bf16' if a.bf16 else ''} --save`.\n",
             f"S = {a.S} latents, D = {a.D}, k = {a.k}, N = {a.N} tokens per step, "
             f"{'bf16' if a.bf16 else 'fp32'} SAE weights (frozen), a gain + bias + ffn:16 "
             f"adapter slice trained with AdamW, {a.steps} steps, gloo. Measured: peak "
             "resident set (VmHWM) minus the resident set after init_process_group, the "
             "largest rank's.\n",
             "| P | measured / rank | model / rank | measured / model | model: weights | "
             "adapter | activations |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["model"]
        lines.append(f"| {r['P']} | {r['measured_peak_per_rank'] / gib:.3f} GiB | "
                     f"{m['total'] / gib:.3f} GiB | "
                     f"{r['measured_peak_per_rank'] / m['total']:.2f}× | "
                     f"{m['weights'] / gib:.3f} GiB | {m['adapter'] / gib:.3f} GiB | "
                     f"{m['activations'] / gib:.3f} GiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.save:
        path = os.path.join(HERE, "results", f"memory-sharded-{datetime.date.today()}")
        with open(path + ".md", "w") as f:
            f.write(text)
        with open(path + ".json", "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
