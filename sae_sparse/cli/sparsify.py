"""``sae-sparse sparsify ARGS``: sparsify's own command line on this package's ops.
"""
from __future__ import annotations

import sys


def run(args):
    """Runs sparsify's own command line (``sparsify.__main__.run``, which parses sys.argv)
    under compat.patch_sparsify, so ``sae-sparse sparsify MODEL DATASET --k 32 ...`` is
    ``python -m sparsify MODEL DATASET --k 32 ...`` on this package's kernels; torchrun
    works as with sparsify: ``torchrun --nproc_per_node 8 -m sae_sparse.cli sparsify ...``."""
    try:
        from sparsify.__main__ import run
    except ImportError as e:
        print(f"sae-sparse: error: `sae-sparse sparsify` needs EleutherAI sparsify (pip "
              f"install eai-sparsify): {e}", file=sys.stderr)
        return 2
    import torch

    from ..compat import patch_sparsify

    if not torch.cuda.is_available() and not any(x in ("-h", "--help") for x in args):
        print("sae-sparse: error: `sae-sparse sparsify` runs sparsify's own command line, which "
              "needs a CUDA GPU (it loads the model on cuda:RANK); on a CPU, call sparsify's "
              "Trainer from Python under compat.patch_sparsify()", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = ["sparsify", *args]
    try:
        with patch_sparsify():
            run()
    finally:
        sys.argv = saved
    return 0
