"""``sae-sparse report RUN``: report.md, report.json and plots for a finished run.
"""
from __future__ import annotations

import os

from .. import argtypes
from .common import UsageError, _common, _Formatter, _parse_sae_paths, _sae_arg


def add_parser(sub):
    p = sub.add_parser("report", help="write report.md + plots for a run directory",
                       formatter_class=_Formatter)
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--planted", default=None, help="HOOK:i,j,k planted latents to check")
    p.add_argument("--top", type=argtypes.positive, default=20, help="latents per ranking")
    p.add_argument("--model", default=None,
                   help="base model for the Δz statistics, lift and contexts (default: the "
                        "run's recorded one); a directory, hub id or .gguf file")
    p.add_argument("--lift", nargs=2, metavar=("A.jsonl", "B.jsonl"), default=None,
                   help="activation lift of the top latents: their mean activation on A's "
                        "completions (e.g. the teacher's) over B's (e.g. the base model's); "
                        "default: the run's completions over the base model's own answers "
                        "to the same prompts (generated once into RUN/student_answers.jsonl)")
    p.add_argument("--contexts", metavar="C.jsonl", default=None,
                   help="records in which to find the top latents' top-activating contexts "
                        "(default: the run's training text)")
    p.add_argument("--answer-tokens", type=argtypes.positive, default=64,
                   help="token budget of the base model's answers for the default lift")
    _sae_arg(p)
    _common(p)


def run(a):
    from ..report import write_report

    planted = None
    if a.planted:
        hook, _, ids = a.planted.partition(":")
        try:
            planted = {hook: [int(i) for i in ids.split(",") if i]}
        except ValueError:
            raise UsageError(f"--planted must be HOOK:i,j,k, got {a.planted!r}") from None
    from ..training import load_jsonl

    lift = None
    if a.lift:
        lift = (load_jsonl(a.lift[0]), load_jsonl(a.lift[1]))
    ctx = load_jsonl(a.contexts) if a.contexts else None
    model = tok = None
    if a.model:
        from ..models import load_model

        try:
            model, tok = load_model(a.model)
        except (OSError, ValueError) as e:
            raise UsageError(f"--model {a.model}: {str(e).splitlines()[0]}") from e
    rep = write_report(a.run_dir, model=model, tokenizer=tok, planted=planted, top=a.top,
                       sae_paths=_parse_sae_paths(a.sae), lift_records=lift,
                       context_records=ctx, answer_tokens=a.answer_tokens)
    print(f"report: {os.path.join(a.run_dir, 'report.md')}")
    if planted:
        return 0 if all(h["planted"]["recovered"] for h in rep["hooks"].values()) else 1
    return 0
