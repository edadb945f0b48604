"""The ``cpp`` backend: the C++ CPU kernels behind the shared autograd ops.

Importing the extension ``sae_sparse._C`` registers them as PyTorch operators
(``torch.ops.sae_sparse_cpu.*``, schemas declared once with TORCH_LIBRARY in
csrc/bindings.cpp); their fake implementations (``_custom_ops``) let torch.compile trace them.
"""
from __future__ import annotations

import importlib.util

from ._autograd import KernelOps
from ._custom_ops import register_fakes

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


# The operators (dispatched in C++; the same calls eager and under torch.compile).
OPS = register_fakes("sae_sparse_cpu") if _C is not None else None
CPP = KernelOps(lambda: OPS)
