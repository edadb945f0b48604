"""CPU benchmark of the cpp backend against plain PyTorch baselines.

Rows (float32, default N=2048 D=256 S=16384 k=32, h=16):
  encode  : F.linear + torch.topk   vs  sae_sparse.topk_encode(backend="cpp")
  decode  : F.embedding_bag         vs  sae_sparse.sparse_decode(backend="cpp")
  edit    : sae_edit fwd+bwd (frozen SAE, gain+bias+ffn adapter): the dense latent adapter
            (same math on a dense N x S code), the torch backend, and the cpp backend
then the encode across batch sizes, the plain decode across widths, sae_edit at one token per
call (generation) with and without ss.cached_folds(), the AuxK term of an SAE training step
three ways, and (when EleutherAI sparsify is installed) a whole sparsify 1.3.3 training step,
its own SparseCoder.forward + backward against the same coder under compat.patch_sparsify.

Times are medians over --reps runs (after one warm-up), measured in this process, so every
ratio is against its baseline in the same run. "peak extra" is the peak resident memory an op
adds above the inputs, measured in a fresh subprocess per op (Linux /proc: clear_refs + VmHWM).

    python benchmarks/bench_cpu.py            # prints a markdown table
    python benchmarks/bench_cpu.py --save     # also writes benchmarks/results/cpu-<date>.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import sae_sparse as ss
from _bench import sparsify_step, write_result
from sae_sparse.baselines import DenseLatentAdapterEdit

HERE = os.path.dirname(os.path.abspath(__file__))


def make(N, D, S, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    W_enc = torch.randn(S, D, generator=g) / D ** 0.5
    b_enc = 0.1 * torch.randn(S, generator=g)
    W_dec = torch.randn(S, D, generator=g) / D ** 0.5
    return x, W_enc, b_enc, W_dec


def ops(N, D, S, k, h):
    """name -> (setup, fn) pairs; setup builds inputs, fn runs the op once."""
    x, W_enc, b_enc, W_dec = make(N, D, S, k)
    sae = ss.SAE(W_enc, b_enc, W_dec, torch.zeros(D), k).requires_grad_(False)
    ad = ss.LatentAdapter(S, hidden=h)
    with torch.no_grad():
        for p in (ad.gain, ad.bias, ad.W_out):
            p.normal_(0, 0.01)
    vals, idx = ss.topk_encode(x, W_enc, b_enc, k, backend="cpp")

    def edit_step(backend):
        xg = x.clone().requires_grad_(True)
        y = ss.sae_edit(xg, sae, ad, backend=backend)
        y.square().sum().backward()

    dense = DenseLatentAdapterEdit(sae, ad, "delta")

    def dense_step():
        xg = x.clone().requires_grad_(True)
        dense(xg).square().sum().backward()

    return {
        "encode/linear+topk": lambda: torch.topk(F.linear(x, W_enc, b_enc), k),
        "encode/cpp": lambda: ss.topk_encode(x, W_enc, b_enc, k, backend="cpp"),
        "decode/embedding_bag": lambda: F.embedding_bag(idx, W_dec, per_sample_weights=vals,
                                                        mode="sum"),
        "decode/cpp": lambda: ss.sparse_decode(vals, idx, W_dec, backend="cpp"),
        "edit fwd+bwd/dense latents": dense_step,
        "edit fwd+bwd/torch": lambda: edit_step("torch"),
        "edit fwd+bwd/cpp": lambda: edit_step("cpp"),
    }


def median_ms(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts), 1e3 * min(ts), 1e3 * max(ts)


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_extra_mib(name, N, D, S, k, h):
    """Runs one op in a fresh process; returns the peak RSS it adds above its inputs."""
    code = f"""
import gc, sys, json
sys.path.insert(0, {HERE!r})
from bench_cpu import ops, _rss_kib
fns = ops({N}, {D}, {S}, {k}, {h})
fn = fns[{name!r}]
fn(); gc.collect()                       # warm-up: one-off allocations (thread pools, caches)
import ctypes; ctypes.CDLL("libc.so.6").malloc_trim(0)   # hand freed heap pages back to the OS
before = _rss_kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")   # reset the peak RSS counter
fn()
print(json.dumps((_rss_kib("VmHWM") - before) / 1024))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        return float("nan")
    return json.loads(r.stdout.strip().splitlines()[-1])


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                              capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def auxk_rows(reps, N=1024, D=768, S=32768, n_dead=3000, k_aux=384):
    """The AuxK term of a top-k SAE training step (sparsify's k_aux = D // 2), forward +
    backward with its gradient reaching every SAE weight (the encoder's dead rows too, as
    ss.auxk_decode gives it): the dense definition (N x S pre-activations, masked top-k,
    embedding_bag decode, autograd through all of it), auxk_encode + sparse_decode (a sparse
    code of k_aux latents per row) and auxk_decode (dense GEMMs over the dead latents), cpp
    backend. (sparsify 1.3.3 itself drops the pre-activations' gradient, so its AuxK loss
    trains W_dec alone: see sparsify_rows for its real step.)"""
    x, W_enc, b_enc, W_dec = make(N, D, S, 32, seed=1)
    b_dec = torch.zeros(D)
    for t in (W_enc, b_enc, W_dec, b_dec):
        t.requires_grad_(True)
    dead = torch.zeros(S, dtype=torch.bool)
    dead[torch.randperm(S, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    e = torch.randn(N, D)  # stands for the main reconstruction's residual

    def step(e_hat_fn):
        def run():
            (e_hat_fn() - e).pow(2).sum().backward()
            for t in (W_enc, b_enc, W_dec, b_dec):
                t.grad = None
        return run

    def dense():
        pre = F.relu(F.linear(x, W_enc, b_enc))
        acts, idx = torch.where(dead, pre, float("-inf")).topk(k_aux, sorted=False)
        return F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum") + b_dec

    def sparse():
        v, i = ss.auxk_encode(x, W_enc, b_enc, dead, k_aux, backend="cpp")
        return ss.sparse_decode(v, i, W_dec, b_dec, backend="cpp")

    impls = {"dense pre-activations": dense, "auxk_encode + sparse_decode": sparse,
             "auxk_decode": lambda: ss.auxk_decode(x, W_enc, b_enc, W_dec, dead, k_aux,
                                                    b_dec=b_dec, backend="cpp")}
    ms = {name: median_ms(step(fn), reps)[0] for name, fn in impls.items()}
    base = ms["dense pre-activations"]
    out = ["", f"AuxK term of an SAE training step, forward + backward, its gradient reaching "
           f"every SAE weight (the dead encoder rows too; sparsify's own step trains only W_dec "
           f"with it, see below): "
           f"N={N} D={D} S={S}, {n_dead} dead latents, k_aux={k_aux}, float32:", "",
           "| AuxK | ms | speed-up |", "|---|---|---|"]
    return out + [f"| {name} | {t:.1f} | {base / t:.2f}× |" for name, t in ms.items()]


def sparsify_rows(reps, N=1024, D=768, S=32768, k=32, n_dead=3000):
    """A whole training step of EleutherAI sparsify's own SparseCoder (its forward with the
    Trainer's loss fvu + auxk_alpha * auxk_loss, backward), unpatched and under
    compat.patch_sparsify (cpp backend), without and with AuxK (n_dead dead latents,
    sparsify's k_aux = D // 2). fp32 parameters, as sparsify's Trainer makes them; sparsify's
    decoder set to its eager F.embedding_bag path (its Triton decoder needs a GPU)."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError as e:
        return ["", f"sparsify training step: skipped (sparsify not importable: {e})"]
    import importlib.metadata as md
    from sae_sparse.compat import patch_sparsify
    torch.manual_seed(0)
    sae = SparseCoder(D, SparseCoderConfig(num_latents=S, k=k), dtype=torch.float32)
    x = make(N, D, S, k, seed=4)[0]
    dead = torch.zeros(S, dtype=torch.bool)
    dead[torch.randperm(S, generator=torch.Generator().manual_seed(2))[:n_dead]] = True

    out = ["", f"A sparsify {md.version('eai-sparsify')} training step (SparseCoder forward, "
           f"fvu + auxk_loss / 32, backward to every parameter), N={N} D={D} S={S} k={k}, "
           f"float32:", "", "| step | ms | speed-up |", "|---|---|---|"]
    for aux, mask in (("", None), (f" + AuxK ({n_dead} dead, k_aux={D // 2})", dead)):
        base = median_ms(sparsify_step(sae, x, mask), reps)[0]
        with patch_sparsify(sae, backend="cpp"):
            ours = median_ms(sparsify_step(sae, x, mask), reps)[0]
        out += [f"| sparsify{aux} | {base:.1f} | 1.00× |",
                f"| patch_sparsify (cpp){aux} | {ours:.1f} | {base / ours:.2f}× |"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=2048)
    ap.add_argument("--D", type=int, default=256)
    ap.add_argument("--S", type=int, default=16384)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--h", type=int, default=16)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--save", action="store_true", help="write benchmarks/results/cpu-<date>.md")
    ap.add_argument("--out", help="with --save: write here instead")
    a = ap.parse_args()
    if "cpp" not in ss.available_backends():
        sys.exit("the cpp backend is not built: " + ss.backend_status()["cpp"])

    fns = ops(a.N, a.D, a.S, a.k, a.h)
    rows = {}
    for name, fn in fns.items():
        med, lo, hi = median_ms(fn, a.reps)
        mem = float("nan") if a.no_memory else peak_extra_mib(name, a.N, a.D, a.S, a.k, a.h)
        rows[name] = (med, lo, hi, mem)

    env = (f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
           f"sae_sparse {ss.__version__} @ {git_commit()}; "
           f"{datetime.date.today().isoformat()}")
    shape = f"N={a.N} D={a.D} S={a.S} k={a.k} h={a.h}, float32, median of {a.reps}"
    lines = ["# CPU benchmark\n", f"{env}\n", f"{shape}\n",
             "| op | impl | median ms | min–max ms | speed-up vs baseline | peak extra MiB |",
             "|---|---|---|---|---|---|"]
    base = {"encode": "encode/linear+topk", "decode": "decode/embedding_bag",
            "edit fwd+bwd": "edit fwd+bwd/dense latents"}
    for name, (med, lo, hi, mem) in rows.items():
        op, impl = name.split("/")
        ratio = rows[base[op]][0] / med
        lines.append(f"| {op} | {impl} | {med:.1f} | {lo:.1f}–{hi:.1f} | {ratio:.2f}× "
                     f"| {mem:.1f} |")
    # Encode across batch sizes (inference is often a few rows): D=768, S=32768, k=32.
    lines += ["", "Encode across batch sizes, D=768 S=32768 k=32 (fewer than 256 fp32 rows use "
              "exact fp32 tiles; more use the bf16 screen):", "",
              "| N | linear+topk ms | cpp ms | speed-up |", "|---|---|---|---|"]
    for n in (1, 16, 128, 512, 2048):
        x, W_enc, b_enc, _ = make(n, 768, 32768, 32)
        base = median_ms(lambda: torch.topk(F.linear(x, W_enc, b_enc), 32), a.reps)[0]
        ours = median_ms(lambda: ss.topk_encode(x, W_enc, b_enc, 32, backend="cpp"), a.reps)[0]
        lines.append(f"| {n} | {base:.1f} | {ours:.1f} | {base / ours:.2f}× |")
    # Plain decode across widths: F.embedding_bag (fbgemm) against the cpp gather.
    lines += ["", "Plain decode across widths (fp32):", "",
              "| N, D, S, k | embedding_bag ms | cpp ms | speed-up |", "|---|---|---|---|"]
    for n, d, s_, kk in ((2048, 256, 16384, 32), (2048, 768, 32768, 32), (512, 2304, 65536, 64)):
        _, _, _, Wd = make(n, d, s_, kk)
        g = torch.Generator().manual_seed(3)
        ii = torch.randint(0, s_, (n, kk), generator=g)
        vv = torch.rand(n, kk, generator=g)
        base = median_ms(lambda: F.embedding_bag(ii, Wd, per_sample_weights=vv, mode="sum"),
                         a.reps)[0]
        ours = median_ms(lambda: ss.sparse_decode(vv, ii, Wd, backend="cpp"), a.reps)[0]
        lines.append(f"| {n}, {d}, {s_}, {kk} | {base:.1f} | {ours:.1f} | {base / ours:.2f}× |")
    # Generation: one token per call through a trained adapter (no_grad), with and without
    # ss.cached_folds() (M = W_out W_dec and c = bias W_dec folded once instead of per call).
    lines += ["", f"Edit at inference, one token per call (generation), D=768 S=32768 k=32, "
              f"gain+bias+FFN h={a.h}, no_grad, cpp backend:", "",
              "| sae_edit | ms per call | speed-up |", "|---|---|---|"]
    x, W_enc, b_enc, W_dec = make(1, 768, 32768, 32)
    sae = ss.SAE(W_enc, b_enc, W_dec, torch.zeros(768), 32).requires_grad_(False)
    ad = ss.LatentAdapter(32768, hidden=a.h)
    with torch.no_grad():
        for p in (ad.gain, ad.bias, ad.W_out):
            p.normal_(0, 0.01)
        plain = median_ms(lambda: ss.sae_edit(x, sae, ad, backend="cpp"), a.reps)[0]
        with ss.cached_folds():
            cached = median_ms(lambda: ss.sae_edit(x, sae, ad, backend="cpp"), a.reps)[0]
    lines += [f"| every call folds | {plain:.1f} | 1.00× |",
              f"| inside `ss.cached_folds()` | {cached:.1f} | {plain / cached:.2f}× |"]
    lines += auxk_rows(a.reps)
    lines += sparsify_rows(a.reps)
    text = "\n".join(lines)
    print(text)
    if a.save:
        write_result(text, f"cpu-{datetime.date.today().isoformat()}.md", a.out)


if __name__ == "__main__":
    main()
