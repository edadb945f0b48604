"""``sae-sparse train-sae``: a TopK SAE trained on a model's activations at one hook.
"""
from __future__ import annotations

from ..train_sae import SAETrainConfig
from ..argtypes import positive
from .common import (UsageError, _common, _Formatter, _model_source, check_out_path,
                     config_flags, config_values, process_group)


def add_parser(sub):
    p = sub.add_parser("train-sae", formatter_class=_Formatter,
                       help="train a TopK SAE on a model's activations at a hook (this "
                            "package's fused op, AuxK, unit-norm decoder); SAELens format",
                       description="Train a TopK SAE on a model's activations at one hook "
                       "and save it in SAELens format with the hook recorded. Rerunning "
                       "resumes from --out's checkpoint.")
    p.add_argument("--model", required=True, help="a save_pretrained directory, a .gguf "
                   "file or a hub id")
    p.add_argument("--hook", required=True, help="module path or TransformerLens name, e.g. "
                   "model.layers.15 or blocks.15.hook_resid_post")
    p.add_argument("--data", default=None,
                   help="JSONL of {'text'} or {'prompt','completion'} records (the SAE reads "
                        "the whole text: prompt + completion)")
    p.add_argument("--python-docs", action="store_true",
                   help="add Python's own reference docs (pydoc_data) as text")
    p.add_argument("--out", required=True, help="directory for the SAE")
    config_flags(p, SAETrainConfig)
    p.add_argument("--shard-latents", type=positive, default=1, metavar="L",
                   help="under torchrun with P processes: split the dictionary over L ranks "
                        "(P / L data-parallel replicas of it); the SAE is the one-process "
                        "run's to fp32 rounding, the SAELens file written from the shards")
    p.add_argument("--device", default=None, help="cpu, cuda, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)


def run(a):
    from ..hookpoints import meta_model, resolve_hook
    from ..models import load_config, load_model
    from ..training import load_jsonl
    from ..train_sae import train_sae

    if not a.data and not a.python_docs:
        raise UsageError("train-sae needs --data JSONL or --python-docs")
    cfg = SAETrainConfig(**config_values(a, SAETrainConfig))
    cfg.validate()
    records = load_jsonl(a.data) if a.data else []
    if a.python_docs:
        from ..corpora import python_docs

        records += python_docs()
    try:
        config = load_config(a.model)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {a.model}: {str(e).splitlines()[0]}") from e
    try:
        resolve_hook(meta_model(config), a.hook)
    except ValueError as e:
        raise UsageError(f"--hook {a.hook}: {e}") from None
    check_out_path(a.out, "--out")
    with process_group(a.device) as (_, device):
        model, tok = load_model(a.model, device=device)
        train_sae(model, tok, a.hook, records, a.out, cfg, progress=not a.no_progress,
                  model_name=_model_source(a.model), shard_latents=a.shard_latents)
    return 0
