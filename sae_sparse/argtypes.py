"""Options in one place: ``option``, a config dataclass field that carries its help text and
command-line settings (the CLI generates its flags from these), and the parsers of option
values the fields and the CLI share -- each takes the string argparse gives and returns the
value or raises ``argparse.ArgumentTypeError`` with a sentence naming what was expected."""
from __future__ import annotations

import argparse
import dataclasses
import math


def option(default, help: str, **cli):
    """A config field with its documentation: ``help`` is also its command-line help, and
    ``cli`` holds the rest of its flag's argparse keywords (``type``, ``choices``,
    ``metavar``, ``action``; ``flag=False``: the CLI gives the field a flag of its own). The
    CLI's options are generated from these (``sae_sparse/cli/common.py``, ``config_flags``)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def _int_at_least(lo, what):
    def parse(v):
        try:
            n = int(v)
        except ValueError:
            n = None
        if n is None or n < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}")
        return n
    parse.__name__ = f"int_at_least_{lo}"
    return parse


positive = _int_at_least(1, "a positive integer")
nonneg_int = _int_at_least(0, "an integer >= 0")


def finite_float(v):
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {v!r}")
    return x


def nonneg_float(v):
    x = finite_float(v)
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {v!r}")
    return x


def positive_float(v):
    x = finite_float(v)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {v!r}")
    return x


def fraction(v):
    x = finite_float(v)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {v!r}")
    return x


def or_auto(parse):
    """``parse``, or the string ``"auto"`` (a value the run chooses from its data)."""
    def p(v):
        if v == "auto":
            return v
        try:
            return parse(v)
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(str(e).replace(", got", " or 'auto', got",
                                                            1)) from None
    p.__name__ = f"auto_or_{parse.__name__}"
    return p


auto_nonneg_int = or_auto(nonneg_int)
auto_fraction = or_auto(fraction)
