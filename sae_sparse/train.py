"""Deprecated: the training side now lives in :mod:`sae_sparse.training` (one module per
concern) and :mod:`sae_sparse.models` (``model_logits``, ``input_device``). This module keeps
the old names importable, with a DeprecationWarning."""
import warnings

from .models import input_device, model_logits  # noqa: F401
from .training import *  # noqa: F401,F403
from .training import __all__ as _names
from .training.data import Schedule as _Schedule  # noqa: F401
from .training.run_dir import check_run_dir as _check_run_dir  # noqa: F401
from .training.run_dir import fingerprint_changes as _fingerprint_changes  # noqa: F401

__all__ = list(_names) + ["model_logits", "input_device"]

warnings.warn("sae_sparse.train is deprecated: import from sae_sparse (the public API) or "
              "sae_sparse.training", DeprecationWarning, stacklevel=2)
