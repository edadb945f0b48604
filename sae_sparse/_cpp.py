"""The ``cpp`` backend: the C++ CPU extension ``sae_sparse._C`` behind the shared autograd ops."""
from __future__ import annotations

import importlib.util

import torch

from ._autograd import make_ops
from ._custom_ops import wrap

if importlib.util.find_spec(f"{__package__}._C") is None:  # SAE_SPARSE_NO_NATIVE=1 builds none
    _C = None
    IMPORT_ERROR = "sae_sparse._C was not built (reinstall without SAE_SPARSE_NO_NATIVE=1)"
else:
    try:
        from . import _C
    except ImportError as e:  # pragma: no cover - a broken build, e.g. a torch ABI mismatch
        _C = None
        IMPORT_ERROR = f"sae_sparse._C failed to load: {e}"
    else:
        IMPORT_ERROR = None


def available() -> bool:
    return _C is not None


# The extension's functions as torch.library custom ops (sae_sparse::cpu_*), then autograd.
# Eager calls go straight to the extension; torch.compile traces the custom ops.
OPS = wrap(lambda: _C, "cpu")
CPP = make_ops(lambda: OPS if torch.compiler.is_compiling() else _C, "CPU")
