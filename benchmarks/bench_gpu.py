"""GPU benchmark of the triton backend against its baselines, shapes A-D of the GPU issue.

Each row: median ms with [0.2, 0.8] quantiles (triton.testing.do_bench), peak extra memory,
and the ratio to the bare GEMM x @ W_enc.T measured in the same run. Baselines:
  gemm             x @ W_enc.T (cuBLAS)
  linear+topk      F.linear + torch.topk
  embedding_bag    F.embedding_bag decode of the top-k code
  sparsify-style   a TopK SAE train step by sparsify 1.3.3's algorithm (fp32 parameters, bf16
                   autocast encoder: dense pre-activations, topk, a backward that index_adds
                   the N*k selected rows and drops the pre-activations' gradient; fp32
                   embedding_bag decode, MSE, backward to every SAE parameter), written here
                   (the GPU image has no sparsify); sparsify itself decodes with its own Triton
                   embedding-bag kernel on a GPU, F.embedding_bag here; ours trains bf16
                   parameters
  sparsify 1.3.3   its own SparseCoder step, unpatched and under compat.patch_sparsify (only
                   where sparsify is installed)
Ours: encode (topk_encode), decode (sparse_decode), edit step (encode + adapter h=16 + decode,
fwd+bwd, frozen SAE; with and without a gradient for x), SAE train step (all SAE grads).
"+ AuxK" rows add sparsify's auxiliary loss (k_aux = D // 2 over S // 10 dead latents).
sparsify's comes from its dense pre-activations, whose gradient its encoder drops, so it
trains W_dec alone; ours by auxk_decode (dense GEMMs over the dead latents) with the encoder
detached as in sparsify, or with the gradient reaching the dead encoder rows too (the AuxK of
the top-k SAE paper), or by auxk_encode + sparse_decode (a sparse code of k_aux latents per
row, encoder gradient too).

    python benchmarks/bench_gpu.py [--shapes A,B,C,D] [--save]
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --smoke   # plumbing check on CPU
"""
import argparse
import datetime
import os
import subprocess

import torch
import torch.nn.functional as F
import triton

import sae_sparse as ss
from _bench import Bench, sparsify_step, write_result
from sae_sparse import triton as _triton

HERE = os.path.dirname(os.path.abspath(__file__))


class SparsifyStyleEncoder(torch.autograd.Function):
    """sparsify 1.3.3's fused encoder, by its algorithm: relu(x W^T + b) densely, a top-k;
    backward by embedding_bag (dx) and index_add over the N*k selected (token, latent)
    pairs (dW, db); the dense pre-activations are an output whose gradient is dropped."""

    @staticmethod
    def forward(ctx, x, W, b, k):
        pre = F.relu(F.linear(x, W, b))
        values, indices = pre.topk(k, dim=-1, sorted=False)
        ctx.save_for_backward(x, W, indices)
        return values, indices, pre

    @staticmethod
    def backward(ctx, dvalues, _di, _dpre):
        x, W, indices = ctx.saved_tensors
        dx = F.embedding_bag(indices, W, mode="sum", per_sample_weights=dvalues.type_as(W))
        rows = (dvalues.unsqueeze(2) * x.unsqueeze(1)).reshape(-1, x.shape[1])
        dW = torch.zeros_like(W).index_add_(0, indices.flatten(), rows.type_as(W))
        db = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device).index_add_(
            0, indices.flatten(), dvalues.flatten().type_as(W))
        return dx, dW, db, None


def real_sparsify_steps(B, x, W_enc, b_enc, W_dec, b_dec, k, dead):
    """sparsify's own SparseCoder step (fvu + auxk_loss / 32, backward), unpatched and under
    compat.patch_sparsify, with and without AuxK -- when sparsify is installed (not on the
    GPU image, which has no network), else nothing."""
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return {}
    from sae_sparse.compat import patch_sparsify
    S, D = W_enc.shape
    sae = SparseCoder(D, SparseCoderConfig(num_latents=S, k=k), device=x.device,
                      dtype=torch.float32)
    with torch.no_grad():
        for p, t in ((sae.encoder.weight, W_enc), (sae.encoder.bias, b_enc),
                     (sae.W_dec, W_dec), (sae.b_dec, b_dec)):
            p.copy_(t)

    xf = x.float()  # sparsify's Trainer feeds the activations as they come; fp32 here

    def step(mask, patched):
        run = sparsify_step(sae, xf, mask)
        if not patched:
            return run

        def run_patched():
            with patch_sparsify(sae, backend="triton"):
                run()
        return run_patched

    return {"sparsify 1.3.3 step": step(None, False),
            "sparsify 1.3.3 step, patch_sparsify": step(None, True),
            "sparsify 1.3.3 step + AuxK": step(dead, False),
            "sparsify 1.3.3 step + AuxK, patch_sparsify": step(dead, True)}


def rows_for(B, name, N, D, S, k, h=16):
    dev, dt = B.device, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, D, device=dev, generator=g).to(dt)
    W_enc = (torch.randn(S, D, device=dev, generator=g) / D ** 0.5).to(dt)
    b_enc = torch.zeros(S, device=dev, dtype=dt)
    W_dec = W_enc.clone()
    b_dec = torch.zeros(D, device=dev, dtype=dt)
    vals, idx = torch.topk(F.linear(x, W_enc, b_enc), k)
    sae = ss.SAE(W_enc, b_enc, W_dec, b_dec, k, b_pre=b_dec)
    frozen = ss.SAE(W_enc, b_enc, W_dec, b_dec, k).requires_grad_(False)
    ad = ss.LatentAdapter(S, h, device=dev)

    # sparsify's recipe: fp32 parameters, bf16 autocast encoder, fp32 embedding_bag decode
    sp = {n: t.detach().float().requires_grad_(True) for n, t in
          dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec).items()}

    def sparsify_decode(v, i):
        return F.embedding_bag(i, sp["W_dec"], per_sample_weights=v.float(),
                               mode="sum") + sp["b_dec"]

    def sparsify_forward():  # (pre-activations, residual), under the caller's autocast
        v, i, pre = SparsifyStyleEncoder.apply(x - sp["b_dec"], sp["W_enc"], sp["b_enc"], k)
        return pre, sparsify_decode(v, i).float() - x.float()

    def sparsify_step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            sparsify_forward()[1].square().sum(-1).mean().backward()

    def our_sae_step():
        y = sae(x, backend="triton")
        (y.float() - x.float()).square().sum(-1).mean().backward()

    # AuxK (sparsify's defaults: k_aux = D // 2; here a tenth of the latents dead)
    k_aux = D // 2
    dead = torch.zeros(S, dtype=torch.bool, device=dev)
    dead[torch.randperm(S, device=dev, generator=g)[:S // 10]] = True

    def sparsify_auxk_step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            pre, e = sparsify_forward()
            av, ai = torch.where(dead, pre, float("-inf")).topk(k_aux, sorted=False)
            # sparsify decodes e_hat without b_dec (e already accounts for it)
            e_hat = F.embedding_bag(ai, sp["W_dec"], per_sample_weights=av.float(), mode="sum")
            (e.square().sum(-1).mean() + (e_hat.float() - e.detach()).square().sum(-1).mean()
             ).backward()

    def our_auxk_step(dense_auxk=True, encoder_grad=True):
        y = sae(x, backend="triton")
        e = y.float() - x.float()
        if dense_auxk and not encoder_grad:  # sparsify's: the AuxK loss trains W_dec alone
            e_hat = ss.auxk_decode(x, sae.W_enc.detach(), sae.b_enc.detach(), sae.W_dec, dead,
                                   k_aux, b_pre=sae.b_pre.detach(), backend="triton")
        elif dense_auxk:
            e_hat = sae.auxk_decode(x, dead, k_aux, backend="triton")
        else:
            e_hat = sae.decode(*sae.auxk_encode(x, dead, k_aux, backend="triton"),
                               backend="triton")
        (e.square().sum(-1).mean() + (e_hat.float() - e.detach()).square().sum(-1).mean()
         ).backward()

    def edit_step(x_grad=True):
        # x_grad: the activations need a gradient too (trainable layers below the adapter),
        # which adds a gather of the N*k selected encoder rows; without it (one adapter on a
        # frozen model) the step is the encode plus two W_dec gathers (decode and its backward)
        xg = x.clone().requires_grad_(x_grad)
        ss.sae_edit(xg, frozen, ad, backend="triton").float().square().mean().backward()

    fns = {
        "gemm": lambda: x @ W_enc.T,
        "linear+topk": lambda: torch.topk(F.linear(x, W_enc, b_enc), k),
        "embedding_bag": lambda: F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum"),
        "sparsify-style SAE step": sparsify_step,
        "triton encode": lambda: ss.topk_encode(x, W_enc, b_enc, k, backend="triton"),
        "triton encode, kernel library only": lambda: _triton.topk_encode(x, W_enc, b_enc, k,
                                                                          None, None),
        "triton decode": lambda: ss.sparse_decode(vals, idx, W_dec, backend="triton"),
        "triton edit step": edit_step,
        "triton edit step, x frozen": lambda: edit_step(False),
        "triton SAE step": our_sae_step,
        "sparsify-style SAE step + AuxK": sparsify_auxk_step,
        "triton SAE step + AuxK (auxk_decode, W_dec only as sparsify)":
            lambda: our_auxk_step(encoder_grad=False),
        "triton SAE step + AuxK (auxk_decode, encoder too)": our_auxk_step,
        "triton SAE step + AuxK (auxk_encode + sparse_decode, encoder too)":
            lambda: our_auxk_step(False),
    }
    fns.update(real_sparsify_steps(B, x, W_enc, b_enc, W_dec, b_dec, k, dead))
    out = {}
    for n, fn in fns.items():
        try:
            peak = B.peak_extra(fn)
            out[n] = (*B.ms(fn, quantiles=[0.5, 0.2, 0.8]), peak)
        except Exception as e:  # report, keep going
            if B.smoke:
                raise
            out[n] = (float("nan"),) * 4
            print(f"{name} {n}: {type(e).__name__}: {e}")
    gathered = N * k * D * 2  # bytes of the decode's gathered rows (bf16)
    return out, gathered


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="A,B,C,D")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes on CPU (needs TRITON_INTERPRET=1): checks the script runs")
    a = ap.parse_args()
    if a.smoke:  # sparsify's Triton decoder in the interpreter: slow, and needs S % 8 == 0
        os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    B = Bench(a.smoke)
    card = B.card()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    head = (f"{card}; torch {torch.__version__}; triton {triton.__version__}; "
            f"sae_sparse @ {commit}; {datetime.date.today()}")
    lines = [f"# GPU benchmark\n\n{head}\n", "| shape | op | median ms | p20–p80 | × gemm | "
             "peak extra MiB | note |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)  # rows as each shape ends: a time limit keeps them
    for s, N, D, S, k, _ in B.each_shape(a.shapes):
        res, gathered = rows_for(B, s, N, D, S, k)
        g = res["gemm"][0]
        for n, (ms, lo, hi, peak) in res.items():
            note = (f"{gathered / ms / 1e9:.2f} TB/s gathered"
                    if n in ("triton decode", "embedding_bag") else "")
            lines.append(f"| {s} N={N} D={D} S={S} k={k} | {n} | {ms:.3f} | {lo:.3f}–{hi:.3f} | "
                         f"{ms / g:.2f} | {peak:.0f} | {note} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    if a.save and not a.smoke:
        write_result(text, f"gpu-{card.replace(' ', '_')}-{datetime.date.today()}.md")


if __name__ == "__main__":
    main()
