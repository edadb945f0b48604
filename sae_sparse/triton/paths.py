"""Never slower than plain torch: the fused Triton path or a torch composition, per shape.

For the encode (and the plain decode of an SAE step) a composition of torch ops -- cuBLAS
``F.linear`` in row chunks + ``torch.topk``; ``F.embedding_bag`` -- computes the same outputs
(up to the order of exact ties). On a GPU the op times both on first use for a shape bucket
(device, torch and triton versions, dtypes, N rounded up to a power of two, D, S, k and the
optional inputs) and keeps the faster, as ``torch.backends.cudnn.benchmark`` and
``triton.autotune`` do; later calls in the bucket reuse the choice. Elsewhere (the
interpreter, where timings mean nothing) the fused path runs.

Overrides: the ``path=`` argument of the public ops (``"fused"``, ``"torch"`` or ``"auto"``)
and the environment variable ``SAE_SPARSE_PATH``; the argument wins.
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch

from ._common import interpreting, triton

ENV_VAR = "SAE_SPARSE_PATH"
PATHS = ("fused", "torch")
_FORCED = contextvars.ContextVar("sae_sparse_path", default=None)
_CACHE: dict = {}
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


def choose(key, device, candidates):
    """The path to run: the override, else the cached choice for key, else (on a GPU, or
    with a test's timer) the faster candidate by timing each once; else "fused".
    candidates: {path: zero-argument callable}."""
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
    _CACHE[key] = best
    return best


def clear():
    """Forget every choice (e.g. after changing ENCODE knobs)."""
    _CACHE.clear()
