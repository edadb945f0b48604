"""sae_sparse: fused kernels for trainable sparse latent edits in SAE bases.

See docs/design.md for the math. Public API:

* :func:`topk_encode`, :func:`sparse_decode`, :func:`sae_forward` (an SAE's encode + decode
  as one op), :func:`edit_decode`, :func:`sae_edit`
  (:func:`cached_folds`: reuse an adapter's dense terms across inference calls),
  :func:`auxk_encode` / :func:`auxk_decode` (AuxK: top-k over the dead latents and its
  reconstruction, for SAE training)
* :class:`SAE`, :class:`LatentAdapter`
* :func:`load_sae` (SAELens, sparsify, Gemma Scope, dictionary_learning, OpenAI),
  :func:`save_saelens`, :func:`save_sparsify`
* :func:`load_model` (a Hugging Face directory, hub id or GGUF file), :func:`resolve_hook`
  (module paths, sparsify hookpoints, TransformerLens hook names)
* :func:`attach`, :func:`train_adapter`, :func:`load_adapter`, :func:`attach_run`,
  :func:`merge_bias_edit`, :func:`write_report`, :func:`side_by_side` (base vs edited
  generations); the ``sae-sparse`` CLI
* :func:`available_backends` (``SAE_SPARSE_BACKEND`` forces one)
"""
__version__ = "0.1.0"

from .backends import ENV_VAR as BACKEND_ENV_VAR
from .backends import available_backends, backend_status
from .generate import side_by_side
from .hookpoints import resolve_hook
from .baselines import ResidualLoRA
from .hooks import attach
from .io import load_sae, save_saelens, save_sparsify
from .models import load_model
from .modules import SAE, LatentAdapter
from .ops import (auxk_decode, auxk_encode, cached_folds, edit_decode, sae_edit, sae_forward,
                  sparse_decode, topk_encode)
from .report import write_report
from .training import (RunMismatch, TrainConfig, TrainingInterrupted, attach_run, load_adapter,
                    merge_bias_edit, train_adapter)


__all__ = [
    "topk_encode",
    "auxk_encode",
    "auxk_decode",
    "sparse_decode",
    "sae_forward",
    "edit_decode",
    "sae_edit",
    "cached_folds",
    "SAE",
    "LatentAdapter",
    "load_sae",
    "attach",
    "ResidualLoRA",
    "train_adapter",
    "TrainConfig",
    "load_adapter",
    "attach_run",
    "merge_bias_edit",
    "write_report",
    "side_by_side",
    "load_model",
    "resolve_hook",
    "RunMismatch",
    "TrainingInterrupted",
    "save_saelens",
    "save_sparsify",
    "available_backends",
    "backend_status",
    "BACKEND_ENV_VAR",
]
