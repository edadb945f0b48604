"""Argument checks shared by every backend: errors name the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str, shape: tuple, *, like: torch.Tensor | None = None,
                 dtype: torch.dtype | None = None) -> None:
    """Checks `t` is a tensor of `shape` (None entries are free) on `like`'s device and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} must be on {like.device} like x, got {t.device}")
        if dtype is None and t.dtype != like.dtype:
            raise TypeError(f"{name} must have dtype {like.dtype} like x, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")


def check_x(x, name: str = "x") -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have shape [..., D], got a 0-d tensor")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (fp16, bf16, fp32, fp64), got {x.dtype}")
    return x.shape[-1]


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    """ValueError when x has a NaN or inf. Under torch.compile, where a data-dependent branch
    would break the graph, the check is an assertion op in the graph (a RuntimeError)."""
    if not x.numel():
        return
    if torch.compiler.is_compiling():
        torch._assert_async(torch.isfinite(x).all(), f"{name} contains NaN or inf")
    elif not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_k(k, S: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= S:
        raise ValueError(f"k must be in [1, S={S}], got {k}")
    return k


def check_encoder(x, W_enc, b_enc, k, b_pre, threshold) -> tuple[int, int]:
    D = check_x(x)
    if isinstance(W_enc, torch.Tensor) and W_enc.dim() == 2 and W_enc.shape[1] != D:
        raise ValueError(f"x must have shape [..., {W_enc.shape[1]}] (the SAE's width, W_enc "
                         f"[{W_enc.shape[0]}, {W_enc.shape[1]}]), got {list(x.shape)}")
    check_tensor(W_enc, "W_enc", (None, D), like=x)
    S = W_enc.shape[0]
    check_tensor(b_enc, "b_enc", (S,), like=x)
    if b_pre is not None:
        check_tensor(b_pre, "b_pre", (D,), like=x)
    if threshold is not None:
        check_tensor(threshold, "threshold", (S,), like=x)
    check_k(k, S)
    return D, S


def check_code(values, indices, W_dec, name_v="values", name_i="indices", *,
               check_range=True) -> tuple[int, int]:
    """Shapes, dtypes and devices of a sparse code; ``check_range`` also checks every index
    lies in [0, S) (a reduction, and a device sync on GPU -- skipped for indices the encoder
    just produced)."""
    check_x(values, name_v)
    if not isinstance(indices, torch.Tensor):
        raise TypeError(f"{name_i} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.shape != values.shape:
        raise ValueError(f"{name_i} must have the shape of {name_v} {list(values.shape)}, "
                         f"got {list(indices.shape)}")
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name_i} must be int64 (or int32), got {indices.dtype}")
    if indices.device != values.device:
        raise ValueError(f"{name_i} must be on {values.device}, got {indices.device}")
    check_x(W_dec, "W_dec")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must have shape [S, D], got {list(W_dec.shape)}")
    if W_dec.device != values.device:
        raise ValueError(f"W_dec must be on {values.device} like {name_v}, got {W_dec.device}")
    if W_dec.dtype != values.dtype:
        raise TypeError(f"W_dec must have dtype {values.dtype} like {name_v}, got {W_dec.dtype}")
    S, D = W_dec.shape
    if check_range and indices.numel():
        lo, hi = torch.stack([indices.min(), indices.max()]).tolist()  # one sync
        if lo < 0 or hi >= S:
            raise ValueError(f"{name_i} must lie in [0, S={S}), got values in [{lo}, {hi}]")
    return S, D
