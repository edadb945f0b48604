"""The Triton interpreter runs the GPU's launch settings; each of its substitutes
(sae_sparse/triton/_interpreter.py SUBSTITUTES) is proven here on the arithmetic it replaces."""
import os
import pathlib
import re

import numpy as np
import pytest
import torch

import sae_sparse as ss
from sae_sparse.triton import _common, _interpreter

pytestmark = pytest.mark.skipif(
    "triton" not in ss.available_backends() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="tests the Triton interpreter (TRITON_INTERPRET=1)")

if _common.triton is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _to_bf16_kernel(x_ptr, cast_ptr, store_ptr, N, BLOCK: tl.constexpr):
        """An explicit cast and the implicit one of a store into a bf16 tensor."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        v = tl.load(x_ptr + i, mask=i < N)
        tl.store(cast_ptr + i, v.to(tl.bfloat16), mask=i < N)
        tl.store(store_ptr + i, v, mask=i < N)

    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
        m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
        a = tl.load(a_ptr + m[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + n[None, :])
        tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))

    @triton.jit
    def _split_kernel(a_ptr, p_ptr, N, BLOCK: tl.constexpr):
        """fold._parts_dot's three-part split of fp32 into bf16, as written there."""
        i = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + i, mask=i < N)
        a1 = a.to(tl.bfloat16)
        r = a - a1.to(tl.float32)
        a2 = r.to(tl.bfloat16)
        a3 = (r - a2.to(tl.float32)).to(tl.bfloat16)
        tl.store(p_ptr + i, a1, mask=i < N)
        tl.store(p_ptr + N + i, a2, mask=i < N)
        tl.store(p_ptr + 2 * N + i, a3, mask=i < N)


def _hard_fp32_bits():
    """fp32 bit patterns where a truncating or a careless rounding conversion goes wrong:
    exact halves (even and odd bf16 neighbour), just above / below them, carries into the
    exponent, the largest finite floats (which round to inf), subnormals, signed zeros,
    infinities, NaNs with their payload in the low 16 bits only, and random bits."""
    g = np.random.default_rng(0)
    hi = g.integers(0, 1 << 16, 4000, dtype=np.uint32) << 16
    special = [0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001,
               0xFF800001, 0x7F80FFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000, 0x7F7F7FFF,
               0x00000001, 0x00008000, 0x00018000, 0x007FFFFF, 0x3F80FFFF, 0x3FFFFFFF,
               0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001]
    bits = np.concatenate([hi | 0x8000, hi | 0x7FFF, hi | 0x8001, (hi + (1 << 16)) | 0x8000,
                           g.integers(0, 1 << 32, 4000, dtype=np.uint64).astype(np.uint32),
                           np.array(special, dtype=np.uint32)])
    return torch.from_numpy(bits.view(np.int32).copy()).view(torch.float32)


def test_fp32_to_bf16_rounds_to_nearest_even_as_a_gpu():
    """The substitute for the interpreter's truncating fp32 -> bf16 conversion: the explicit
    cast and a store into bf16 memory both give torch's (round to nearest even; NaN stays
    NaN) on every hard pattern; the interpreter's own conversion does not."""
    x = _hard_fp32_bits()
    n = x.numel()
    cast = torch.empty(n, dtype=torch.bfloat16)
    store = torch.empty(n, dtype=torch.bfloat16)
    _to_bf16_kernel[(triton.cdiv(n, 1024),)](x, cast, store, n, BLOCK=1024)
    want = x.to(torch.bfloat16)
    for got in (cast, store):
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))
    from triton.runtime import interpreter as interp
    raw = interp._convert_float(x.numpy(), tl.float32, tl.bfloat16, None)
    assert not np.array_equal(raw[~nan.numpy()],
                              want[~nan].view(torch.int16).numpy().view(np.uint16))


def test_dot_of_bf16_operands_multiplies_values():
    """The substitute for the interpreter's tl.dot on bf16 (it multiplied the uint16 bit
    patterns): exact on integers (every product and partial sum exact in fp32, as a tensor
    core computes them) and to fp32 rounding on random values."""
    g = torch.Generator().manual_seed(0)
    for a, b, exact in (
            (torch.randint(-8, 9, (16, 32), generator=g).float(),
             torch.randint(-8, 9, (32, 16), generator=g).float(), True),
            (torch.randn(16, 32, generator=g), torch.randn(32, 16, generator=g), False)):
        a, b = a.bfloat16(), b.bfloat16()
        c = torch.empty(16, 16)
        _dot_kernel[(1,)](a, b, c, M=16, K=32, N=16)
        want = a.double() @ b.double()
        if exact:
            assert torch.equal(c.double(), want)
        else:
            torch.testing.assert_close(c.double(), want, rtol=1e-5, atol=1e-5)


def test_three_part_split_is_the_gpus():
    """fold's split of fp32 operands into three bf16 parts (PARTS == 3, now run by the
    interpreter) gives the bits a GPU's round-to-nearest-even split gives, and the parts sum
    back to the operand exactly (normal range)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1000, generator=g) * torch.logspace(-20, 20, 1000)
    parts = torch.empty(3 * 1000, dtype=torch.bfloat16)
    _split_kernel[(1,)](a, parts, 1000, BLOCK=1024)
    a1 = a.to(torch.bfloat16)
    r = a - a1.float()
    a2 = r.to(torch.bfloat16)
    a3 = (r - a2.float()).to(torch.bfloat16)
    assert torch.equal(parts.view(torch.int16), torch.cat([a1, a2, a3]).view(torch.int16))
    assert torch.equal(a1.double() + a2.double() + a3.double(), a.double())


def test_sm_count_is_an_h100s_unless_overridden(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("SAE_SPARSE_INTERPRET_SMS", raising=False)
    assert _common.sm_count(cpu) == _interpreter.INTERPRETER_SMS == 132
    monkeypatch.setenv("SAE_SPARSE_INTERPRET_SMS", "3")
    assert _common.sm_count(cpu) == 3


def test_no_launcher_asks_whether_it_is_interpreted():
    """The kernels' modules read their settings tables only: no interpreter forks."""
    root = pathlib.Path(_common.__file__).parent
    for name in ("encode", "fold", "backward", "edit_decode", "functions"):
        src = (root / f"{name}.py").read_text()
        assert not re.search(r"interpreting|TRITON_INTERPRET", src), name
