"""Where the Triton interpreter (``TRITON_INTERPRET=1``) computes otherwise than a GPU, and the
substitutes that make it compute what the GPU computes.

The kernels here run under the interpreter with exactly the launch settings a GPU gets (the
tables ``ENCODE``, ``FOLD``, ``DECODE``, ``SEGMENT``, ``TOKEN``, ``DENSE`` beside each kernel);
no launcher asks whether it is interpreted. What the interpreter cannot run as the hardware
does is listed in ``SUBSTITUTES`` with its reason, and replaced in the interpreter itself (not
in the kernels) when this module is imported under ``TRITON_INTERPRET=1``.
``tests/test_interpreter.py`` proves each substitute on the arithmetic it replaces.

Not substitutes, because nothing can reproduce them off the card: the order in which a
tensor-core ``tl.dot`` sums its products (the interpreter sums with numpy's BLAS), and
``num_warps`` / ``num_stages``, which change how a GPU schedules a program but not what it
computes (the interpreter runs each program whole and ignores them). The number of SMs, which
sizes the persistent grids, is the card's: the interpreter takes ``INTERPRETER_SMS``
(the H100 SXM's 132), and tests also run with few SMs so that each program loops over
several tiles, as on a GPU at real shapes.
"""
from __future__ import annotations

import os

import numpy as np
import torch

SUBSTITUTES = {
    "fp32 -> bf16 conversion": (
        "triton 3.6's interpreter truncates the mantissa (a NaN whose payload sits in the "
        "low 16 bits becomes inf); a GPU's cvt.rn.bf16.f32 rounds to nearest even. The "
        "interpreter's float -> bf16 casts (explicit .to() and the implicit one of a store "
        "into a bf16 tensor) go through torch's conversion, which rounds to nearest even."),
    "tl.dot of bf16 operands": (
        "the interpreter keeps bf16 as uint16 and would multiply the integers; a tensor core "
        "multiplies bf16 values exactly into an fp32 sum. The operands are widened to fp32 "
        "(exact) before numpy's fp32 product."),
    "number of SMs": (
        "a property of the card, which sizes the persistent grids: the interpreter takes "
        "INTERPRETER_SMS (132, an H100 SXM's; SAE_SPARSE_INTERPRET_SMS overrides it)."),
}

INTERPRETER_SMS = 132


def interpreter_sms() -> int:
    return int(os.environ.get("SAE_SPARSE_INTERPRET_SMS", INTERPRETER_SMS))


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float array -> the uint16 bits of its bf16 rounding to nearest even (a GPU's)."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    """uint16 bf16 bits -> float32 values (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


_INSTALLED = False


def install() -> None:
    """Put the substitutes into triton's interpreter (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    import triton
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    for name in ("cast_impl", "create_fp_to_fp", "create_dot"):
        if not hasattr(builder, name):
            raise RuntimeError(
                f"sae_sparse's interpreter substitutes need triton's InterpreterBuilder.{name} "
                f"(triton 3.6); triton {triton.__version__} has none: "
                "install triton==3.6.0 to run the kernels under TRITON_INTERPRET=1")
    TensorHandle = interp.TensorHandle
    cast_impl, fp_to_fp, dot = builder.cast_impl, builder.create_fp_to_fp, builder.create_dot

    def widen(h):
        """A float handle's values as fp32 numpy (bf16 decoded from its bits)."""
        if h.dtype.scalar == tl.bfloat16:
            return bf16_values(h.data)
        return h.data.astype(np.float32)

    def to_bf16(self, src, dst_type):
        return TensorHandle(bf16_bits(widen(src)).reshape(src.data.shape), dst_type.scalar)

    def casts_to_bf16(src, dst_type):
        return (dst_type.scalar == tl.bfloat16 and src.dtype.scalar.is_floating()
                and src.dtype.scalar != tl.bfloat16)

    def patched_cast(self, src, dst_type):
        if casts_to_bf16(src, dst_type):
            return to_bf16(self, src, dst_type)
        return cast_impl(self, src, dst_type)

    def patched_fp_to_fp(self, src, dst_type, rounding_mode):
        if casts_to_bf16(src, dst_type):
            return to_bf16(self, src, dst_type)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if tl.bfloat16 in (a.dtype.scalar, b.dtype.scalar):
            a = TensorHandle(widen(a), tl.float32)
            b = TensorHandle(widen(b), tl.float32)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl = patched_cast
    builder.create_fp_to_fp = patched_fp_to_fp
    builder.create_dot = patched_dot  # (create_fp_trunc and the other casts call cast_impl)
    _skip_nested_repatching(interp, tl)
    _INSTALLED = True


class _Unchanged:
    def restore(self):
        pass


def _skip_nested_repatching(interp, tl):
    """Speed only, the same computation: the interpreter re-patches triton.language on every
    call of a @triton.jit helper inside a kernel (tl.sum and tl.zeros are such helpers too;
    ~1.5 ms each, most of an interpreted backward's time), though it is already patched with
    the same builder. Such a call skips the patching once the running launch has patched the
    language modules the helper sees."""
    import inspect

    patch_lang = interp._patch_lang
    running = []  # per running launch: the language modules patched so far

    def langs(fn):
        return {id(v) for v in fn.__globals__.values()
                if inspect.ismodule(v) and v in (tl, tl.core)}

    class _Launch:
        def __init__(self, scope):
            self.scope = scope

        def restore(self):
            running.pop()
            self.scope.restore()

    def patched(fn):
        mine = langs(fn)
        if running:  # a helper called inside a launch
            if mine <= running[-1]:
                return _Unchanged()
            running[-1] |= mine  # (the interpreter never restores a helper's patches)
            return patch_lang(fn)
        scope = patch_lang(fn)  # a launch: GridExecutor restores the scope when it ends
        running.append(mine)
        return _Launch(scope)

    interp._patch_lang = patched
