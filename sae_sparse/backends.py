"""Backend registry and selection.

``backend=None`` picks the fastest backend available for the tensors' device:
CPU -> ``cpp`` (if the extension was built) else ``torch``; CUDA -> ``triton`` (if triton is
installed; not for float64, which the triton kernels do not take) else ``torch``. The
``triton`` backend runs on CPU tensors only under the Triton interpreter
(``TRITON_INTERPRET=1``, for tests) and is never picked there by default. The environment
variable ``SAE_SPARSE_BACKEND`` forces one backend for every call that does not name one.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import _cpp
from . import triton as _triton
from ._autograd import KernelOps
from ._custom_ops import wrap
from .reference import edit_decode_torch, fold_edit_torch, sae_forward_torch, topk_encode_torch

ENV_VAR = "SAE_SPARSE_BACKEND"
ALL_BACKENDS = ("torch", "cpp", "triton")

# The triton kernel library as torch.library custom ops, for torch.compile; eager calls go
# straight to the launchers (scattermoe's way).
TRITON_OPS = wrap(lambda: _triton, "triton", padded_csr=True, fold=True)
_TRITON = KernelOps(lambda: TRITON_OPS if torch.compiler.is_compiling() else _triton)
_ENCODE = {"torch": topk_encode_torch, "cpp": _cpp.CPP.topk_encode, "triton": _TRITON.topk_encode}
_DECODE = {"torch": edit_decode_torch, "cpp": _cpp.CPP.edit_decode, "triton": _TRITON.edit_decode}
_FOLD = {"torch": fold_edit_torch, "cpp": _cpp.CPP.fold, "triton": _TRITON.fold}
_SAE = {"torch": sae_forward_torch, "cpp": _cpp.CPP.sae_forward, "triton": _TRITON.sae_forward}


def available_backends() -> list[str]:
    """Names of the backends usable in this installation (``torch`` always is)."""
    out = ["torch"]
    if _cpp.available():
        out.append("cpp")
    if _triton.available():
        out.append("triton")
    return out


def backend_status() -> dict[str, str]:
    """Why each backend is or is not available (for bug reports and the README), and the
    shape buckets whose fused triton outputs disagreed with the torch composition's (they
    run the composition; see sae_sparse/triton/paths.py)."""
    triton = _triton.IMPORT_ERROR
    if _triton.available():
        triton = "available (CUDA tensors" + ("; CPU tensors through the interpreter)"
                                              if _triton.interpreting() else ")")
        refused = _triton.paths.refused()
        if refused:
            triton += (f"; the fused path is refused for {len(refused)} shape bucket(s) whose "
                       "outputs disagreed with the torch composition's: "
                       + "; ".join(f"{key[0]} ({_triton.paths.describe(key)}): {why}"
                                   for key, why in refused.items()))
    return {"torch": "available",
            "cpp": "available" if _cpp.available() else _cpp.IMPORT_ERROR,
            "triton": triton}


def _supports(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return _cpp.available() and device.type == "cpu"
    if name == "triton":
        return _triton.supports(device)
    return False


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The backend that will run on `device` for `dtype` tensors, honouring `backend` and
    $SAE_SPARSE_BACKEND. The triton kernels take fp32/bf16/fp16 only, so float64 CUDA tensors
    go to ``torch`` by default."""
    if backend is None:
        backend = os.environ.get(ENV_VAR) or None
    if backend is None:
        if _supports("cpp", device):
            return "cpp"
        if (device.type == "cuda" and dtype != torch.float64
                and _supports("triton", device)):
            return "triton"
        if device.type == "cpu":
            _warn_no_cpp()
        return "torch"
    if backend not in ALL_BACKENDS:
        raise ValueError(f"backend must be one of {ALL_BACKENDS} or None, got {backend!r}")
    if not _supports(backend, device):
        why = backend_status().get(backend, "")
        raise RuntimeError(f"backend {backend!r} cannot run on {device} tensors"
                           + (f": {why}" if why != "available" else ""))
    return backend


_warned = False


def _warn_no_cpp():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn("sae_sparse: the C++ extension is not built "
                      f"({_cpp.IMPORT_ERROR}); CPU ops run on the slower 'torch' backend",
                      RuntimeWarning, stacklevel=4)


def encode_fn(name: str):
    return _ENCODE[name]


def decode_fn(name: str):
    return _DECODE[name]


def fold_fn(name: str):
    """The backend's ``fold(W_dec, bias, W_out) -> (M, c)``, the dense terms its decode_fn
    takes as ``folded=``."""
    return _FOLD[name]


def sae_fn(name: str):
    """The backend's ``sae_forward(x, W_enc, b_enc, k, b_pre, threshold, W_dec, b_dec)``
    -> (y, values, indices, overflow): an SAE's encode + decode (one autograd Function on
    the kernel backends, sharing the backward's grouping by latent)."""
    return _SAE[name]
