"""Bad input gets a clear error naming the argument (or a correct result)."""
import pytest
import torch

import sae_sparse as ss
from sae_sparse import triton as _triton
from sae_sparse import edit_decode, sparse_decode, topk_encode

# CPU tensors: triton only through the interpreter
BACKENDS = [b for b in ss.available_backends() if b != "triton" or _triton.interpreting()]


def enc_args(N=4, D=8, S=30):
    return torch.randn(N, D), torch.randn(S, D), torch.randn(S)


@pytest.mark.parametrize("backend", BACKENDS)
class TestEncodeErrors:
    def test_shapes(self, backend):
        x, W, b = enc_args()
        # x and W_enc of different widths: x is named, with the width the SAE reads
        with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 5\] \(the SAE's "
                                             r"width, W_enc \[30, 5\]\), got \[4, 8\]"):
            topk_encode(x, W[:, :5], b, 3, backend=backend)
        with pytest.raises(ValueError, match=r"W_enc must have shape \[\*, 8\], got \[240\]"):
            topk_encode(x, W.reshape(-1), b, 3, backend=backend)
        with pytest.raises(ValueError, match=r"b_enc must have shape \[30\]"):
            topk_encode(x, W, b[:4], 3, backend=backend)
        with pytest.raises(ValueError, match=r"b_pre must have shape \[8\]"):
            topk_encode(x, W, b, 3, b_pre=torch.zeros(9), backend=backend)
        with pytest.raises(ValueError, match=r"threshold must have shape \[30\]"):
            topk_encode(x, W, b, 3, threshold=torch.zeros(3), backend=backend)

    def test_k_range(self, backend):
        x, W, b = enc_args()
        for k in (0, -1, 31):
            with pytest.raises(ValueError, match=r"k must be in \[1, S=30\]"):
                topk_encode(x, W, b, k, backend=backend)
        with pytest.raises(TypeError, match="k must be an int"):
            topk_encode(x, W, b, 2.0, backend=backend)

    def test_dtype_and_device(self, backend):
        x, W, b = enc_args()
        with pytest.raises(TypeError, match="W_enc must have dtype torch.float32"):
            topk_encode(x, W.double(), b, 3, backend=backend)
        with pytest.raises(TypeError, match="x must be a floating tensor"):
            topk_encode(x.long(), W, b, 3, backend=backend)
        with pytest.raises(ValueError, match="b_enc must be on cpu"):
            topk_encode(x, W, b.to("meta"), 3, backend=backend)

    def test_nan_inf(self, backend):
        """torch / cpp raise; triton makes no host sync to look and returns NaN values for
        the rows that are not finite (the others unchanged)."""
        x, W, b = enc_args()
        for bad in (float("nan"), float("inf")):
            x2 = x.clone()
            x2[1, 3] = bad
            if backend == "triton":
                v, i = topk_encode(x2, W, b, 3, backend=backend)
                assert torch.isnan(v[1]).all() and not torch.isnan(v[[0, 2]]).any()
                assert torch.equal(v[[0, 2]], topk_encode(x, W, b, 3, backend=backend)[0][[0, 2]])
                continue
            with pytest.raises(ValueError, match="x contains NaN or inf"):
                topk_encode(x2, W, b, 3, backend=backend)

    def test_empty_batch(self, backend):
        _, W, b = enc_args()
        v, i = topk_encode(torch.randn(0, 8), W, b, 3, backend=backend)
        assert v.shape == (0, 3) and i.shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_errors(backend):
    v, i, W = torch.randn(4, 3), torch.randint(0, 30, (4, 3)), torch.randn(30, 8)
    with pytest.raises(ValueError, match=r"indices must have the shape of values \[4, 3\]"):
        sparse_decode(v, i[:, :2], W, backend=backend)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, S=30\)"):
        sparse_decode(v, i + 30, W, backend=backend)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, S=30\)"):
        sparse_decode(v, i - 30, W, backend=backend)
    with pytest.raises(TypeError, match="indices must be int64"):
        sparse_decode(v, i.float(), W, backend=backend)
    with pytest.raises(ValueError, match=r"b_dec must have shape \[8\]"):
        sparse_decode(v, i, W, torch.zeros(7), backend=backend)
    with pytest.raises(ValueError, match=r"gain must have shape \[30\]"):
        edit_decode(torch.randn(4, 8), v, i, W, gain=torch.zeros(29), backend=backend)
    with pytest.raises(ValueError, match=r"W_out must have shape \[5, 30\]"):
        edit_decode(torch.randn(4, 8), v, i, W, W_in=torch.zeros(30, 5),
                    W_out=torch.zeros(4, 30), backend=backend)
    with pytest.raises(ValueError, match=r"x must have shape \[4, 8\]"):
        edit_decode(torch.randn(4, 9), v, i, W, backend=backend)
    with pytest.raises(ValueError, match="mode must be one of"):
        edit_decode(torch.randn(4, 8), v, i, W, mode="add", backend=backend)
    with pytest.raises(ValueError, match="activation must be one of"):
        edit_decode(torch.randn(4, 8), v, i, W, activation="tanh", backend=backend)


def test_backend_selection(monkeypatch):
    x, W, b = enc_args()
    with pytest.raises(ValueError, match="backend must be one of"):
        topk_encode(x, W, b, 3, backend="fortran")
    monkeypatch.setenv(ss.BACKEND_ENV_VAR, "nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        topk_encode(x, W, b, 3)
    monkeypatch.setenv(ss.BACKEND_ENV_VAR, "torch")
    v, i = topk_encode(x, W, b, 3)
    v2, i2 = topk_encode(x, W, b, 3, backend="torch")
    assert torch.equal(i, i2)


def test_default_backend_for_cuda_tensors(monkeypatch):
    """backend=None on CUDA picks triton, except for float64, which its kernels do not take
    (resolve() only looks at the device type and dtype, so this runs without a GPU)."""
    from sae_sparse import triton as _triton, backends
    monkeypatch.delenv(ss.BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(_triton, "supports", lambda device: device.type == "cuda")
    cuda = torch.device("cuda")
    assert backends.resolve(None, cuda, torch.bfloat16) == "triton"
    assert backends.resolve(None, cuda, torch.float32) == "triton"
    assert backends.resolve(None, cuda, torch.float64) == "torch"
    with pytest.raises(TypeError, match="triton backend takes fp32/bf16/fp16"):
        _triton.topk_encode(*(torch.zeros(1, 1, dtype=torch.float64),) * 3, 1, None, None)


def test_module_errors():
    with pytest.raises(ValueError, match=r"W_dec must have shape \[20, 6\]"):
        ss.SAE(torch.randn(20, 6), torch.zeros(20), torch.randn(6, 20), torch.zeros(6), 3)
    with pytest.raises(ValueError, match=r"k must be in \[1, S=20\]"):
        ss.SAE(torch.randn(20, 6), torch.zeros(20), torch.randn(20, 6), torch.zeros(6), 21)
    with pytest.raises(ValueError, match="activation must be one of"):
        ss.LatentAdapter(20, activation="tanh")
    with pytest.raises(ValueError, match="does not match sae.d_sae"):
        ss.sae_edit(torch.randn(2, 6), ss.SAE.random(6, 20, 3), ss.LatentAdapter(21))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 6\] \(the SAE's width"):
        ss.sae_edit(torch.randn(2, 7), ss.SAE.random(6, 20, 3), ss.LatentAdapter(20))
