"""An adapter's training step over dictionaries of up to millions of latents on a CPU: step
time and peak memory against S, for this package's sparse step and the dense alternatives.

    python benchmarks/scale_cpu.py --S 65536,262144,1048576,4194304 --save

SmolLM2's width by default (D = 576), N = 512 tokens, k = 32; a frozen SAE with its own
[S, D] W_enc and W_dec (random unit rows; ``--dtype bf16|fp32``), a gain + bias + ffn:16
adapter in fp32 trained with Adam. One step = encode, edit, decode, backward, Adam. Methods,
each S and method in a fresh process (its own peak resident set; a run that is killed or
passes ``--timeout`` is reported as such, and that method is not run at larger S; a method
whose warm-up step is slow is timed over fewer steps, within ``--budget`` seconds):

* ``sparse (cpp)``: ``topk_encode`` + ``edit_decode`` on the ``cpp`` backend;
* ``sparse (torch)``: the same on the ``torch`` backend;
* ``dense adapter``: the same encode, then the adapter on a dense [N, S] code
  (``reference.dense_sae_edit``, what ``--baseline dense`` trains);
* ``SAELens-style``: the dense pre-activations ``x W_encᵀ + b`` [N, S], ``topk`` on them, a
  dense code and the dense edit -- what a training loop written with dense tensors does.

Memory: the peak resident set during the steps (the peak is reset after the weights are
built) minus the process's resident set before the SAE is built, so the weights are in it;
``weights`` is the SAE's own size.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _bench import rss_kib  # noqa: E402
METHODS = ("sparse (cpp)", "sparse (torch)", "dense adapter", "SAELens-style")




def reset_peak():
    """Resets the process's peak resident set (VmHWM) to its current one (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def one(S, method, a):
    """Runs in its own process: -> {"ms": [...], "peak": bytes, "weights": bytes}."""
    import torch
    import torch.nn.functional as F

    import sae_sparse as ss
    from sae_sparse.reference import dense_sae_edit

    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    base = rss_kib("VmRSS")
    def unit_rows():  # a chunk at a time (no fp32 copy of the whole matrix)
        W = torch.empty(S, a.D, dtype=dtype)
        for s in range(0, S, 1 << 16):
            w = torch.randn(min(1 << 16, S - s), a.D)
            W[s:s + w.shape[0]] = (w / w.norm(dim=1, keepdim=True)).to(dtype)
        return W
    W_enc, W_dec = unit_rows(), unit_rows()
    b = torch.zeros(S, dtype=dtype)
    b_dec = torch.zeros(a.D, dtype=dtype)
    x = torch.randn(a.N, a.D).to(dtype)
    ad = ss.LatentAdapter(S, hidden=a.hidden, ffn=a.hidden > 0)
    opt = torch.optim.Adam(ad.parameters(), lr=1e-3)
    backend = "torch" if method == "sparse (torch)" else "cpp"

    def step():
        p = {n: t.to(dtype) for n, t in ad.edit_params().items()}
        if method == "SAELens-style":
            pre = F.linear(x, W_enc, b)
            v, i = pre.topk(a.k, dim=-1)
            v = v.relu()
        else:
            v, i = ss.topk_encode(x, W_enc, b, a.k, backend=backend)
        if method in ("dense adapter", "SAELens-style"):
            y = dense_sae_edit(x, v, i, W_dec, b_dec, activation="relu", mode="delta", **p)
        else:
            y = ss.edit_decode(x, v, i, W_dec, b_dec, activation="relu", mode="delta",
                               backend=backend, **p)
        y.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak()  # the peak of the steps, not of building the weights
    times = []
    for _ in range(a.steps + 1):  # the first is a warm-up
        t0 = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t0))
        if len(times) >= 2 and sum(times) / 1000 > a.budget:
            break
    return {"ms": times[1:], "peak": (rss_kib("VmHWM") - base) * 1024,
            "weights": sum(t.numel() * t.element_size() for t in (W_enc, W_dec, b))}


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--S", default="65536,262144,1048576,4194304")
    ap.add_argument("--D", type=int, default=576)
    ap.add_argument("--N", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=16, help="the adapter's ffn width (0: gain "
                    "+ bias only)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--timeout", type=float, default=900, help="seconds per S and method")
    ap.add_argument("--budget", type=float, default=120,
                    help="seconds of timed steps per S and method (at least one is timed)")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("S", "METHOD"), help=argparse.SUPPRESS)
    return ap.parse_args()


def main():
    a = parse()
    if a.one:
        print("RESULT " + json.dumps(one(int(a.one[0]), a.one[1], a)), flush=True)
        return
    rows, stopped = [], {}
    for S in [int(s) for s in a.S.split(",")]:
        for m in a.methods.split(","):
            prev = [r for r in rows if r["method"] == m and "ms" in r]
            if prev and m not in stopped:  # two steps (warm-up + one) at least: would it fit?
                p = prev[-1]
                guess = statistics.median(p["ms"]) / 1000 * S / p["S"]
                if 2 * guess > a.timeout:
                    stopped[m] = (f"a step would take ~{guess:.0f} s, {S // p['S']}x its "
                                  f"{statistics.median(p['ms']) / 1000:.0f} s at S = {p['S']}")
            if m in stopped:
                rows.append({"S": S, "method": m, "failed": f"not run ({stopped[m]})"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            cmd = [sys.executable, __file__, "--one", str(S), m, "--D", str(a.D), "--N",
                   str(a.N), "--k", str(a.k), "--dtype", a.dtype, "--steps", str(a.steps),
                   "--budget", str(a.budget), "--hidden", str(a.hidden)]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                res = (json.loads(line[0][7:]) if line else
                       {"failed": f"exit {r.returncode}" + (" (killed: out of memory)"
                                                            if r.returncode == -9 else ""),
                        "stderr": r.stderr[-300:]})
            except subprocess.TimeoutExpired:
                res = {"failed": f"over {a.timeout:g} s"}
            res.update(S=S, method=m)
            if "failed" in res:
                stopped[m] = f"{res['failed']} at S = {S}"
            rows.append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "stderr"}), flush=True)
    report(a, rows)


def report(a, rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    gib = 2 ** 30
    lines = ["# An adapter's training step over millions of latents, on a CPU\n",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"{torch.get_num_threads()} threads; torch {torch.__version__}; sae_sparse @ "
             f"{commit}; {datetime.date.today()}. Command: `python benchmarks/scale_cpu.py "
             f"--S {a.S} --dtype {a.dtype} --hidden {a.hidden} --methods '{a.methods}' "
             f"--save`.\n",
             f"D = {a.D}, N = {a.N} tokens, k = {a.k}; a frozen {a.dtype} SAE (W_enc and "
             f"W_dec, [S, D] each), a gain + bias{f' + ffn:{a.hidden}' if a.hidden else ''} "
             "adapter (fp32, Adam). Step: median "
             f"of up to {a.steps} after a warm-up (fewer where they pass {a.budget:g} s; the "
             "count in brackets). Peak: the resident set's peak during the steps over the "
             "process's before the weights were built (so the weights are in it); adapter "
             "state: its parameters, gradients and Adam moments (4 x "
             f"{2 + 2 * a.hidden} floats per latent).\n",
             "| S | weights | adapter state | method | step s | peak | peak / weights |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        w = r.get("weights")
        state = r["S"] * (2 + 2 * a.hidden) * 4 * 4 / gib
        if "failed" in r:
            lines.append(f"| {r['S']} | | {state:.2f} GiB | {r['method']} | {r['failed']} | | |")
            continue
        med = statistics.median(r["ms"]) / 1000
        lines.append(f"| {r['S']} | {w / gib:.2f} GiB | {state:.2f} GiB | {r['method']} | "
                     f"{med:.2f} ({len(r['ms'])}) | {r['peak'] / gib:.2f} GiB | "
                     f"{r['peak'] / w:.2f}× |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.save:
        return
    base = os.path.join(HERE, "results", f"scale-cpu-{datetime.date.today()}"
                        + ("" if a.hidden == 16 else f"-hidden{a.hidden}"))
    with open(base + ".md", "w") as f:
        f.write(text)
    with open(base + ".json", "w") as f:
        json.dump({"args": vars(a), "rows": rows}, f, indent=1)
    fig, (t, m) = plt.subplots(1, 2, figsize=(10, 3.5))
    for meth in dict.fromkeys(r["method"] for r in rows):
        ok = [r for r in rows if r["method"] == meth and "failed" not in r]
        if ok:
            t.plot([r["S"] for r in ok], [statistics.median(r["ms"]) / 1000 for r in ok], "o-",
                   label=meth)
            m.plot([r["S"] for r in ok], [r["peak"] / gib for r in ok], "o-", label=meth)
    ok = [r for r in rows if "weights" in r]
    m.plot(sorted({r["S"] for r in ok}), [next(r["weights"] for r in ok if r["S"] == S) / gib
                                          for S in sorted({r["S"] for r in ok})], "k--",
           label="the weights")
    for ax, yl in ((t, "step s"), (m, "peak GiB")):
        ax.set(xscale="log", yscale="log", xlabel="S (latents)", ylabel=yl)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(base + ".png", dpi=110)


if __name__ == "__main__":
    main()
