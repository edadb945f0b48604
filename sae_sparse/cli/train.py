"""``sae-sparse train``: an adapter trained on a frozen causal LM; its checks run before the
model loads and before the run directory is made.
"""
from __future__ import annotations

import os
import warnings

from .. import argtypes
from . import demo
from ..training.data import check_teacher_prompts
from .common import (UsageError, _common, _device, _Formatter, _model_source, check_out_path,
                     process_group,
                     config_flags, config_values)


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
    p.add_argument("--max-latents", type=argtypes.positive, default=None, metavar="N",
                   help="an edit of at most N latents per hook: train the full edit in "
                        "OUT/full, rank its latents (--rank-by), train again restricted "
                        "to the top N (OUT/latents.json)")
    p.add_argument("--rank-by", choices=("attribution", "readout"), default="attribution",
                   help="--max-latents' ranking: attribution = the loss reduction each latent "
                        "carries (integrated gradients; 4 forward-backward passes over 64 "
                        "training records); readout = how far the edit moves it (|mean Δ SAE "
                        "code|; forward passes only)")
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
    directory is created, each mistake its own check. -> (records, config, {hook: SAE on the
    CPU}, sources)."""
    from ..hookpoints import meta_model
    from ..models import load_config
    from ..training import check_run_dir, load_jsonl, run_fingerprint

    _check_required(a)
    check_out_path(a.out, "--out")
    if a.max_latents and (a.latents or a.baseline):
        raise UsageError("--max-latents chooses the latents itself: not with --latents or "
                         "--baseline")
    latents = _parse_latents(a.latents) if a.latents else None
    cfg = _check_config(a, latents)
    records = load_jsonl(a.data)
    if cfg.loss == "kl":
        try:
            check_teacher_prompts(records, a.data)
        except ValueError as e:
            raise UsageError(f"--loss kl: {e}") from None
    local = _fetch_saes(a.sae)  # before the model: a missing SAE should not wait for a load
    try:
        config = load_config(a.model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {a.model}: {str(e).splitlines()[0]}") from e
    meta = meta_model(config)
    saes, sources = {}, {}
    for n, path in enumerate(a.sae):
        hook = a.hook[n] if a.hook else None
        module, sae, info = _place_sae(meta, path, local[path], hook, a.k)
        if module in saes:
            raise UsageError(f"two SAEs edit the same module {module}")
        if latents is not None and max(latents) >= sae.d_sae:
            raise UsageError(f"--latents {max(latents)} is out of range for the SAE at {path} "
                             f"(d_sae = {sae.d_sae})")
        saes[module], sources[module] = sae, info
    fingerprint = run_fingerprint(meta, saes, a.data, sae_sources=sources,
                                  model_source=_model_source(a.model))
    check_run_dir(a.out, cfg, fingerprint, resume=not a.no_resume, overwrite=a.overwrite)
    return records, cfg, saes, sources


def _check_required(a):
    missing = [f"--{n}" for n in ("model", "data", "sae") if not getattr(a, n)]
    if missing:
        raise UsageError(f"train needs {', '.join(missing)} (or no arguments for the demo)")
    if a.hook and len(a.hook) != len(a.sae):
        raise UsageError(f"give one --hook per --sae (got {len(a.sae)} --sae, {len(a.hook)} "
                         "--hook), or no --hook to use the hooks the SAEs' configs name")
    if len(set(a.sae)) != len(a.sae):
        raise UsageError("the same --sae is given twice")


def _check_config(a, latents):
    """The TrainConfig of the flags, validated; the device and backend exist here."""
    from ..training import TrainConfig

    cfg = TrainConfig(**config_values(a, TrainConfig), latents=latents)
    cfg.validate()
    _device(a.device)  # --device cuda on a machine without CUDA fails here
    if a.backend:
        from ..backends import available_backends

        if a.backend not in available_backends():
            raise UsageError(f"--backend {a.backend} is not available here (available: "
                             f"{', '.join(available_backends())})")
    return cfg


def _fetch_saes(paths) -> dict:
    """``{--sae: local path}``; a hub folder is fetched (or found cached)."""
    from ..io import resolve_sae_path

    local = {}
    for path in paths:
        try:
            local[path] = resolve_sae_path(path)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f"--sae: {e}") from None
    return local


def _place_sae(meta, path, local, hook, k):
    """Loads the SAE at ``path`` and finds the module it edits on the meta model (``hook``,
    or the one its config names), checking the module's output width against the SAE's.
    -> (module path, SAE, its source record)."""
    from ..hookpoints import hook_width, resolve_hook
    from ..io import content_hash, load_sae

    sae = load_sae(local, k=k)
    info = {key: v for key, v in sae.format_info.items() if key != "cfg"}
    own = info.get("hook_name")
    if not hook and not own:
        raise UsageError(f"--sae {path}: its config names no hook; pass --hook (e.g. "
                         "model.layers.6 or blocks.6.hook_resid_post)")
    try:
        module = resolve_hook(meta, hook or own)
    except ValueError as e:
        raise UsageError(f"--hook {hook}: {e}" if hook else
                         f"the SAE at {path} names its hook {own!r}, which does not fit this "
                         f"model ({e}); pass --hook") from None
    if hook and own:
        try:
            same = resolve_hook(meta, own) == module
        except ValueError:
            same = False
        if not same:
            warnings.warn(f"--hook {hook} differs from the hook {own!r} that the SAE at "
                          f"{path} was trained on")
    try:
        width = hook_width(meta, module)
    except Exception as e:  # a model whose forward does not run on the meta device
        warnings.warn(f"could not find {module}'s output width before loading the model "
                      f"({type(e).__name__}); it is checked at the first forward instead")
        width = sae.d_in
    if width != sae.d_in:
        raise UsageError(f"the SAE at {path} reads vectors of width {sae.d_in}, but the "
                         f"hook {hook or own} ({module}) outputs width {width}")
    return module, sae, {**info, "sha256": content_hash(local)}


def run(a):
    if not (a.model or a.sae or a.hook or a.data):  # no arguments: the demo
        if a.out == "sae_sparse_run":
            a.out = "sae_sparse_demo_run"
        return demo.run(a)
    records, cfg, saes, sources = _precheck_train(a)
    with process_group(a.device) as (rank, device):
        return _train_and_report(a, records, cfg, saes, sources, rank, device)


def _train_and_report(a, records, cfg, saes, sources, rank, device):
    from ..models import load_model
    from ..report import write_report
    from ..training import train_adapter
    from ..training.few_latents import train_few_latents

    model, tok = load_model(a.model, device=device)
    saes = {h: s.to(device) for h, s in saes.items()}
    kw = dict(sae_sources=sources, model_source=_model_source(a.model),
              progress=not a.no_progress, resume=not a.no_resume, overwrite=a.overwrite)
    if a.max_latents:
        m = train_few_latents(model, tok, saes, a.data, a.out, cfg, a.max_latents,
                              by=a.rank_by, **kw)
        if rank == 0:
            full = m["full"]["final_eval_loss"]
            print(f"the full edit ({os.path.join(a.out, 'full')}): eval loss "
                  + (f"{full:.4f}" if full is not None else "n/a") + "; restricted to "
                  + ", ".join(f"{len(v)} latents at {h}" for h, v in m["latents"].items()))
    else:
        m = train_adapter(model, tok, saes, a.data, a.out, cfg, **kw)
    if rank != 0:
        return 0
    base, final = m["base_eval_loss"], m["final_eval_loss"]
    print((f"eval loss {base:.4f} (unedited) -> {final:.4f} (edited)" if final is not None
           else "no eval split") + f"; adapter saved in {a.out}")
    if not a.no_report:
        write_report(a.out, model=model, tokenizer=tok, saes=saes)
        print(f"report: {os.path.join(a.out, 'report.md')}")
    return 0
