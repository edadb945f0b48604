"""The triton backend against the float64 reference (on CPU through the Triton interpreter)."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sae_sparse as ss
from sae_sparse import sparse_decode, topk_encode
from sae_sparse.ops import encode_rows
from sae_sparse.triton import encode as _enc

from helpers import LiveBytes, assert_close, full_op, grads_of, make_case

pytestmark = pytest.mark.skipif(
    "triton" not in ss.available_backends()
    or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton and a GPU or TRITON_INTERPRET=1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [
    pytest.param(7, 33, 1000, 7, id="N7-D33-S1000-k7"),
    pytest.param(1, 33, 1000, 7, id="N1-D33-S1000-k7"),
    pytest.param(3, 19, 61, 61, id="N3-D19-S61-kS"),
    pytest.param(20, 70, 333, 13, id="N20-D70-S333-k13"),
    # ~16 (token, slot) pairs per latent: the backward's segments span several gather steps
    pytest.param(64, 24, 40, 10, id="N64-D24-S40-k10"),
]


def on(t, dtype):
    """Copies of the case's tensors in `dtype` on DEVICE, as new leaves (tied stays tied)."""
    out, seen = {}, {}
    for n, v in t.items():
        if id(v) not in seen:
            w = v.detach().to(DEVICE, dtype)
            seen[id(v)] = w.requires_grad_(v.requires_grad)
        out[n] = seen[id(v)]
    return out


@pytest.mark.parametrize("N,D,S,k", SHAPES)
@pytest.mark.parametrize("variant", ["plain", "tied", "jumprelu"])
@pytest.mark.parametrize("mode", ["delta", "replace"])
@pytest.mark.quick_ids("delta-plain-N7-D33-S1000-k7", "replace-jumprelu-N1-D33-S1000-k7",
                       "delta-tied-N3-D19-S61-kS", "replace-tied-N64-D24-S40-k10")
def test_triton_matches_reference(N, D, S, k, variant, mode):
    """fp32 triton vs fp64 reference: same indices and overflow count, values/outputs/
    gradients within 1e-4."""
    t = make_case(N, D, S, k, b_pre=variant == "tied", tied=variant == "tied",
                  threshold=variant == "jumprelu")
    t32, t64 = on(t, torch.float32), on(t, torch.float64)
    v1, i1, y1, n1 = full_op(t32, k, mode, "gelu", "triton", overflow=True)
    v0, i0, y0, n0 = full_op(t64, k, mode, "gelu", "torch", overflow=True)
    assert torch.equal(i1.cpu(), i0.cpu()) and n1 == n0
    assert_close(v1.cpu(), v0.cpu(), rtol=1e-4, atol=1e-5, name="values")
    assert_close(y1.cpu(), y0.cpu(), rtol=1e-4, atol=1e-4, name="y")
    g1, g0 = grads_of(y1, t32), grads_of(y0, t64)
    assert set(g1) == set(g0)
    for n in g0:
        assert_close(g1[n].cpu(), g0[n].cpu(), rtol=1e-3, atol=1e-4, name=n)


def test_triton_encode_ties_and_overflow():
    D, S, k = 16, 200, 6
    W = torch.randn(S, D) / 4
    W[150] = W[3]
    W[77] = W[3]
    x = (W[3] * 10).unsqueeze(0).repeat(2, 1)
    _, i = topk_encode(x.to(DEVICE), W.to(DEVICE), torch.zeros(S, device=DEVICE), k,
                       backend="triton")
    assert i[0, :3].tolist() == [3, 77, 150]
    x = torch.randn(30, D)
    b = torch.full((S,), -1.0)
    _, _, n = topk_encode(x.to(DEVICE), W.to(DEVICE), b.to(DEVICE), k, backend="triton",
                          return_overflow=True)
    pre = x @ W.T + b
    assert int(n) == int(((pre > 0).sum(1) > k).sum())


def test_triton_encode_strided_parameters():
    """Non-contiguous W_enc, b_enc, threshold and x (views into larger tensors)."""
    g = torch.Generator().manual_seed(3)
    D, S, k = 12, 150, 5
    base = dict(W=torch.randn(2 * S, D + 3, generator=g), b=0.1 * torch.randn(2 * S, generator=g),
                thr=0.3 * torch.rand(2 * S, generator=g), x=torch.randn(7, 2 * D, generator=g))
    views = lambda t: (t["W"][::2, :D], t["b"][1::2], t["thr"][::2], t["x"][:, ::2])  # noqa: E731
    W, b, thr, x = views({n: u.to(DEVICE) for n, u in base.items()})
    assert not (W.is_contiguous() or b.is_contiguous() or thr.is_contiguous()
                or x.is_contiguous())
    v, i = topk_encode(x, W, b, k, threshold=thr, backend="triton")
    W0, b0, thr0, x0 = (u.double() for u in views(base))
    v0, i0 = topk_encode(x0, W0, b0, k, threshold=thr0, backend="torch")
    assert torch.equal(i.cpu(), i0)
    assert_close(v.cpu(), v0, rtol=1e-5, atol=1e-6, name="values")


@pytest.mark.parametrize("S,k,threshold", [(1, 1, False), (300, 1, True), (300, 1, False),
                                            (2, 2, True)])
def test_triton_encode_k1_and_tiny_S(S, k, threshold):
    """One selected entry (a top-k of size 1 inside the kernels) and one or two latents."""
    g = torch.Generator().manual_seed(S + k)
    x, W, b = (torch.randn(5, 8, generator=g, dtype=torch.float64),
               torch.randn(S, 8, generator=g, dtype=torch.float64),
               0.1 * torch.randn(S, generator=g, dtype=torch.float64))
    thr = 0.5 * torch.rand(S, generator=g, dtype=torch.float64) if threshold else None
    f = lambda u: u.float().to(DEVICE) if u is not None else None  # noqa: E731
    v, i, n = topk_encode(f(x), f(W), f(b), k, threshold=f(thr), backend="triton",
                          return_overflow=True)
    v0, i0, n0 = topk_encode(x, W, b, k, threshold=thr, backend="torch", return_overflow=True)
    assert torch.equal(i.cpu(), i0) and int(n) == int(n0)
    assert_close(v.cpu(), v0, rtol=1e-5, atol=1e-6, name="values")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_low_precision(dtype):
    t = make_case(9, 32, 500, 8, b_pre=True)
    tl_ = on(t, dtype)
    v1, i1, y1 = full_op(tl_, 8, "replace", "relu", "triton")
    assert v1.dtype == dtype and y1.dtype == dtype
    # the reference on the same rounded inputs
    tr = {n: v.detach().double().requires_grad_(v.requires_grad) for n, v in tl_.items()}
    v0, i0, y0 = full_op(tr, 8, "replace", "relu", "torch")
    # x - b_pre is rounded to the input dtype before the tensor-core product, so a near-tie may
    # swap; rows whose selection agrees must agree in value.
    same = (i1.cpu() == i0.cpu()).all(1)
    assert same.float().mean() >= 0.75
    assert_close(y1.cpu()[same], y0.cpu()[same], rtol=3e-2, atol=3e-2, name="y")


def test_triton_sparse_decode():
    v = torch.randn(5, 3, dtype=torch.float32, device=DEVICE)
    i = torch.randint(0, 40, (5, 3), device=DEVICE)
    W = torch.randn(40, 21, device=DEVICE)
    b = torch.randn(21, device=DEVICE)
    assert_close(sparse_decode(v, i, W, b, backend="triton").cpu(),
                 sparse_decode(v, i, W, b, backend="torch").cpu(), rtol=1e-5, atol=1e-5,
                 name="y")


def test_triton_rejects_fp64():
    x = torch.randn(2, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="triton backend takes fp32/bf16/fp16"):
        topk_encode(x, torch.randn(20, 8, dtype=torch.float64, device=DEVICE),
                    torch.zeros(20, dtype=torch.float64, device=DEVICE), 3, backend="triton")


def test_triton_bf16_gradients_reach_every_parameter():
    t = make_case(6, 32, 300, 5, b_pre=True)
    tb = on(t, torch.bfloat16)
    _, _, y = full_op(tb, 5, "replace", "gelu", "triton")
    g = grads_of(y, tb)
    tr = {n: v.detach().double().requires_grad_(v.requires_grad) for n, v in tb.items()}
    _, _, y0 = full_op(tr, 5, "replace", "gelu", "torch")
    g0 = grads_of(y0, tr)
    for n in g0:
        assert g[n].dtype == torch.bfloat16
        scale = g0[n].abs().max().item()
        assert_close(g[n].cpu(), g0[n].cpu(), rtol=5e-2, atol=5e-2 * scale, name=n)


def _fallback_rows(monkeypatch, count=False):
    """Fails the test if a row chunk reaches the fallback path (a per-row buffer of every
    entry above a sampled bound) where the main path's device fix-up must settle it; with
    ``count``, lets it run and returns the list of its row-chunk sizes."""
    from sae_sparse.triton import encode
    calls, real = [], encode._encode_append

    def spy(xc, *a, **k):
        if not count:
            raise AssertionError("a row chunk reached the fallback path")
        calls.append(xc.shape[0])
        return real(xc, *a, **k)
    monkeypatch.setattr(encode, "_encode_append", spy)
    return calls


def _encode_matches_reference(t, k, *, b_pre=False, threshold=False):
    """The triton encode (fp32) of a make_case case against the fp64 torch backend: the same
    indices and overflow count, values within 1e-4."""
    ts = [t["x"], t["W_enc"], t["b_enc"], t["b_pre"] if b_pre else None,
          t["threshold"] if threshold else None]
    f = lambda u: u.float().to(DEVICE) if u is not None else None  # noqa: E731
    kw = dict(return_overflow=True)
    v, i, n = topk_encode(*map(f, ts[:3]), k, b_pre=f(ts[3]), threshold=f(ts[4]),
                          backend="triton", **kw)
    v0, i0, n0 = topk_encode(*ts[:3], k, b_pre=ts[3], threshold=ts[4], backend="torch", **kw)
    assert torch.equal(i.cpu(), i0) and int(n) == int(n0)
    assert_close(v.cpu(), v0, rtol=1e-4, atol=1e-5, name="values")


def test_triton_encode_redoes_rows_a_tile_could_hide(monkeypatch):
    """Seven equal latents in each of two tiles: more top entries in a tile than the 4 the
    kernel keeps per tile. The row is settled on the device by recomputing the flagged tiles;
    ties go to the smaller index. (Sizes follow
    the tile width, which differs between the interpreter and a GPU.)"""
    from sae_sparse import triton as _triton
    _fallback_rows(monkeypatch)
    monkeypatch.setitem(_triton.ENCODE, "top_m", 4)
    D, k = 16, 11
    BS = _enc._blocks(D)[1]
    S, g = 12 * BS + 16, 2 * BS + 10  # the second group sits inside tile 2
    W = torch.randn(S, D) / 4
    W[1:7] = W[0]
    W[g:g + 7] = 0.9 * W[0]
    x = torch.randn(3, D)
    x[0] = 10 * W[0]
    b = torch.zeros(S)
    v, i = topk_encode(x.to(DEVICE), W.to(DEVICE), b.to(DEVICE), k, backend="triton")
    assert i[0].tolist() == [0, 1, 2, 3, 4, 5, 6, g, g + 1, g + 2, g + 3]
    v0, i0 = topk_encode(x.double(), W.double(), b.double(), k, backend="torch")
    assert torch.equal(i.cpu(), i0)
    assert_close(v.cpu(), v0, rtol=1e-5, atol=1e-5, name="values")


@pytest.mark.parametrize("top_m", [1, 2])
@pytest.mark.parametrize("threshold", [False, True])
def test_triton_encode_device_fixup_settles_many_tiles(monkeypatch, top_m, threshold):
    """With 1-2 candidates per tile nearly every row has several flagged tiles; the device
    fix-up recomputes them one by one (skipping those the rising k-th value clears) and must
    reproduce the fp64 top-k and overflow exactly, with no row left for the host."""
    from sae_sparse import triton as _triton
    _fallback_rows(monkeypatch)
    monkeypatch.setitem(_triton.ENCODE, "top_m", top_m)
    N, D, k = 9, 21, 7
    S = 31 * _enc._blocks(D)[1] + 5  # 32 tiles (997 latents in the interpreter)
    t = make_case(N, D, S, k, b_pre=True, threshold=threshold)
    _encode_matches_reference(t, k, b_pre=True, threshold=threshold)


@pytest.mark.parametrize("top_m", [None, 1])
@pytest.mark.parametrize("threshold", [False, True])
@pytest.mark.quick_ids("True-1")
def test_triton_encode_latent_chunks(monkeypatch, top_m, threshold):
    """A dictionary too wide for one select (a small max_candidates here; S > 262144 at
    k=32 on a GPU) is encoded in latent chunks whose device-settled top-k lists are merged:
    exact against fp64, overflow included, with no row left for the host."""
    from sae_sparse import triton as _triton
    _fallback_rows(monkeypatch)
    monkeypatch.setitem(_triton.ENCODE, "max_candidates", 16 if top_m else 64)
    monkeypatch.setitem(_triton.ENCODE, "buffer_bytes", 1)  # and row chunks
    if top_m:  # one candidate per tile: most rows need the fix-up in several chunks
        monkeypatch.setitem(_triton.ENCODE, "top_m", top_m)
        # 133 rows: two row chunks of >= 128 (the fix-up-heavy variant: a few rows, it is slow
    # in the interpreter)
    N, D, k = (12 if top_m else 133), 17, 5
    S = 31 * _enc._blocks(D)[1] + 8  # 32 tiles (1000 latents in the interpreter)
    plan = _enc._plan(k if threshold else k + 1, S, D)
    assert plan is not None and len(plan[1]) >= 2
    t = make_case(N, D, S, k, b_pre=True, threshold=threshold)
    _encode_matches_reference(t, k, b_pre=True, threshold=threshold)


def test_triton_encode_fixup_takes_every_flagged_row(monkeypatch):
    """With one candidate per tile every row is flagged; the fix-up (one program per row the
    list can hold) settles all 9 on the device, none left to the host; exact."""
    from sae_sparse import triton as _triton
    _fallback_rows(monkeypatch)
    monkeypatch.setitem(_triton.ENCODE, "top_m", 1)
    N, D, k = 9, 21, 4
    S = 31 * _enc._blocks(D)[1] + 5
    _encode_matches_reference(make_case(N, D, S, k), k)


def test_triton_encode_all_ties_row(monkeypatch):
    """A zero row with a zero bias ties every latent (every tile flagged); the device fix-up
    recomputes them all and the smallest indices win."""
    _fallback_rows(monkeypatch)
    D, S, k = 16, 500, 6
    W = torch.randn(S, D) / 4
    x = torch.randn(4, D)
    x[2] = 0
    v, i, n = topk_encode(x.to(DEVICE), W.to(DEVICE), torch.zeros(S, device=DEVICE), k,
                          backend="triton", return_overflow=True)
    assert i[2].tolist() == list(range(k)) and (v[2] == 0).all()
    v0, i0, n0 = topk_encode(x.double(), W.double(), torch.zeros(S).double(), k,
                             backend="torch", return_overflow=True)
    assert torch.equal(i.cpu(), i0) and int(n) == int(n0)
    assert_close(v.cpu(), v0, rtol=1e-5, atol=1e-5, name="values")


@pytest.mark.parametrize("path", ["main", "fallback"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.quick_ids("dtype0-main", "dtype1-fallback")
def test_triton_encode_nonfinite_rows_come_back_nan(monkeypatch, path, dtype):
    """No host check: a row of x - b_pre with a NaN or inf (also a difference of finite
    values that overflows the dtype, and a bad entry past the kernel's first 1024 columns)
    comes back with NaN values and in-range indices 0..k-1, no overflow; every other row is
    exact, across row chunks (the last chunk holds a bad row), on the main path and the
    fallback (small S: every entry a candidate)."""
    from sae_sparse import triton as _triton
    monkeypatch.setitem(_triton.ENCODE, "buffer_bytes", 1)  # 128-row chunks (main path)
    N, D, k = 140, 1030, 4
    S = 300 if path == "main" else 9
    if path == "main":
        _fallback_rows(monkeypatch)
    big = torch.finfo(dtype).max
    W = (torch.randn(S, D) / 40).to(dtype)
    b = (torch.randn(S) / 10).to(dtype)
    bp = (torch.randn(D) / 10).to(dtype)
    bp[9] = -big
    x = torch.randn(N, D).to(dtype)
    x[1, 7] = float("nan")
    x[3, 1029] = float("inf")
    x[130, 9] = big  # finite, but x - b_pre overflows (row 130: the second row chunk)
    v, i, n = encode_rows(x.to(DEVICE), W.to(DEVICE), b.to(DEVICE), k, b_pre=bp.to(DEVICE),
                          backend="triton")
    xc = x - bp  # what the kernels read, rounded to x's dtype
    bad = ~torch.isfinite(xc).all(1)
    assert bad.nonzero().reshape(-1).tolist() == [1, 3, 130]
    assert torch.isnan(v.cpu()[bad]).all() and not torch.isnan(v.cpu()[~bad]).any()
    assert i.cpu()[bad].tolist() == [list(range(k))] * 3 and not n.cpu()[bad].any()
    v0, i0, n0 = encode_rows(xc[~bad].double(), W.double(), b.double(), k, backend="torch")
    assert torch.equal(i.cpu()[~bad], i0) and torch.equal(n.cpu()[~bad], n0)
    assert_close(v.cpu()[~bad].double(), v0, rtol=1e-2 if dtype != torch.float32 else 1e-4,
                 atol=1e-3, name="values")


_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero",
             "aten::equal", "aten::masked_select", "aten::repeat_interleave", "aten::_unique2",
             "aten::unique_consecutive", "aten::unique_dim"}


class _SyncCounter(TorchDispatchMode):
    """Records the aten ops that make the host wait for the device (a value read back, an
    output size that depends on data, a boolean-mask index)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        masks = args[1] if name.startswith("aten::index") and len(args) > 1 else ()
        if name in _SYNC_OPS or any(isinstance(m, torch.Tensor) and m.dtype == torch.bool
                                    for m in (masks if isinstance(masks, (list, tuple)) else ())):
            self.syncs.append(name)
        return func(*args, **(kwargs or {}))


from sae_sparse.doctor import GPU_SHAPES  # noqa: E402 (N, D, S, k) of shapes A-D


def _stub_encode_kernels(monkeypatch):
    """Every encode kernel replaced by a no-op launch, on an H100's 132 SMs: for allocation
    plans."""

    class Stub:  # kernel[grid](*args)
        def __getitem__(self, grid):
            return lambda *a, **kw: None

    for name in ("_encode_top_kernel", "_select_top_kernel", "_settle_kernel",
                 "_encode_kernel", "_select_kernel"):
        monkeypatch.setattr(_enc, name, Stub())
    monkeypatch.setattr(_enc, "sm_count", lambda device: 132)


@pytest.mark.parametrize("shape", "ABCD")
def test_triton_encode_memory_plan_at_the_gpu_shapes(monkeypatch, shape):
    """The encode's extra memory at shapes A-D of the GPU issue (bf16, with and without
    b_pre; outputs included) stays within the issue's 64 MiB, as the host code plans it for
    an H100: every kernel stubbed (their outputs are not looked at), the launchers' GPU
    configuration, and the bytes of every tensor allocated counted while it lives
    (helpers.LiveBytes). It was 96 MiB at C when the finite-row check ran torch.isfinite
    (N x D temporaries), and x - b_pre took N x D more outside the row chunks' budget."""
    from sae_sparse import triton as _triton
    _stub_encode_kernels(monkeypatch)
    N, D, S, k = GPU_SHAPES[shape]
    x = torch.zeros(N, D, dtype=torch.bfloat16)
    W = torch.empty(S, D, dtype=torch.bfloat16)
    b, b_pre = torch.zeros(S, dtype=torch.bfloat16), torch.zeros(D, dtype=torch.bfloat16)
    assert _enc._plan(k + 1, S, D) is not None  # the main path, not the fallback
    for bp in (None, b_pre):
        mode = LiveBytes(x, W, b, b_pre)
        with mode:
            out = _triton.topk_encode(x, W, b, k, bp, None)
        assert out[0].shape == (N, k)
        assert mode.peak <= 64 << 20, (shape, bp is not None, mode.peak / 2 ** 20)
        assert mode.peak >= 2 ** 20 * (N * k * 10 / 2 ** 20)  # it saw the outputs


@pytest.mark.parametrize("S,k", [(3000, 384), (40000, 2048)])
def test_triton_encode_fallback_memory_plan(monkeypatch, S, k):
    """A k too large for per-tile candidates (the fallback path; here AuxK's k_aux = D // 2
    over 3000 dead latents, and k = 2048 over 40000) keeps its candidate buffer to row
    chunks of ENCODE["buffer_bytes"]: beyond the outputs, at most that budget plus one
    chunk's keys, where it was N x S int64 keys (197 MB at S = 3000), or 1 GiB of them
    with a sample at S = 40000."""
    from sae_sparse import triton as _triton
    _stub_encode_kernels(monkeypatch)
    N, D = 8192, 768
    x = torch.zeros(N, D, dtype=torch.bfloat16)
    W = torch.empty(S, D, dtype=torch.bfloat16)
    b, b_pre = torch.zeros(S, dtype=torch.bfloat16), torch.zeros(D, dtype=torch.bfloat16)
    assert _enc._plan(k + 1, S, D) is None  # the fallback
    rows = _enc._append_rows(k + 1, S, D, 2)
    assert rows < N  # more than one chunk
    outputs = N * k * (4 + 8 + 2) + N * 3  # fp32 values, indices, bf16 values, int8 flags
    for bp in (None, b_pre):
        mode = LiveBytes(x, W, b, b_pre)
        with mode:
            out = _triton.topk_encode(x, W, b, k, bp, None)
        assert out[1].shape == (N, k)
        extra = mode.peak - outputs
        assert extra <= _triton.ENCODE["buffer_bytes"] + rows * (k + 1) * 8, extra / 2 ** 20
        assert mode.peak < N * S * 8 / 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("key32", [True, False])
@pytest.mark.parametrize("spread", [True, False])
@pytest.mark.parametrize("jumprelu", [False, True])
def test_triton_encode_low_precision_rounding(monkeypatch, dtype, key32, spread, jumprelu):
    """bf16/fp16 values are the fp32 pre-activations correctly rounded to the dtype, also when
    int32 keys (ENCODE["key32"]) rank them rounded to odd: a sum above a rounding midpoint by
    less than the bits the key drops rounds up, an exact midpoint to even; a JumpReLU
    threshold keeps an entry above it by such a margin and drops one equal to it; and two
    entries agreeing to 17+ significant bits tie under key32 (smaller index first). Crafted
    sums of powers of two, exact in fp32; spread: one latent per tile (the epilogue's
    candidates), else all in tile 0 (settled by the device fix-up)."""
    from sae_sparse import triton as _triton
    _fallback_rows(monkeypatch)
    monkeypatch.setitem(_triton.ENCODE, "key32", key32)
    BS = _enc._blocks(3)[1]
    u, tiny = 2.0 ** -(7 if dtype == torch.bfloat16 else 10), 2.0 ** -21
    rows = [  # (W row: three powers of two, their exact sum); the dtype's ulp at 2^e is u 2^e
        ([8, 4 * u, 8 * tiny], 8 + 4 * u + 8 * tiny),  # just above a midpoint: rounds up
        ([4, 2 * u, 0], 4 + 2 * u),  # a midpoint: to even (down)
        ([2, 2 * u, u], 2 + 3 * u),  # a midpoint: to even (up)
        ([1, tiny / 2, 0], 1 + tiny / 2),  # with the next: a tie under key32
        ([1, tiny, 0], 1 + tiny),
        ([0.5, tiny / 4, 0], 0.5 + tiny / 4),  # JumpReLU threshold 0.5: kept
        ([0.5, 0, 0], 0.5),  # JumpReLU threshold 0.5: dropped
    ]
    k = len(rows)
    S = 12 * BS + 5
    pos = [j * BS + 1 + j for j in range(k)] if spread else [2 * j + 1 for j in range(k)]
    W = torch.zeros(S, 3, dtype=torch.float64)
    W[:, 0] = torch.rand(S, dtype=torch.float64) * 0.2 - 0.1  # filler below every crafted row
    for p_, (w, _) in zip(pos, rows):
        W[p_] = torch.tensor(w, dtype=torch.float64)
    thr = None
    if jumprelu:
        thr = torch.zeros(S, dtype=dtype, device=DEVICE)
        thr[pos[5]] = thr[pos[6]] = 0.5
    x = torch.ones(2, 3, dtype=dtype, device=DEVICE)
    v, i = topk_encode(x, W.to(DEVICE, dtype), torch.zeros(S, dtype=dtype, device=DEVICE), k,
                       threshold=thr, backend="triton")
    order = [0, 1, 2, 3, 4, 5, 6] if key32 else [0, 1, 2, 4, 3, 5, 6]
    exact = torch.tensor([rows[j][1] for j in order], dtype=torch.float64)
    if jumprelu:
        exact[6] = 0.0  # pre == threshold is not > threshold
    assert (W[pos, 0] + W[pos, 1] + W[pos, 2]).tolist() == [r[1] for r in rows]  # exact sums
    assert i.cpu().tolist() == [[pos[j] for j in order]] * 2
    want = exact.to(dtype)  # rounded once, to nearest even
    assert want[0] == 8 + 8 * u and want[1] == 4 and want[2] == 2 + 4 * u  # up, down, up
    assert torch.equal(v.cpu(), want.expand(2, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threshold", [False, True])
@pytest.mark.parametrize("variant", ["main", "fixup", "chunks", "append"])
@pytest.mark.quick_ids("main-False-dtype0", "fixup-True-dtype1", "append-False-dtype1")
def test_triton_encode_key32_matches_exact_keys(monkeypatch, dtype, threshold, variant):
    """On random bf16/fp16 inputs (no near-ties at 2^-16) the int32-key encode returns the
    same values bit for bit, the same indices and the same overflow as exact fp32 keys, on
    each path: the main epilogue, the device fix-up (one candidate per tile), latent chunks,
    and the fallback's append pass."""
    from sae_sparse import triton as _triton
    if variant in ("fixup", "chunks"):
        monkeypatch.setitem(_triton.ENCODE, "top_m", 1)
        if variant == "chunks":
            monkeypatch.setitem(_triton.ENCODE, "max_candidates", 16)
    if variant == "append":
        monkeypatch.setattr(_enc, "_plan", lambda *a: None)
    N, D, k = 8, 40, 6
    S = (31 if variant == "chunks" else 15) * _enc._blocks(D)[1] + 7
    if variant == "chunks":
        assert len(_enc._plan(k if threshold else k + 1, S, D)[1]) == 2
    t = on(make_case(N, D, S, k, b_pre=True, threshold=threshold), dtype)
    args = (t["x"], t["W_enc"], t["b_enc"], k)
    kw = dict(b_pre=t["b_pre"], threshold=t.get("threshold") if threshold else None,
              backend="triton", return_overflow=True)
    out = {}
    for key32 in (True, False):
        monkeypatch.setitem(_triton.ENCODE, "key32", key32)
        with torch.no_grad():
            out[key32] = topk_encode(*args, **kw)
    (v1, i1, n1), (v0, i0, n0) = out[True], out[False]
    assert torch.equal(i1, i0) and int(n1) == int(n0)
    assert torch.equal(v1, v0)
    assert (v1 > 0).any()


@pytest.mark.parametrize("path", ["top", "append"])
@pytest.mark.quick_ids("top")
def test_triton_encode_row_chunks_and_paths(monkeypatch, path):
    """Rows split into chunks (a small buffer budget) on both encode paths, against fp64."""
    from sae_sparse import triton as _triton
    monkeypatch.setitem(_triton.ENCODE, "buffer_bytes", 1)
    calls = _fallback_rows(monkeypatch, count=True)
    if path == "append":  # too few candidates per tile for k: every row takes the fallback
        monkeypatch.setitem(_triton.ENCODE, "top_m", 1)
    N, D, S, k = 260, 24, 256, 5
    t = make_case(N, D, S, k, b_pre=True)
    v, i = topk_encode(t["x"].float().to(DEVICE), t["W_enc"].float().to(DEVICE),
                       t["b_enc"].float().to(DEVICE), k, b_pre=t["b_pre"].float().to(DEVICE),
                       backend="triton")
    v0, i0 = topk_encode(t["x"], t["W_enc"], t["b_enc"], k, b_pre=t["b_pre"], backend="torch")
    assert torch.equal(i.cpu(), i0)
    assert_close(v.cpu(), v0, rtol=1e-4, atol=1e-5, name="values")
    if path == "append":  # the fallback's own row chunks: 256 rows at least, then the rest
        assert calls == [256, 4], calls


@pytest.mark.parametrize("rlow", [0, 31])
def test_triton_select_by_tile_matches_a_topk_over_all_candidates(rlow):
    """_select_top_kernel on crafted candidate lists (TOPM per tile, descending, in the
    epilogue's int64 or int32 form, latents from COL0 = 1000): picking the KOUT tiles with the
    largest maxima and selecting among their candidates (BY_TILE) gives what a top-k over all
    candidates gives -- keys and flagged-tile counts -- with random values,
    many ties across tiles, an all-equal row, a row whose top entries fill one tile, an
    all-negative row, and a row with fewer real tiles than KOUT (the others hold only the
    empty key, as a NaN row's tiles do: they must not be read through)."""
    g = torch.Generator().manual_seed(5)
    N, NT, TOPM, BS, KOUT, COL0 = 7, 40, 3, 32, 9, 1000
    v = torch.randn(N, NT, TOPM, generator=g)
    v[1] = torch.randint(0, 4, (NT, TOPM), generator=g).float()  # ties across tiles
    v[2] = 0.5  # every candidate equal
    v[3, 7] = 100 + torch.arange(TOPM).float()  # tile 7 holds the row's 3 largest
    v[4] = -v[4].abs() - 1
    v = v.bfloat16().float()  # low 16 bits zero: the int32 form drops none of them
    local = torch.stack([torch.randperm(BS, generator=g)[:TOPM] for _ in range(N * NT)])
    col = COL0 + torch.arange(NT)[None, :, None] * BS + local.view(N, NT, TOPM)
    bits = v.view(torch.int32).long()
    hi = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    keys = (hi << 32) | (0xFFFFFFFF - col)
    keys = keys.sort(dim=2, descending=True).values  # each tile's candidates, descending
    empty = torch.zeros(N, NT, TOPM, dtype=torch.bool)
    empty[6, 2:] = True  # row 6: 2 real tiles, 6 real candidates
    keys[empty] = torch.iinfo(torch.long).min
    if rlow:  # the int32 form: value bits with the reversed tile column in the low bits
        c = keys >> 32
        loc = (0xFFFFFFFF - (keys & 0xFFFFFFFF)) - COL0 - torch.arange(NT)[None, :, None] * BS
        cand = ((c & ~rlow) | (rlow - loc)).to(torch.int32)
        cand[empty] = -2 ** 31
    else:
        cand = keys
    L = NT * TOPM
    cand = cand.reshape(N, L).to(DEVICE)
    want = torch.topk(keys.reshape(N, L), KOUT, dim=1).values
    kth = want[:, -1:]
    want_bad = (keys[:, :, -1] >= kth).sum(1)
    assert want_bad[3] >= 1 and want_bad[2] == KOUT // TOPM  # flagged tiles are there
    KP = _enc.p2(KOUT, 2)
    assert _enc._by_tile(KOUT, NT, TOPM, _enc.p2(L))
    for by_tile in (True, False):
        out = torch.full((N, KOUT), 7, dtype=torch.long, device=DEVICE)  # poisoned
        bad = torch.full((N,), -1, dtype=torch.int32, device=DEVICE)
        fin = torch.empty(N, dtype=torch.int8, device=DEVICE)
        _enc._select_top_kernel[(N,)](cand, out, bad, cand, fin, L, KOUT, NT, 1, COL0,
                                      BLOCK=_enc.p2(L), KP=KP, TOPM=TOPM,
                                      BLOCK_T=_enc.p2(NT), BLOCK_S=BS, RLOW=rlow,
                                      BY_TILE=by_tile, CHECK_FIN=False, BLOCK_D=16,
                                      num_warps=1)
        assert torch.equal(out.cpu(), want), by_tile
        assert torch.equal(bad.cpu().long(), want_bad), by_tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R,S,D", [(1, 1, 1), (17, 1001, 33), (70, 257, 70)])
def test_triton_folds_match_float64(dtype, R, S, D):
    """fold (A @ W: the edit's M = W_out W_dec and c = bias W_dec, in fp32; its latents split
    across programs, here 2-8 partial sums), fold_t (G @ W^T, its backward) and fold_w (A^T G,
    the gradient for W, rounded once to W's dtype) against float64 on odd shapes, R = 70
    spanning several row blocks. Bound: an fp32 sum of n exact-ish
    products, in any order, is off by at most ~n * 2^-21 of sum |a w| (3xTF32 on a GPU)."""
    from sae_sparse import triton as _triton
    g = torch.Generator().manual_seed(R + S + D)
    A = torch.randn(R, S, generator=g).to(dtype)
    W = torch.randn(S, D, generator=g).to(dtype)
    G = torch.randn(R, D, generator=g)
    out = _triton.fold(A.to(DEVICE), W.to(DEVICE))
    ref = A.double() @ W.double()
    bound = (S + 4) * 2.0 ** -21 * (A.double().abs() @ W.double().abs())
    assert out.dtype == torch.float32 and out.shape == (R, D)
    assert ((out.cpu().double() - ref).abs() <= bound).all()
    out_t = _triton.fold_t(G.to(DEVICE), W.to(DEVICE))
    ref_t = G.double() @ W.double().T
    bound_t = (D + 4) * 2.0 ** -21 * (G.double().abs() @ W.double().abs().T)
    assert out_t.dtype == torch.float32 and out_t.shape == (R, S)
    assert ((out_t.cpu().double() - ref_t).abs() <= bound_t).all()
    out_w = _triton.fold_w(A.to(DEVICE), G.to(DEVICE))  # rounded once to the dtype
    ref_w = A.double().T @ G.double()
    bound_w = ((R + 4) * 2.0 ** -21 * (A.double().abs().T @ G.double().abs())
               + torch.finfo(dtype).eps * ref_w.abs())
    assert out_w.dtype == dtype and out_w.shape == (S, D)
    assert ((out_w.cpu().double() - ref_w).abs() <= bound_w).all()
    # an fp32 A (an fp32 adapter on a bf16/fp16 SAE) against W in its own dtype, no casts
    out32 = _triton.fold(A.float().to(DEVICE), W.to(DEVICE))
    assert ((out32.cpu().double() - ref).abs() <= bound).all()


def test_triton_trainable_W_dec_gets_the_folds_gradient_in_its_dtype(monkeypatch):
    """With W_dec trainable (an SAE tuned together with its adapter) the folds' share of
    dW_dec, bias^T dc + W_out^T dM, comes from one fold_w call that writes W_dec's dtype
    directly (no fp32 [S, D] product); dW_dec matches the torch backend."""
    from sae_sparse.triton import functions
    calls = []
    f = functions.fold_w
    monkeypatch.setattr(functions, "fold_w", lambda *a: calls.append(1) or f(*a))
    g = torch.Generator().manual_seed(5)
    sae = ss.SAE.random(24, 301, 5, b_pre=True, device=DEVICE, generator=g)
    ad = ss.LatentAdapter(301, 4, device=DEVICE)
    with torch.no_grad():
        ad.W_out.normal_(generator=g)
        ad.bias.normal_(generator=g)
    x = torch.randn(7, 24, device=DEVICE, generator=g)
    grads = {}
    for be in ("triton", "torch"):
        sae.zero_grad()
        ss.sae_edit(x, sae, ad, mode="replace", backend=be).square().sum().backward()
        grads[be] = sae.W_dec.grad.clone()
    assert len(calls) == 1
    assert_close(grads["triton"], grads["torch"], rtol=1e-4,
                 atol=1e-5 * grads["torch"].abs().max().item(), name="dW_dec")


def test_triton_edit_step_reads_W_dec_once_per_fold(monkeypatch):
    """An edit step on the triton backend with gain, bias and an FFN adapter folds W_out and
    bias into W_dec in one fold call (one read of W_dec) and takes their gradient in one
    fold_t call -- not the torch path's chunked fp32 copies of W_dec."""
    from sae_sparse.triton import functions
    calls = []
    for name in ("fold", "fold_t"):
        f = getattr(functions, name)
        monkeypatch.setattr(functions, name,
                            lambda *a, f=f, name=name: calls.append(name) or f(*a))
    sae = ss.SAE.random(24, 300, 5, device=DEVICE)
    ad = ss.LatentAdapter(300, 4, device=DEVICE)
    with torch.no_grad():
        ad.W_out.normal_()
        ad.bias.normal_()
    x = torch.randn(6, 24, device=DEVICE)
    y = ss.sae_edit(x, sae, ad, backend="triton")
    y.square().sum().backward()
    assert calls == ["fold", "fold_t"]
    grads = [p.grad.clone() for p in (ad.W_out, ad.bias)]
    ad.zero_grad()
    y0 = ss.sae_edit(x, sae, ad, backend="torch")
    y0.square().sum().backward()
    assert_close(y, y0, rtol=1e-4, atol=1e-4, name="y")
    for got, p in zip(grads, (ad.W_out, ad.bias)):
        assert_close(got, p.grad, rtol=1e-4, atol=1e-4, name="adapter grad")
