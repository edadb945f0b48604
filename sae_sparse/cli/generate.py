"""``sae-sparse generate RUN``: base and edited generations side by side.
"""
from __future__ import annotations

import os

from .. import argtypes
from .common import UsageError, _common, _device, _Formatter, _parse_sae_paths, _sae_arg


def add_parser(sub):
    p = sub.add_parser("generate", help="base and edited generations side by side",
                       formatter_class=_Formatter)
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    p.add_argument("--prompts", default=None,
                   help="a file of questions, one per line, or a JSONL of training records "
                        "(e.g. make-data's heldout.jsonl), whose prompts are used as trained")
    p.add_argument("--strength", type=argtypes.finite_float, action="append", default=None,
                   help="scale of the edit (1 = as trained, 0 = none); repeatable "
                        "[default: 1]")
    p.add_argument("--max-new-tokens", type=argtypes.positive, default=40,
                   help="tokens generated per prompt")
    p.add_argument("--chat", default="auto", choices=["auto", "on", "off"],
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--temperature", type=argtypes.nonneg_float, default=0.0,
                   help="0 = greedy decoding")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling")
    p.add_argument("--model", default=None, help="base model (default: the run's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ...")
    _sae_arg(p)
    _common(p)


def run(a):
    a.strength = a.strength or [1.0]
    from ..generate import format_side_by_side, side_by_side
    from ..models import load_model
    from ..training import attach_run, load_adapter

    prompts = list(a.prompt)
    if a.prompts:
        if not os.path.isfile(a.prompts):
            raise UsageError(f"--prompts: no file {a.prompts!r}")
        if a.prompts.endswith(".jsonl"):  # training records: their prompts as trained
            from ..training import load_jsonl

            prompts += [r for r in load_jsonl(a.prompts) if "prompt" in r]
        else:
            with open(a.prompts, encoding="utf-8") as f:
                prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise UsageError("generate needs --prompt TEXT (repeatable) or --prompts FILE")
    _, conf = load_adapter(a.run_dir)
    base = a.model or conf.get("base_model")
    if not base:
        raise UsageError("the run records no base model: pass --model")
    device = _device(a.device)
    model, tok = load_model(base, device=device)
    edits = attach_run(model, a.run_dir, sae_paths=_parse_sae_paths(a.sae))
    try:
        rows = side_by_side(model, tok, edits, prompts, strengths=a.strength,
                            max_new_tokens=a.max_new_tokens,
                            chat={"auto": None, "on": True, "off": False}[a.chat],
                            temperature=a.temperature, seed=a.seed,
                            edit_positions=conf.get("edit_positions", "all"))
    finally:
        edits.remove()
    print(format_side_by_side(rows))
    return 0
