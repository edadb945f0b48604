"""Command line: ``sae-sparse make-data | train | train-sae | report | merge | generate | demo |
doctor | sparsify``, one module per subcommand (``add_parser(sub)``, ``run(args)``), the table in
``COMMANDS``.

``sae-sparse train`` with no arguments runs the offline demo (tiny model + SAE shipped in the
package, a planted edit, training and the report).

A mistake of the user's own (a missing file, a bad record, an SAE that does not fit its hook,
a run directory of another run) ends with one line, ``sae-sparse: error: ...``, and exit
status 2, found before the model is loaded and before anything is written where possible;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import contextlib
import sys
import warnings

from . import demo, generate, make_data, merge, report, sparsify, train, train_sae
from .common import UsageError, _Formatter, _Parser

# subcommand -> its module (add_parser(sub), run(args)); "doctor" and "sparsify" parse their
# own arguments
COMMANDS = {"make-data": make_data, "train": train, "report": report, "merge": merge, "generate": generate,
            "train-sae": train_sae, "demo": demo}


def _parsers():
    ap = _Parser(prog="sae-sparse", formatter_class=_Formatter,
                 description="sae_sparse: train, read and apply sparse latent edits")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    sub.add_parser("doctor", add_help=False,
                   help="check this install on this machine: every op and backend against "
                        "the float64 reference, timings on a GPU (`sae-sparse doctor --help`)")
    sub.add_parser("sparsify", add_help=False,
                   help="EleutherAI sparsify's trainer (`python -m sparsify ARGS`; needs "
                        "CUDA) with every SparseCoder on this package's ops "
                        "(compat.patch_sparsify); the backend from $SAE_SPARSE_BACKEND")
    return ap


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    if isinstance(e, KeyError):
        msg = f"missing key {msg}"
    return " ".join(msg.split())  # one line, whatever the exception held


@contextlib.contextmanager
def _short_warnings():
    """Warnings (this package's and the libraries') as one line each on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = lambda msg, *a, **k: print(f"sae-sparse: warning: {msg}",
                                                          file=sys.stderr)
        yield


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sparsify"]:  # everything after it is sparsify's, --help included
        return sparsify.run(argv[1:])
    if argv[:1] == ["doctor"]:  # its own parser (python -m sae_sparse.doctor is the same)
        from ..doctor import main as doctor

        return doctor(argv[1:])
    a = _parsers().parse_args(argv)
    from ..training import RunMismatch, TrainingInterrupted

    try:
        with _short_warnings():
            return COMMANDS[a.cmd].run(a)
    except TrainingInterrupted as e:
        print(f"sae-sparse: interrupted after step {e.step}; checkpoint saved in "
              f"{e.checkpoint}. Run the same command again to resume.", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("sae-sparse: interrupted", file=sys.stderr)
        return 130
    except (UsageError, RunMismatch, ValueError, KeyError, OSError,
            FloatingPointError, ImportError) as e:
        if a.debug:
            raise
        print(f"sae-sparse: error: {_one_line(e)}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "UsageError", "main"]
