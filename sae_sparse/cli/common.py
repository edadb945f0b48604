"""What every subcommand shares: the one-line usage error, the parser and help formatter, the
flags generated from config dataclasses, and small argument helpers.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os


class UsageError(ValueError):
    """A mistake in the command line or its files: reported as one line."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, unless the help already says it, the flag is
    required, or it has none to show (None, a switch's False, an empty list)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if ("default" in h or action.required
                or action.default is None or action.default is False or action.default == []):
            return h
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (``--help`` shows the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _common(p):
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error instead of one line")


def config_flags(p, cls):
    """One flag per field of the config dataclass ``cls`` (``--field-name``), its default,
    help and argparse keywords taken from the field (``training.config.option``); fields
    marked ``flag=False`` have a flag of their own."""
    for f in dataclasses.fields(cls):
        kw = dict(f.metadata)
        if not kw.pop("flag", True):
            continue
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, **kw)


def config_values(a, cls) -> dict:
    """The parsed values of ``cls``'s generated flags, by field name."""
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(cls)
            if f.metadata.get("flag", True)}


def _sae_arg(p):
    p.add_argument("--sae", action="append", default=[], metavar="[HOOK=]PATH",
                   help="the SAE's path if it moved since training (HOOK=PATH for a run with "
                        "several hooks); repeatable")


def _parse_sae_paths(items):
    out = {}
    for it in items:
        hook, eq, path = it.partition("=")
        key, val = (hook, path) if eq and not os.path.exists(it) else (None, it)
        if key in out:
            raise UsageError(f"--sae given twice for {key or 'the run'}")
        out[key] = val
    return out


def _device(spec):
    import torch

    dev = torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: this machine has no CUDA device")
    return dev


@contextlib.contextmanager
def process_group(device_spec):
    """Under torchrun (WORLD_SIZE > 1): joins the process group (NCCL on CUDA, else gloo),
    puts each rank on its own GPU, and leaves the group on the way out. -> (rank, device)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        yield 0, _device(device_spec)
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _device(device_spec)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    joined = not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield dist.get_rank(), dev
    finally:
        if joined:
            # leave the group we joined before the interpreter exits: a gloo group still
            # alive at exit tears its threads down unjoined, and the process aborts
            # ("terminate called without an active exception") after a successful run
            dist.destroy_process_group()


def check_out_path(path, flag):
    """An output directory that is an existing file fails here, before any model loads."""
    p = os.path.abspath(path)
    while not os.path.exists(p):  # the nearest existing ancestor must be a directory
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise UsageError(f"{flag} {path}: {p} is a file; give a directory (new or a run's)")


def _model_source(spec):
    return os.path.abspath(spec) if os.path.exists(spec) else spec
