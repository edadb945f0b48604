"""Command line: ``sae-sparse train | report | merge | demo | sparsify``.

``sae-sparse train`` with no arguments runs the offline demo (tiny model + SAE shipped in the
package, a planted edit, training and the report).
"""
from __future__ import annotations

import argparse
import os
import sys


def _train_parser(sub):
    p = sub.add_parser("train", help="train a sparse latent adapter (no arguments: the demo)",
                       description="Train an adapter in SAE latent space on a frozen causal LM. "
                       "With no arguments, runs the offline demo.")
    p.add_argument("--model", help="a locally saved Hugging Face causal LM directory")
    p.add_argument("--sae", action="append", default=[],
                   help="SAE path (SAELens/sparsify dir, Gemma Scope .npz, dictionary_learning "
                        "ae.pt, OpenAI .pt); repeat once per --hook")
    p.add_argument("--hook", action="append", default=[],
                   help="module whose output the SAE reads and edits, e.g. model.layers.6 or "
                        "transformer.h.6; repeatable")
    p.add_argument("--data", help="JSONL of {'text'} or {'prompt','completion'} records")
    p.add_argument("--out", default=None, help="run directory (default: sae_sparse_run)")
    p.add_argument("--k", type=int, default=None, help="cap k_max for ReLU/JumpReLU SAEs")
    p.add_argument("--edit", default="gain,bias,ffn:16",
                   help="adapter kinds: gain, bias, ffn:H[:relu|gelu|identity], lowrank:R")
    p.add_argument("--latents", default=None,
                   help="restrict the edit to these latent ids: '3,17,42' or @file (ids "
                        "separated by commas/whitespace)")
    p.add_argument("--mode", default="delta", choices=["delta", "replace"])
    p.add_argument("--baseline", default=None, help="train a baseline instead: lora:R or dense")
    p.add_argument("--edit-positions", default="all", choices=["all", "prompt", "completion"])
    p.add_argument("--l1", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--eval-frac", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10,
                   help="read the training loss back from the device every N steps "
                        "(a non-finite loss stops the run then)")
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default=None, choices=["torch", "cpp"])
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on CUDA only)")
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def cmd_train(a, parser):
    if not (a.model or a.sae or a.hook or a.data):
        from .demo import run_demo

        rep = run_demo(a.out or "sae_sparse_demo_run", seed=a.seed, progress=not a.no_progress)
        ok = all(h["planted"]["recovered"] for h in rep["hooks"].values())
        return 0 if ok else 1
    missing = [n for n in ("model", "data") if not getattr(a, n)]
    if missing or not a.sae or not a.hook:
        parser.error("train needs --model, --sae, --hook and --data (or no arguments for the "
                     "demo)")
    if len(a.sae) != len(a.hook):
        parser.error(f"give one --sae per --hook (got {len(a.sae)} --sae, {len(a.hook)} --hook)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .io import content_hash, load_sae
    from .report import write_report
    from .train import TrainConfig, train_adapter

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = AutoModelForCausalLM.from_pretrained(a.model).to(device).eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    saes, sources = {}, {}
    for hook, path in zip(a.hook, a.sae):
        sae = load_sae(path, k=a.k, device=device)
        saes[hook] = sae
        info = {k: v for k, v in sae.format_info.items() if k != "cfg"}
        sources[hook] = {**info, "sha256": content_hash(path)}
    latents = None
    if a.latents:
        text = open(a.latents[1:]).read() if a.latents.startswith("@") else a.latents
        try:
            latents = [int(t) for t in text.replace(",", " ").split()]
        except ValueError:
            parser.error(f"--latents must list integer latent ids, got {a.latents!r}")
    cfg = TrainConfig(edit=a.edit, mode=a.mode, baseline=a.baseline, latents=latents,
                      edit_positions=a.edit_positions, l1=a.l1, lr=a.lr,
                      weight_decay=a.weight_decay, steps=a.steps, batch_size=a.batch_size,
                      grad_accum=a.grad_accum, max_len=a.max_len, eval_frac=a.eval_frac,
                      eval_every=a.eval_every, log_every=a.log_every,
                      checkpoint_every=a.checkpoint_every, seed=a.seed,
                      backend=a.backend, bf16=a.bf16)
    out = a.out or "sae_sparse_run"
    m = train_adapter(model, tok, saes, a.data, out, cfg, sae_sources=sources,
                      model_source=os.path.abspath(a.model), progress=not a.no_progress)
    print(f"eval loss {m['base_eval_loss']:.4f} (unedited) -> {m['final_eval_loss']} (edited); "
          f"adapter saved in {out}")
    if not a.no_report:
        write_report(out, model=model, tokenizer=tok, saes=saes)
        print(f"report: {os.path.join(out, 'report.md')}")
    return 0


def cmd_report(a):
    from .report import write_report

    planted = None
    if a.planted:
        hook, _, ids = a.planted.partition(":")
        planted = {hook: [int(i) for i in ids.split(",") if i]}
    rep = write_report(a.run_dir, planted=planted, top=a.top)
    print(f"report: {os.path.join(a.run_dir, 'report.md')}")
    if planted:
        return 0 if all(h["planted"]["recovered"] for h in rep["hooks"].values()) else 1
    return 0


def cmd_merge(a):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .train import load_adapter, merge_bias_edit

    _, conf = load_adapter(a.run_dir)
    base = a.model or conf.get("base_model")
    if not base:
        raise SystemExit("the run records no base model: pass --model")
    model = AutoModelForCausalLM.from_pretrained(base)
    merge_bias_edit(model, a.run_dir)
    model.save_pretrained(a.out)
    AutoTokenizer.from_pretrained(base).save_pretrained(a.out)
    print(f"merged model written to {a.out}")
    return 0


def cmd_sparsify(args):
    """Runs sparsify's own command line (``sparsify.__main__.run``, which parses sys.argv)
    under compat.patch_sparsify, so ``sae-sparse sparsify MODEL DATASET --k 32 ...`` is
    ``python -m sparsify MODEL DATASET --k 32 ...`` on this package's kernels; torchrun
    works as with sparsify: ``torchrun --nproc_per_node 8 -m sae_sparse.cli sparsify ...``."""
    try:
        from sparsify.__main__ import run
    except ImportError as e:
        raise SystemExit(f"sae-sparse sparsify needs EleutherAI sparsify (pip install "
                         f"eai-sparsify): {e}")
    from .compat import patch_sparsify

    saved = sys.argv
    sys.argv = ["sparsify", *args]
    try:
        with patch_sparsify():
            run()
    finally:
        sys.argv = saved
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(prog="sae-sparse", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tp = _train_parser(sub)
    rp = sub.add_parser("report", help="write report.md + plots for a run directory")
    rp.add_argument("run_dir")
    rp.add_argument("--planted", default=None, help="HOOK:i,j,k planted latents to check")
    rp.add_argument("--top", type=int, default=20)
    mp = sub.add_parser("merge", help="fold a bias-only edit into the model's weights")
    mp.add_argument("run_dir")
    mp.add_argument("--out", required=True)
    mp.add_argument("--model", default=None, help="base model (default: the run's)")
    dp = sub.add_parser("demo", help="the offline demo (same as `train` with no arguments)")
    dp.add_argument("--out", default="sae_sparse_demo_run")
    dp.add_argument("--seed", type=int, default=0)
    sub.add_parser("sparsify", add_help=False,
                   help="EleutherAI sparsify's trainer (`python -m sparsify ARGS`) with every "
                        "SparseCoder on this package's ops (compat.patch_sparsify); the "
                        "backend from $SAE_SPARSE_BACKEND")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sparsify"]:  # everything after it is sparsify's, --help included
        return cmd_sparsify(argv[1:])
    a = ap.parse_args(argv)
    if a.cmd == "train":
        return cmd_train(a, tp)
    if a.cmd == "report":
        return cmd_report(a)
    if a.cmd == "merge":
        return cmd_merge(a)
    from .demo import run_demo

    rep = run_demo(a.out, seed=a.seed)
    return 0 if all(h["planted"]["recovered"] for h in rep["hooks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
