"""``sae-sparse merge RUN --out DIR``: a bias-only edit folded into the model's weights.
"""
from __future__ import annotations

import os

from .common import UsageError, _Formatter, _common, _parse_sae_paths, _sae_arg


def add_parser(sub):
    p = sub.add_parser("merge", help="fold a bias-only edit into the model's weights",
                       formatter_class=_Formatter)
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--out", required=True, help="directory for the merged model")
    p.add_argument("--model", default=None, help="base model (default: the run's)")
    _sae_arg(p)
    _common(p)


def run(a):
    from ..models import load_model
    from ..training import load_adapter, merge_bias_edit

    _, conf = load_adapter(a.run_dir)
    base = a.model or conf.get("base_model")
    if not base:
        raise UsageError("the run records no base model: pass --model")
    if os.path.exists(a.out) and os.listdir(a.out):
        raise UsageError(f"--out {a.out} exists and is not empty")
    model, tok = load_model(base)
    merge_bias_edit(model, a.run_dir, sae_paths=_parse_sae_paths(a.sae))
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(f"merged model written to {a.out}")
    return 0
