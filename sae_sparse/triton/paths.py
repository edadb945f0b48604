"""Never slower than plain torch, never trusted unchecked: the fused Triton path or a torch
composition, per shape.

For the encode (and the plain decode of an SAE step) a composition of torch ops -- cuBLAS
``F.linear`` in row chunks + ``torch.topk`` of packed keys; ``F.embedding_bag`` -- computes
the same outputs (exact ties to the smaller index on both paths, so the choice never changes
which latents a row selects). On a GPU the op times both on first use for a shape bucket
(device, torch and triton versions, dtypes, N rounded up to a power of two, D, S, k and the
optional inputs) and keeps the faster, as ``torch.backends.cudnn.benchmark`` and
``triton.autotune`` do; later calls in the bucket reuse the choice. Elsewhere (the
interpreter, where timings mean nothing) the fused path runs.

Check before trust: when a bucket is timed, the fused outputs of that call are compared with
the torch composition's (values and reconstructions to a tolerance of the dtype; indices
equal except at a near-tie). On a mismatch the bucket takes the torch path whatever the
timings, a warning names the op, the shape and the size of the difference (once per bucket),
and :func:`refused` (hence ``sae_sparse.backend_status()``) lists it.

Overrides: the ``path=`` argument of the public ops (``"fused"``, ``"torch"`` or ``"auto"``)
and the environment variable ``SAE_SPARSE_PATH``; the argument wins.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import warnings

import torch

from ._common import interpreting, triton

ENV_VAR = "SAE_SPARSE_PATH"
PATHS = ("fused", "torch")
_FORCED = contextvars.ContextVar("sae_sparse_path", default=None)
_CACHE: dict = {}
_REFUSED: dict = {}  # bucket -> why its fused outputs were not trusted
_TIMER = None  # tests install a fake one: timer(fn) -> ms


def check(path, name="path"):
    if path is not None and path not in PATHS + ("auto",):
        raise ValueError(f"{name} must be one of {PATHS + ('auto',)} or None, got {path!r}")
    return path


def forced(path):
    """A context in which the triton ops take `path` (None: no override; under torch.compile,
    which runs the composed custom ops, none is needed)."""
    check(path)
    if path is None or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return _forced(path)


@contextlib.contextmanager
def _forced(path):
    token = _FORCED.set(path)
    try:
        yield
    finally:
        _FORCED.reset(token)


def _do_bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")


def bucket(op, x, *others, **extra):
    """The cache key of a call: op, device, versions, dtypes, N up to a power of two, the
    other tensors' shapes (None where absent) and the extra ints."""
    dev = x.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    n = x.shape[0]
    return (op, name, torch.__version__, getattr(triton, "__version__", None), x.dtype,
            1 << max(0, (n - 1).bit_length()), tuple(x.shape[1:]),
            *(None if t is None else (tuple(t.shape), t.dtype) for t in others),
            *sorted(extra.items()))


def choose(key, device, candidates, compare=None):
    """The path to run: the override, else the cached choice for key, else (on a GPU, or
    with a test's timer) the faster candidate by timing each once -- "torch" if the fused
    outputs disagree with the torch composition's on this call; else "fused".
    candidates: {path: zero-argument callable}; compare(fused_out, torch_out): None when
    they agree, else a sentence on the difference."""
    path = _FORCED.get() or os.environ.get(ENV_VAR) or "auto"
    check(path, ENV_VAR if _FORCED.get() is None else "path")
    if path != "auto":
        return path
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    timer = _TIMER
    if timer is None:
        if device.type != "cuda" or interpreting() or torch.compiler.is_compiling():
            return "fused"
        timer = _do_bench
    times = {p: timer(fn) for p, fn in candidates.items()}
    best = min(PATHS, key=lambda p: (times.get(p, float("inf")), p != "fused"))
    why = _disagreement(candidates, compare)
    if why is not None:
        _REFUSED[key] = why
        warnings.warn(f"sae_sparse: the fused triton {key[0]} disagrees with the torch "
                      f"composition on {key[1]} ({describe(key)}): {why}; this shape "
                      "bucket takes the torch path. Please report it with the output of "
                      "`sae-sparse doctor`.", RuntimeWarning, stacklevel=3)
        best = "torch"
    _CACHE[key] = best
    return best


def _disagreement(candidates, compare):
    """compare's verdict on one run of each candidate (the fused outputs copied first: the
    candidates may write into the same buffers)."""
    if compare is None or set(PATHS) - set(candidates):
        return None
    fused = _copy(candidates["fused"]())
    return compare(fused, candidates["torch"]())


def _copy(out):
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_copy(o) for o in out)
    return out


def describe(key):
    """The shape part of a bucket key, for people."""
    dtype, n, rest = key[4], key[5], key[6:]
    return f"{dtype}, N <= {n}, " + ", ".join(str(r) for r in rest if r is not None)


def mismatch(got, want, name, *, dtype, scale=None):
    """None when tensors got and want agree to 4 units of dtype's precision (at least 2^-16)
    relative to scale (per row: want's largest |entry|), else a sentence with the largest
    difference. NaN must stand where NaN stands."""
    g, w = got.float(), want.float()
    if not torch.equal(torch.isnan(g), torch.isnan(w)):
        return f"{name}: NaN in different places"
    if scale is None:
        scale = w.nan_to_num(0.0).abs().amax(-1, keepdim=True)
    eps = max(torch.finfo(dtype).eps, 2.0 ** -16)
    tol = 4 * eps * scale.clamp_min(torch.finfo(torch.float32).tiny)
    diff = (g - w).nan_to_num(0.0).abs()
    if (diff > tol).any():
        worst = (diff / tol).argmax()
        return (f"{name} differ by up to {diff.reshape(-1)[worst].item():.3g} "
                f"(tolerance {tol.expand_as(diff).reshape(-1)[worst].item():.3g})")
    return None


def refused() -> dict:
    """{bucket: why} for every bucket whose fused outputs were not trusted (this process)."""
    return dict(_REFUSED)


def clear():
    """Forget every choice and refusal (e.g. after changing ENCODE knobs)."""
    _CACHE.clear()
    _REFUSED.clear()
