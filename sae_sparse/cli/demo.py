"""``sae-sparse demo`` (and ``sae-sparse train`` with no arguments): the offline demo.
"""
from __future__ import annotations

from .common import _common, _Formatter


def add_parser(sub):
    p = sub.add_parser("demo", help="the offline demo (same as `train` with no arguments)",
                       formatter_class=_Formatter)
    p.add_argument("--out", default="sae_sparse_demo_run", help="run directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)


def run(a):
    """The demo's run; exit status 0 when the planted latents were recovered."""
    from ..demo import run_demo

    rep = run_demo(a.out, seed=a.seed, progress=not a.no_progress)
    return 0 if all(h["planted"]["recovered"] for h in rep["hooks"].values()) else 1
