"""Quality and cost of the sparse latent adapter vs its baselines on one task (the demo's).

Trains, under the same trainer, data and steps: the sparse SAE adapter (this package's op), the
dense latent adapter (same math, dense N x S latent code) and a rank-r residual LoRA; prints eval
loss (unedited / edited), trainable parameters and median step time.

    python benchmarks/compare_baselines.py [--steps 600] [--out /tmp/compare]
"""
import argparse
import json
import os
import time

import torch

from sae_sparse.demo import load_assets, make_data
from sae_sparse.training import TrainConfig, train_adapter


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default="compare_baselines_run")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    data = os.path.join(a.out, "data.jsonl")
    planted = make_data(data, seed=a.seed)
    rows = []
    for name, kw in (("sparse adapter (gain,bias,ffn:16)", dict(edit="gain,bias,ffn:16")),
                     ("dense latent adapter (same math)", dict(edit="gain,bias,ffn:16",
                                                                baseline="dense")),
                     ("residual LoRA r=8", dict(baseline="lora:8", l1=0.0, lr=3e-3))):
        model, tok, sae, _ = load_assets()
        cfg = TrainConfig(**{**dict(steps=a.steps, batch_size=16, lr=0.05, l1=3e-3,
                                    eval_every=a.steps, checkpoint_every=10**9, seed=a.seed),
                             **kw})
        run = os.path.join(a.out, name.split()[0] + "_" + name.split()[1])
        t0 = time.perf_counter()
        m = train_adapter(model, tok, {planted["hook"]: sae}, data, run, cfg, progress=False,
                          resume=False)
        dt = time.perf_counter() - t0
        from sae_sparse.training import load_adapter

        (ad,) = load_adapter(run)[0].values()
        n_params = sum(p.numel() for p in ad.parameters())
        rows.append((name, m["base_eval_loss"], m["final_eval_loss"], n_params, 1e3 * dt / a.steps))
    print(f"demo task, {a.steps} steps, CPU threads={torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    print("| method | eval loss unedited | eval loss edited | trainable params "
          "| ms/step (incl. eval) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.4f} | {r[2]:.4f} | {r[3]} | {r[4]:.1f} |")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
