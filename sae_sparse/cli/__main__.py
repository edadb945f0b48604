"""``python -m sae_sparse.cli``: the ``sae-sparse`` command (e.g. under torchrun)."""
import sys

from . import main

sys.exit(main())
