"""The one definition of the op's mode and activation names and their integer codes.

The Python API takes the names; the kernels take the codes (a code is the name's position
here). The torch reference, the Triton kernels (``sae_sparse/triton``) and the C++ kernels
(``csrc/sae_sparse.h``, checked against this file by ``tests/test_cpp.py``) use them.
"""
MODES = ("delta", "replace", "plain")  # plain: sparse_decode (no edit); public: delta, replace
ACTIVATIONS = ("relu", "gelu", "identity")


def mode_code(mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES[:2]}, got {mode!r}")
    return MODES.index(mode)


def act_code(activation: str) -> int:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return ACTIVATIONS.index(activation)
