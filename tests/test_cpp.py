"""The cpp backend against the torch reference: forward, every gradient, odd shapes."""
import pytest
import torch

import sae_sparse as ss
from sae_sparse import reference as R, sparse_decode, topk_encode

from helpers import assert_close, full_op, grads_of, make_case

pytestmark = pytest.mark.skipif("cpp" not in ss.available_backends(),
                                reason="C++ extension not built")

SHAPES = [
    pytest.param(7, 33, 1000, 7, id="N7-D33-S1000-k7"),
    pytest.param(1, 33, 1000, 7, id="N1-D33-S1000-k7"),
    pytest.param(3, 19, 61, 61, id="N3-D19-S61-kS"),
    pytest.param(130, 24, 4500, 9, id="N130-D24-S4500-k9"),  # >1 row block and >1 latent tile
]


@pytest.mark.parametrize("N,D,S,k", SHAPES)
@pytest.mark.parametrize("variant", ["plain", "bpre", "tied", "jumprelu"])
@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_cpp_matches_reference_fp64(N, D, S, k, variant, mode):
    t = make_case(N, D, S, k, b_pre=variant in ("bpre", "tied"), tied=variant == "tied",
                  threshold=variant == "jumprelu")
    v1, i1, y1, n1 = full_op(t, k, mode, "gelu", "cpp", overflow=True)
    v0, i0, y0, n0 = full_op(t, k, mode, "gelu", "torch", overflow=True)
    assert torch.equal(i1, i0) and n1 == n0
    assert_close(v1, v0, rtol=1e-12, atol=1e-12, name="values")
    assert_close(y1, y0, rtol=1e-12, atol=1e-12, name="y")
    g1, g0 = grads_of(y1, t), grads_of(y0, t)
    assert set(g1) == set(g0)
    for n in g0:
        assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12, name=n)


@pytest.mark.parametrize("kinds", ["gain", "bias", "ffn", "gain+bias"])
@pytest.mark.parametrize("activation", ["relu", "identity"])
@pytest.mark.parametrize("mode", ["delta", "replace"])
def test_cpp_adapter_kinds_fp64(kinds, activation, mode):
    N, D, S, k = 5, 21, 300, 6
    t = make_case(N, D, S, k, b_pre=True, gain="gain" in kinds, bias="bias" in kinds,
                  ffn="ffn" in kinds, h=3)
    _, _, y1 = full_op(t, k, mode, activation, "cpp")
    _, _, y0 = full_op(t, k, mode, activation, "torch")
    assert_close(y1, y0, rtol=1e-12, atol=1e-12, name="y")
    g1, g0 = grads_of(y1, t), grads_of(y0, t)
    for n in g0:
        assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12, name=n)


def test_cpp_encode_overflow_matches_dense():
    N, D, S, k = 40, 16, 300, 5
    for threshold, shift in ((False, 2.1), (True, 1.3)):
        t = make_case(N, D, S, k, threshold=threshold)
        t["b_enc"] = (t["b_enc"].detach() - shift).requires_grad_()  # about k actives per row
        _, _, n1 = topk_encode(t["x"], t["W_enc"], t["b_enc"], k, threshold=t.get("threshold"),
                               backend="cpp", return_overflow=True)
        _, _, over = R.dense_topk_encode(t["x"], t["W_enc"], t["b_enc"], k,
                                         threshold=t.get("threshold"))
        assert 0 < int(over.sum()) < N  # the case exercises both outcomes
        assert int(n1) == int(over.sum())


def test_cpp_ties_break_to_smaller_index():
    D, S, k = 8, 3000, 10
    W = torch.randn(S, D, dtype=torch.float32) / 4
    W[1200] = W[7]  # exact duplicate latents
    W[2500] = W[7]
    b = torch.zeros(S)
    x = (W[7] * 10).unsqueeze(0).repeat(3, 1)  # latents 7, 1200, 2500 tie at the top
    v, i = topk_encode(x, W, b, k, backend="cpp")
    assert i[0, :3].tolist() == [7, 1200, 2500]
    W0 = torch.zeros(S, D)
    v, i = topk_encode(torch.randn(2, D), W0, torch.zeros(S), k, backend="cpp")  # all tie
    assert torch.equal(i, torch.arange(k).expand(2, k))
    assert torch.equal(v, torch.zeros(2, k))


@pytest.mark.parametrize("N,D,S,k", [
    pytest.param(64, 48, 5000, 16, id="N64-direct"),  # < 256 fp32 rows: exact fp32 tiles
    pytest.param(1, 256, 3001, 33, id="N1-direct"),
    pytest.param(300, 40, 4500, 11, id="N300-screened"),  # bf16/fp32 screening + exact pass
])
def test_cpp_fp32_near_ties(N, D, S, k):
    """fp32: a selected index that differs from the fp64 reference must be a near-tie."""
    t = make_case(N, D, S, k, dtype=torch.float32, b_pre=True)
    v, i = topk_encode(t["x"], t["W_enc"], t["b_enc"], k, b_pre=t["b_pre"], backend="cpp")
    x64 = {n: t[n].detach().double() for n in ("x", "W_enc", "b_enc", "b_pre")}
    pre = (x64["x"] - x64["b_pre"]) @ x64["W_enc"].T + x64["b_enc"]
    ref_v, ref_i = torch.topk(pre, k)
    kth = ref_v[:, -1:]
    tol = 1e-5 * (1 + pre.abs().max())
    got_pre = pre.gather(1, i)
    assert (got_pre >= kth - tol).all(), "selected a latent well below the k-th value"
    assert_close(v, got_pre.relu(), rtol=1e-5, atol=1e-5, name="values")
    assert (torch.diff(got_pre, dim=1) <= tol).all(), "values not in descending order"


@pytest.mark.parametrize("N", [1, 300], ids=["direct", "screened"])
@pytest.mark.parametrize("threshold", [False, True], ids=["topk", "jumprelu"])
def test_cpp_fp32_both_paths_match_reference_with_grads(N, threshold):
    """fp32, both encode paths: indices equal the fp64 reference, everything within 1e-4."""
    t = make_case(N, 24, 700, 6, b_pre=True, threshold=threshold)
    t32 = {n: (v.detach().float().requires_grad_(v.requires_grad)) for n, v in t.items()}
    v1, i1, y1 = full_op(t32, 6, "replace", "relu", "cpp")
    v0, i0, y0 = full_op(t, 6, "replace", "relu", "torch")
    assert torch.equal(i1, i0)
    assert_close(v1, v0, rtol=1e-4, atol=1e-5, name="values")
    assert_close(y1, y0, rtol=1e-4, atol=1e-4, name="y")
    g1, g0 = grads_of(y1, t32), grads_of(y0, t)
    for n in g0:
        assert_close(g1[n], g0[n], rtol=1e-3, atol=1e-4, name=n)
    _, _, n1 = topk_encode(t32["x"], t32["W_enc"], t32["b_enc"], 6, b_pre=t32["b_pre"],
                           threshold=t32.get("threshold"), backend="cpp", return_overflow=True)
    _, _, n0 = topk_encode(t["x"], t["W_enc"], t["b_enc"], 6, b_pre=t["b_pre"],
                           threshold=t.get("threshold"), backend="torch", return_overflow=True)
    assert int(n1) == int(n0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_low_precision_inputs(dtype):
    t = make_case(8, 32, 700, 8, dtype=dtype, b_pre=True)
    v1, i1, y1 = full_op(t, 8, "replace", "relu", "cpp")
    v0, i0, y0 = full_op(t, 8, "replace", "relu", "torch")
    assert v1.dtype == dtype and y1.dtype == dtype
    same = (i1 == i0).float().mean()
    assert same > 0.95
    assert_close(y1, y0, rtol=2e-2, atol=2e-2, name="y")
    g1, g0 = grads_of(y1, t), grads_of(y0, t)
    for n in ("W_dec", "gain", "W_out"):
        assert g1[n].dtype == dtype
        assert_close(g1[n], g0[n], rtol=5e-2, atol=5e-2, name=n)


def test_cpp_gradcheck_fp64():
    t = make_case(3, 7, 40, 4, b_pre=True, h=2)
    names = ["x", "W_enc", "b_enc", "b_pre", "W_dec", "b_dec", "gain", "bias", "W_in", "b_in",
             "W_out"]

    def f(*args):
        d = dict(zip(names, args))
        return full_op(d, 4, "replace", "gelu", "cpp")[2]

    assert torch.autograd.gradcheck(f, tuple(t[n] for n in names), eps=1e-6, atol=1e-7)

    def g(*args):
        d = dict(zip(names, args))
        return full_op(d, 4, "delta", "identity", "cpp")[2]

    assert torch.autograd.gradcheck(g, tuple(t[n] for n in names), eps=1e-6, atol=1e-7)


def test_cpp_sparse_decode_and_non_contiguous():
    W = torch.randn(50, 30, dtype=torch.float64)[:, ::2]  # non-contiguous [50, 15]
    v = torch.randn(6, 4, dtype=torch.float64).T.contiguous().T  # non-contiguous [6, 4]
    i = torch.randint(0, 50, (4, 6)).T
    b = torch.randn(15, dtype=torch.float64)
    y1 = sparse_decode(v, i, W, b, backend="cpp")
    y0 = sparse_decode(v, i, W, b, backend="torch")
    assert_close(y1, y0, rtol=1e-12, atol=1e-12, name="y")
    x = torch.randn(40, 7, dtype=torch.float64)[::2]  # non-contiguous [20, 7]
    We = torch.randn(7, 90, dtype=torch.float64).T  # non-contiguous [90, 7]
    be = torch.randn(90, dtype=torch.float64)
    v1, i1 = topk_encode(x, We, be, 5, backend="cpp")
    v0, i0 = topk_encode(x, We, be, 5, backend="torch")
    assert torch.equal(i1, i0)
    assert_close(v1, v0, rtol=1e-12, atol=1e-12, name="values")


def test_cpp_leading_dims_and_empty_batch():
    sae = ss.SAE.random(12, 80, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    v, i = sae.encode(x, backend="cpp")
    assert v.shape == (2, 3, 4) and i.shape == (2, 3, 4)
    y = ss.sae_edit(x, sae, ss.LatentAdapter(80, 3, dtype=torch.float64), backend="cpp")
    assert y.shape == x.shape
    x0 = torch.randn(0, 12, dtype=torch.float64, requires_grad=True)
    y0 = ss.sae_edit(x0, sae, None, mode="replace", backend="cpp")
    assert y0.shape == (0, 12)
    y0.sum().backward()
    assert x0.grad.shape == (0, 12)


def test_backward_is_deterministic():
    t = make_case(64, 16, 500, 8, dtype=torch.float32, b_pre=True)
    outs = []
    for _ in range(2):
        _, _, y = full_op(t, 8, "replace", "relu", "cpp")
        outs.append(grads_of(y, t))
    for n in outs[0]:
        assert torch.equal(outs[0][n], outs[1][n]), n


def test_codes_match_the_python_definition():
    """The C++ kernels' mode and activation enums (csrc/sae_sparse.h) are the codes of
    sae_sparse/codes.py, the one definition the Python and Triton sides use."""
    from sae_sparse import _cpp, codes
    assert _cpp._C.MODE_CODES == {m: i for i, m in enumerate(codes.MODES)}
    assert _cpp._C.ACT_CODES == {a: i for i, a in enumerate(codes.ACTIVATIONS)}
    schemas = {op: str(getattr(torch.ops.sae_sparse_cpu, op).default._schema)
               for op in ("topk_encode", "edit_decode_fwd", "edit_decode_bwd", "latent_csr",
                          "segment_rows")}
    assert "int act, int mode" in schemas["edit_decode_fwd"], schemas


def test_cpp_screen_bound_covers_fp32_summation_error():
    """An adversarial near-tie for the screening bound of the cpp encode (float64 inputs, fp32
    screening GEMM, exact recompute of the survivors): x·W_enc[s] for the 4 true top latents is
    1024 small terms (0.99c each) between 16 terms +2^24 and 16 terms -2^24, so an fp32
    accumulation loses the small ones (each is below half an ulp of 2^24) and the screen sees
    ~0 for them, while 20 decoys with no large terms screen exactly at ~500, below every true
    top value (≥ 590). Only the γ_D‖xs‖‖ws‖ term of the bound (fp32 summation error) keeps the
    true top latents among the survivors; without it the encode returns decoys."""
    D, n_big = 1056, 16
    small = slice(n_big, D - n_big)
    x = torch.ones(1, D, dtype=torch.float64)
    x[0, :n_big] = x[0, -n_big:] = 2.0 ** 12
    targets = [3, 11, 17, 22]
    W = torch.zeros(24, D, dtype=torch.float64)
    for j, s in enumerate(targets):
        W[s, :n_big], W[s, -n_big:] = 2.0 ** 12, -2.0 ** 12
        W[s, small] = 0.99 * (0.6 + 0.1 * j)  # true pre-activation 1024·0.99·c: 608..912
    decoys = [s for s in range(24) if s not in targets]
    for j, s in enumerate(decoys):
        W[s, small] = (500.0 - j) / 1024  # exactly ~500 in any precision
    b = torch.zeros(24, dtype=torch.float64)
    pre = x @ W.T
    assert sorted(torch.topk(pre, 4).indices[0].tolist()) == targets
    screened = (x.float() @ W.float().T).double()  # what an fp32 GEMM makes of it
    if screened[0, targets].max() >= screened[0, decoys].min():
        pytest.skip("this BLAS's fp32 GEMM kept the small terms: the case is not adversarial")
    v, i = topk_encode(x, W, b, 4, backend="cpp")
    assert i[0].tolist() == torch.topk(pre, 4).indices[0].tolist()
    assert_close(v, torch.topk(pre, 4).values, rtol=1e-7, atol=0, name="values")


def _upcast_everything(monkeypatch):
    """The cpp path as it was before the kernels read bf16 / fp16 weights: every
    low-precision input, W_enc and W_dec too, copied to fp32 first."""
    import sae_sparse.ops as ops
    lowp = ops._lowp_to_fp32
    monkeypatch.setattr(ops, "_lowp_to_fp32", lambda backend, *ts, keep=(): lowp(backend, *ts))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N,threshold", [(1, False), (300, False), (300, True)],
                         ids=["direct", "screened", "screened-jumprelu"])
def test_cpp_reads_low_precision_weights_as_stored(dtype, N, threshold, monkeypatch):
    """bf16 / fp16 W_enc and W_dec go into the kernels as stored (no fp32 copy of the
    dictionary): the selection, values, output and every gradient are those of the fp32
    copies the cpp path made before, bit for bit, on both encode paths and over a partial
    last tile (S = 4099, D = 37, k = 5); and within low-precision rounding of the fp64
    reference."""
    t = make_case(N, 37, 4099, 5, dtype=dtype, b_pre=True, threshold=threshold)
    v1, i1, y1 = full_op(t, 5, "delta", "relu", "cpp")
    g1 = grads_of(y1, t)
    with monkeypatch.context() as m:
        _upcast_everything(m)
        v0, i0, y0 = full_op(t, 5, "delta", "relu", "cpp")
        g0 = grads_of(y0, t)
    assert torch.equal(i1, i0) and torch.equal(v1, v0) and torch.equal(y1, y0)
    for n in g0:
        assert g1[n].dtype == dtype, n
        if n == "W_dec":  # two paths (the decode's rows, the folds' product) now add in
            # W_dec's own dtype, as for any low-precision parameter, not in an fp32 copy
            tol = 2 * torch.finfo(dtype).eps * float(g0[n].abs().max())
            assert_close(g1[n], g0[n], rtol=0, atol=tol, name=n)
        else:
            assert torch.equal(g1[n], g0[n]), n
    t64 = {n: v.detach().double().requires_grad_(v.requires_grad) for n, v in t.items()}
    vr, ir, yr = full_op(t64, 5, "delta", "relu", "torch")
    same = (i1 == ir).all(1)  # near-ties in fp32 vs fp64 may swap a latent in a few rows
    assert same.float().mean() > 0.95
    scale = float(yr.abs().max())  # y rounds to bf16 / fp16 twice (values, output)
    assert_close(y1[same], yr[same], rtol=0, atol=2e-2 * scale, name="y")


def test_cpp_sae_forward_reads_low_precision_weights_as_stored(monkeypatch):
    """SAE.forward (the fused encode + decode op) with a bf16 SAE: the output, code and
    every gradient of the fp32-copy path, bit for bit."""
    g = torch.Generator().manual_seed(0)
    sae = ss.SAE.random(41, 1003, 7, b_pre=True, generator=g).to(torch.bfloat16)
    x = torch.randn(70, 41, generator=g).to(torch.bfloat16)

    def run():
        sae.zero_grad()
        y, v, i = sae(x, backend="cpp", return_code=True)
        (y.float().square().sum() + v.float().sum()).backward()
        return y, v, i, {n: p.grad.clone() for n, p in sae.named_parameters()}
    y, v, i, grads = run()
    with monkeypatch.context() as m:
        _upcast_everything(m)
        y0, v0, i0, grads0 = run()
    assert torch.equal(i, i0) and torch.equal(v, v0) and torch.equal(y, y0)
    for n in grads0:
        assert torch.equal(grads[n], grads0[n]), n


def test_cpp_low_precision_dictionary_costs_no_fp32_copy(tmp_path):
    """An adapter step (encode, edit with gain + bias + ffn, backward) over a frozen bf16
    dictionary of 2^17 x 512 (128 MiB a matrix) raises the process's peak resident set by
    well under one fp32 copy of a matrix (256 MiB), in a fresh process."""
    import subprocess
    import sys
    script = tmp_path / "peak.py"
    script.write_text('''
import torch, sae_sparse as ss
torch.manual_seed(0)
S, D, N, k = 1 << 17, 512, 300, 32
W_enc = (torch.randn(S, D) / D ** 0.5).to(torch.bfloat16)
W_dec = (torch.randn(S, D) / D ** 0.5).to(torch.bfloat16)
b = torch.zeros(S, dtype=torch.bfloat16)
b_dec = torch.zeros(D, dtype=torch.bfloat16)
x = torch.randn(N, D).to(torch.bfloat16)
ad = ss.LatentAdapter(S, 4)
def step(x):
    p = {n: t.to(torch.bfloat16) for n, t in ad.edit_params().items()}
    v, i = ss.topk_encode(x, W_enc, b, k, backend="cpp")
    y = ss.edit_decode(x, v, i, W_dec, b_dec, mode="delta", backend="cpp", **p)
    y.float().square().mean().backward()
step(x[:1])
def hwm():
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
base = hwm()
step(x)
print("PEAK_MIB", (hwm() - base) / 1024)
''')
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    peak = float(r.stdout.split("PEAK_MIB")[1])
    assert peak < 128, f"the step added {peak:.0f} MiB: an fp32 copy of W is 256 MiB"
