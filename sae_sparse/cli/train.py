"""``sae-sparse train``: an adapter trained on a frozen causal LM; its checks run before the
model loads and before the run directory is made.
"""
from __future__ import annotations

import os
import warnings

from .. import argtypes
from . import demo
from .common import (UsageError, _common, _device, _Formatter, _model_source, config_flags,
                     config_values)


def add_parser(sub):
    from ..training.config import TrainConfig


    p = sub.add_parser("train", help="train a sparse latent adapter (no arguments: the demo)",
                       formatter_class=_Formatter,
                       description="Train an adapter in SAE latent space on a frozen causal LM. "
                       "With no arguments, runs the offline demo. Rerunning the same command "
                       "resumes from the run directory's checkpoint.")
    p.add_argument("--model", help="the causal LM: a save_pretrained directory, a .gguf file, "
                   "or a Hugging Face hub id")
    p.add_argument("--sae", action="append", default=[],
                   help="SAE path (SAELens/sparsify dir, Gemma Scope .npz, dictionary_learning "
                        "ae.pt, OpenAI .pt); repeatable, one per hook")
    p.add_argument("--hook", action="append", default=[],
                   help="where the SAE reads and edits: a module path (model.layers.6, "
                        "transformer.h.6) or a TransformerLens name (blocks.6.hook_resid_post); "
                        "repeatable, one per --sae; optional when the SAE's config names its "
                        "hook")
    p.add_argument("--data", help="JSONL of {'text'} or {'prompt','completion'} records")
    p.add_argument("--out", default="sae_sparse_run", help="run directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run of other data/model/SAEs/settings in --out")
    p.add_argument("--no-resume", action="store_true",
                   help="start from step 0 even if --out holds a checkpoint of this run")
    p.add_argument("--k", type=argtypes.positive, default=None,
                   help="active latents kept per token for ReLU/JumpReLU SAEs (the cap k_max; "
                        "tokens above it are counted and reported). TopK SAEs use their own k")
    p.add_argument("--latents", default=None,
                   help="restrict the edit to these latent ids: '3,17,42' or @file (ids "
                        "separated by commas/whitespace)")
    config_flags(p, TrainConfig)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if "
                   "available)")
    p.add_argument("--no-report", action="store_true", help="skip report.md")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (evaluations are still printed)")
    _common(p)
    return p


def _parse_latents(spec):
    if spec.startswith("@"):
        if not os.path.isfile(spec[1:]):
            raise UsageError(f"--latents: no file {spec[1:]!r}")
        with open(spec[1:]) as f:
            text = f.read()
    else:
        text = spec
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--latents must list integer latent ids, got {spec!r}") from None
    if not ids or min(ids) < 0:
        raise UsageError(f"--latents must list non-negative latent ids, got {spec!r}")
    return ids


def _precheck_train(a):
    """Everything that can be checked before the model's weights load and before the run
    directory is created. -> (records, config, {hook: SAE on the CPU}, sources, meta model)."""
    from ..hookpoints import hook_width, meta_model, resolve_hook
    from ..io import content_hash, load_sae, resolve_sae_path
    from ..models import load_config
    from ..training import TrainConfig, check_run_dir, load_jsonl, run_fingerprint

    missing = [f"--{n}" for n in ("model", "data", "sae") if not getattr(a, n)]
    if missing:
        raise UsageError(f"train needs {', '.join(missing)} (or no arguments for the demo)")
    if a.hook and len(a.hook) != len(a.sae):
        raise UsageError(f"give one --hook per --sae (got {len(a.sae)} --sae, {len(a.hook)} "
                         "--hook), or no --hook to use the hooks the SAEs' configs name")
    if len(set(a.sae)) != len(a.sae):
        raise UsageError("the same --sae is given twice")
    latents = _parse_latents(a.latents) if a.latents else None
    cfg = TrainConfig(**config_values(a, TrainConfig), latents=latents)
    cfg.validate()
    _device(a.device)  # --device cuda on a machine without CUDA fails here
    if a.backend:
        from ..backends import available_backends

        if a.backend not in available_backends():
            raise UsageError(f"--backend {a.backend} is not available here (available: "
                             f"{', '.join(available_backends())})")
    records = load_jsonl(a.data)
    if a.loss == "kl":
        lacking = [n for n, r in enumerate(records, 1) if "teacher_prompt" not in r]
        if lacking:
            raise UsageError(f"--loss kl: {len(lacking)} of {len(records)} records in {a.data} "
                             f"have no 'teacher_prompt' (the first: record {lacking[0]}); the "
                             "teacher is the model with the edits off reading it")
    local = {}
    for path in a.sae:  # before the model: a missing SAE should not wait for a model load
        try:
            local[path] = resolve_sae_path(path)  # a hub folder is fetched (or found cached)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--sae: {e}") from None
    try:
        config = load_config(a.model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {a.model}: {str(e).splitlines()[0]}") from e
    meta = meta_model(config)
    saes, sources = {}, {}
    for n, path in enumerate(a.sae):
        sae = load_sae(local[path], k=a.k)
        info = {k: v for k, v in sae.format_info.items() if k != "cfg"}
        own = info.get("hook_name")
        if not a.hook and not own:
            raise UsageError(f"--sae {path}: its config names no hook; pass --hook (e.g. "
                             "model.layers.6 or blocks.6.hook_resid_post)")
        hook = a.hook[n] if a.hook else own
        try:
            module = resolve_hook(meta, hook)
        except ValueError as e:
            raise UsageError(f"--hook {hook}: {e}" if a.hook else
                             f"the SAE at {path} names its hook {hook!r}, which does not fit "
                             f"this model ({e}); pass --hook") from None
        if a.hook and own:
            try:
                same = resolve_hook(meta, own) == module
            except ValueError:
                same = False
            if not same:
                warnings.warn(f"--hook {hook} differs from the hook {own!r} that the SAE at "
                              f"{path} was trained on")
        if module in saes:
            raise UsageError(f"two SAEs edit the same module {module}")
        try:
            width = hook_width(meta, module)
        except Exception as e:  # a model whose forward does not run on the meta device
            warnings.warn(f"could not find {module}'s output width before loading the model "
                          f"({type(e).__name__}); it is checked at the first forward instead")
            width = sae.d_in
        if width != sae.d_in:
            raise UsageError(f"the SAE at {path} reads vectors of width {sae.d_in}, but the "
                             f"hook {hook} ({module}) outputs width {width}")
        if latents is not None and max(latents) >= sae.d_sae:
            raise UsageError(f"--latents {max(latents)} is out of range for the SAE at {path} "
                             f"(d_sae = {sae.d_sae})")
        saes[module] = sae
        sources[module] = {**info, "sha256": content_hash(local[path])}
    fingerprint = run_fingerprint(meta, saes, a.data, sae_sources=sources,
                                  model_source=_model_source(a.model))
    check_run_dir(a.out, cfg, fingerprint, resume=not a.no_resume, overwrite=a.overwrite)
    return records, cfg, saes, sources


def _init_distributed(device_spec):
    """Under torchrun (WORLD_SIZE > 1): joins the process group (NCCL on CUDA, else gloo) and
    puts each rank on its own GPU. -> (rank, device)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return 0, _device(device_spec)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device_spec)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dev


def run(a):
    if not (a.model or a.sae or a.hook or a.data):  # no arguments: the demo
        if a.out == "sae_sparse_run":
            a.out = "sae_sparse_demo_run"
        return demo.run(a)
    records, cfg, saes, sources = _precheck_train(a)
    import torch.distributed as dist

    joined = not (dist.is_available() and dist.is_initialized())
    rank, device = _init_distributed(a.device)
    joined = joined and dist.is_available() and dist.is_initialized()
    try:
        return _train_and_report(a, records, cfg, saes, sources, rank, device)
    finally:
        if joined:
            # leave the group we joined before the interpreter exits: a gloo group still
            # alive at exit tears its threads down unjoined, and the process aborts
            # ("terminate called without an active exception") after a successful run
            dist.destroy_process_group()


def _train_and_report(a, records, cfg, saes, sources, rank, device):
    from ..models import load_model
    from ..report import write_report
    from ..training import train_adapter

    model, tok = load_model(a.model, device=device)
    saes = {h: s.to(device) for h, s in saes.items()}
    m = train_adapter(model, tok, saes, a.data, a.out, cfg,
                      sae_sources=sources, model_source=_model_source(a.model),
                      progress=not a.no_progress, resume=not a.no_resume,
                      overwrite=a.overwrite)
    if rank != 0:
        return 0
    base, final = m["base_eval_loss"], m["final_eval_loss"]
    print((f"eval loss {base:.4f} (unedited) -> {final:.4f} (edited)" if final is not None
           else "no eval split") + f"; adapter saved in {a.out}")
    if not a.no_report:
        write_report(a.out, model=model, tokenizer=tok, saes=saes)
        print(f"report: {os.path.join(a.out, 'report.md')}")
    return 0
