"""A SAELens TopK training step on the CPU: its own TopKTrainingSAE.training_forward_pass +
backward against the same SAE under compat.patch_saelens (cpp backend), without and with
AuxK (n_dead dead latents, SAELens's k_aux = D // 2), and the step's peak extra memory.

    python benchmarks/bench_saelens.py [--save]
"""
import argparse
import datetime
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _bench import write_result  # noqa: E402
from bench_cpu import cpu_name, git_commit, median_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=1024)
    ap.add_argument("--D", type=int, default=768)
    ap.add_argument("--S", type=int, default=32768)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--n-dead", type=int, default=3000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--save", action="store_true")
    a = ap.parse_args()
    import importlib.metadata as md

    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    import sae_sparse as ss
    from sae_sparse.compat import patch_saelens
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.D, d_sae=a.S, k=a.k))
    x = torch.randn(a.N, a.D)
    dead = torch.zeros(a.S, dtype=torch.bool)
    dead[torch.randperm(a.S, generator=torch.Generator().manual_seed(2))[:a.n_dead]] = True

    def step(mask):
        inp = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=mask,
                             n_training_steps=0, is_logging_step=False)

        def run():
            sae.training_forward_pass(inp).loss.backward()
            sae.zero_grad(set_to_none=True)
        return run

    lines = ["# SAELens TopK training step on the CPU\n",
             f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; torch {torch.__version__}; "
             f"sae-lens {md.version('sae-lens')}; sae_sparse {ss.__version__} @ {git_commit()}; "
             f"{datetime.date.today().isoformat()}\n",
             f"TopKTrainingSAE (rescale_acts_by_decoder_norm, apply_b_dec_to_input), N={a.N} "
             f"D={a.D} S={a.S} k={a.k}, float32, forward + backward to every parameter, "
             f"median of {a.reps}:\n",
             "| step | ms | speed-up |", "|---|---|---|"]
    for aux, mask in (("", None), (f" + AuxK ({a.n_dead} dead, k_aux={a.D // 2})", dead)):
        base = median_ms(step(mask), a.reps)[0]
        with patch_saelens(sae, backend="cpp"):
            ours = median_ms(step(mask), a.reps)[0]
        lines += [f"| SAELens{aux} | {base:.1f} | 1.00× |",
                  f"| patch_saelens (cpp){aux} | {ours:.1f} | {base / ours:.2f}× |"]
    text = "\n".join(lines)
    print(text)
    if a.save:
        write_result(text, f"cpu-{datetime.date.today().isoformat()}-saelens.md")


if __name__ == "__main__":
    main()
