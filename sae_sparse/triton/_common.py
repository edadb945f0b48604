"""What every kernel module of the triton backend shares: availability, the tensor-core
product, the packed top-k keys, block sizes and the launch helpers. Nothing here queries a
GPU at import time (the SM count is looked up on first launch)."""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - triton is optional
    triton = tl = None
    IMPORT_ERROR = f"triton not importable: {e}"
else:
    IMPORT_ERROR = None

from . import _interpreter  # noqa: E402

if triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1":
    _interpreter.install()  # what the interpreter computes otherwise than a GPU (SUBSTITUTES)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    return triton is not None


def supports(device: torch.device) -> bool:
    if triton is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def p2(n: int, lo: int = 16) -> int:
    """The next power of two >= n (and >= lo): tl.arange and tl.topk need powers of two."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def check_dtypes(*ts):
    for t in ts:
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"the triton backend takes fp32/bf16/fp16 tensors, got {t.dtype}")


_SM_COUNT = {}


def sm_count(device) -> int:
    """The device's SM count, which sizes the persistent grids (under the interpreter:
    _interpreter.interpreter_sms(), an H100's by default). Looked up on first launch."""
    if device.type != "cuda":
        return _interpreter.interpreter_sms()
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]


if triton is not None:
    KEY_MIN = tl.constexpr(-2 ** 63)  # below every packed key of a non-NaN value
    KEY_MAX = tl.constexpr(2 ** 63 - 1)

    @triton.jit
    def dot(a, b, acc, IEEE: tl.constexpr):
        """acc + a @ b in fp32: IEEE fp32 products (fp32 inputs), else tensor cores."""
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        return acc

    @triton.jit
    def round_odd(bits, RLOW: tl.constexpr):
        """fp32 bits rounded to odd with the low bits of mask RLOW dropped (RLOW = 0: as is).
        Rounding to odd keeps every strict comparison with a number of <= 23 - log2(RLOW + 1)
        significant bits (bf16/fp16 thresholds, 0), and rounding its result to bf16/fp16 gives
        the correctly rounded value of the exact one (intermediate precision >= target + 2)."""
        if RLOW == 0:
            return bits
        else:
            return (bits | ((bits & RLOW) + RLOW)) & ~RLOW

    @triton.jit
    def pack(v, col, RLOW: tl.constexpr):
        """Order-preserving int64 key: value bits high, ~index low (ties -> smaller index);
        the value rounded to odd first when RLOW > 0 (the encode's int32-key path)."""
        bits = round_odd(v.to(tl.int32, bitcast=True), RLOW)
        key32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return (key32.to(tl.int64) << 32) | (0xFFFFFFFF - col.to(tl.int64))

    @triton.jit
    def unpack(keys):
        """Inverse of pack: (fp32 value, int64 index)."""
        key32 = (keys >> 32).to(tl.int32)
        bits = tl.where(key32 < 0, key32 ^ 0x7FFFFFFF, key32)
        return bits.to(tl.float32, bitcast=True), 0xFFFFFFFF - (keys & 0xFFFFFFFF)

    @triton.jit
    def act_fwd(h, ACT: tl.constexpr):
        """The adapter's activation (codes in sae_sparse.codes: relu, gelu, identity)."""
        if ACT == 0:
            return tl.maximum(h, 0.0)
        elif ACT == 1:
            return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
        else:
            return h

    @triton.jit
    def act_grad(h, ACT: tl.constexpr):
        """d act / dh (relu: 1 where h > 0)."""
        if ACT == 0:
            return (h > 0.0).to(tl.float32)
        elif ACT == 1:
            return (0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
                    + h * tl.exp(-0.5 * h * h) * 0.3989422804014327)
        else:
            return tl.full(h.shape, 1.0, tl.float32)
