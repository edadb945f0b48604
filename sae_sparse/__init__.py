"""sae_sparse: fused kernels for trainable sparse latent edits in SAE bases.

See shared/DESIGN.md for the math. Public API:

* :func:`topk_encode`, :func:`sparse_decode`, :func:`edit_decode`, :func:`sae_edit`
* :class:`SAE`, :class:`LatentAdapter`
* :func:`load_sae` (SAELens, sparsify, Gemma Scope), :func:`save_saelens`, :func:`save_sparsify`
* :func:`available_backends` (``SAE_SPARSE_BACKEND`` forces one)
"""
from .backends import ENV_VAR as BACKEND_ENV_VAR
from .backends import available_backends, backend_status
from .io import load_sae, save_saelens, save_sparsify
from .modules import SAE, LatentAdapter
from .ops import edit_decode, sae_edit, sparse_decode, topk_encode

__version__ = "0.1.0"

__all__ = [
    "topk_encode",
    "sparse_decode",
    "edit_decode",
    "sae_edit",
    "SAE",
    "LatentAdapter",
    "load_sae",
    "save_saelens",
    "save_sparsify",
    "available_backends",
    "backend_status",
    "BACKEND_ENV_VAR",
]
