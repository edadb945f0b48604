"""SAE file formats: files written in each format's own layout load into the canonical SAE."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sae_sparse as ss
from sae_sparse.io import detect_format, load_sae, save_saelens, save_sparsify

D, S, K = 12, 40, 5


def raw(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(W_enc=torch.randn(S, D, generator=g), b_enc=torch.randn(S, generator=g),
                W_dec=torch.randn(S, D, generator=g), b_dec=torch.randn(D, generator=g),
                threshold=torch.rand(S, generator=g))


def check_same_function(sae, t, *, b_pre, threshold):
    x = torch.randn(7, D)
    want_v, want_i, _ = ss.reference.dense_topk_encode(
        x.double(), t["W_enc"].double(), t["b_enc"].double(), sae.k,
        t["b_dec"].double() if b_pre else None, t["threshold"].double() if threshold else None)
    v, i = sae.encode(x, backend="torch")
    assert torch.equal(i, want_i)
    torch.testing.assert_close(v.double(), want_v, rtol=1e-5, atol=1e-5)
    assert torch.equal(sae.W_dec.detach(), t["W_dec"])


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "standard"])
@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_saelens(tmp_path, arch, apply_b_dec):
    t = raw()
    w = {"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"],
         "b_dec": t["b_dec"]}
    if arch == "jumprelu":
        w["threshold"] = t["threshold"]
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": D, "d_sae": S, "apply_b_dec_to_input": apply_b_dec,
           "metadata": {"hook_name": "blocks.3.hook_resid_post", "neuronpedia_id": "x/3-res"}}
    if arch == "topk":
        cfg["activation_fn_kwargs"] = {"k": K}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert detect_format(str(tmp_path)) == "saelens"
    if arch != "topk":
        with pytest.raises(ValueError, match="pass k="):
            load_sae(str(tmp_path))
    sae = load_sae(str(tmp_path), k=None if arch == "topk" else K)
    assert sae.k == K and sae.tied_b_pre == apply_b_dec
    assert (sae.threshold is not None) == (arch == "jumprelu")
    assert sae.format_info["hook_name"] == "blocks.3.hook_resid_post"
    assert sae.format_info["neuronpedia_id"] == "x/3-res"
    check_same_function(sae, t, b_pre=apply_b_dec, threshold=arch == "jumprelu")
    # round trip
    save_saelens(sae, str(tmp_path / "again"), hook_name="h")
    sae2 = load_sae(str(tmp_path / "again"), k=K)
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae2, n), getattr(sae, n))
    assert sae2.tied_b_pre == sae.tied_b_pre


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify(tmp_path, transcode):
    t = raw()
    save_file({"encoder.weight": t["W_enc"], "encoder.bias": t["b_enc"], "W_dec": t["W_dec"],
               "b_dec": t["b_dec"]}, str(tmp_path / "sae.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(
        {"expansion_factor": 4, "normalize_decoder": True, "num_latents": S, "k": K,
         "multi_topk": False, "skip_connection": False, "transcode": transcode}))
    sae = load_sae(str(tmp_path))
    assert sae.k == K and sae.tied_b_pre == (not transcode)
    check_same_function(sae, t, b_pre=not transcode, threshold=False)
    save_sparsify(sae, str(tmp_path / "again"))
    sae2 = load_sae(str(tmp_path / "again"))
    assert sae2.tied_b_pre == sae.tied_b_pre
    for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(sae2, n), getattr(sae, n))


def test_gemmascope(tmp_path):
    t = raw()
    np.savez(tmp_path / "params.npz", W_enc=t["W_enc"].T.numpy(), W_dec=t["W_dec"].numpy(),
             b_enc=t["b_enc"].numpy(), b_dec=t["b_dec"].numpy(), threshold=t["threshold"].numpy())
    sae = load_sae(str(tmp_path / "params.npz"), k=K)
    assert detect_format(str(tmp_path)) == "gemmascope"
    check_same_function(sae, t, b_pre=False, threshold=True)


def test_unknown_format_and_unsupported_saves(tmp_path):
    with pytest.raises(ValueError, match="no SAE format recognised"):
        load_sae(str(tmp_path))
    sae = ss.SAE.random(D, S, K, threshold=True)
    with pytest.raises(ValueError, match="JumpReLU threshold cannot be saved"):
        save_sparsify(sae, str(tmp_path / "s"))
    b = torch.zeros(D)
    untied = ss.SAE(torch.randn(S, D), torch.zeros(S), torch.randn(S, D), b, K, b_pre=b.clone())
    with pytest.raises(ValueError, match="b_pre must be tied"):
        save_saelens(untied, str(tmp_path / "l"))


@pytest.mark.parametrize("kind", ["relu", "topk", "jumprelu"])
def test_dictionary_learning(tmp_path, kind):
    t = raw()
    if kind == "relu":
        sd = {"encoder.weight": t["W_enc"], "encoder.bias": t["b_enc"],
              "decoder.weight": t["W_dec"].T.contiguous(), "bias": t["b_dec"]}
        cls = "AutoEncoder"
    elif kind == "topk":
        sd = {"encoder.weight": t["W_enc"], "encoder.bias": t["b_enc"],
              "decoder.weight": t["W_dec"].T.contiguous(), "b_dec": t["b_dec"],
              "k": torch.tensor(K), "threshold": torch.tensor(-1.0)}
        cls = "AutoEncoderTopK"
    else:
        sd = {"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"],
              "b_dec": t["b_dec"], "threshold": t["threshold"]}
        cls = "JumpReluAutoEncoder"
    torch.save(sd, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps(
        {"trainer": {"dict_class": cls, "activation_dim": D, "dict_size": S,
                     "submodule_name": "resid_post_layer_3"}}))
    assert detect_format(str(tmp_path)) == "dictionary_learning"
    sae = load_sae(str(tmp_path), k=None if kind == "topk" else K)
    assert sae.k == K and sae.format_info["hook_name"] == "resid_post_layer_3"
    check_same_function(sae, t, b_pre=kind != "jumprelu", threshold=kind == "jumprelu")


@pytest.mark.parametrize("act", ["TopK", "ReLU"])
def test_openai(tmp_path, act):
    t = raw()
    sd = {"pre_bias": t["b_dec"], "encoder.weight": t["W_enc"], "latent_bias": t["b_enc"],
          "decoder.weight": t["W_dec"].T.contiguous(), "activation": act,
          "activation_state_dict": {"k": K} if act == "TopK" else {},
          "stats_last_nonzero": torch.zeros(S, dtype=torch.long)}
    torch.save(sd, tmp_path / "sae.pt")
    sae = load_sae(str(tmp_path / "sae.pt"), k=None if act == "TopK" else K)
    assert sae.k == K and sae.tied_b_pre
    check_same_function(sae, t, b_pre=True, threshold=False)


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    torch.save({"pre_bias": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):
        load_sae(str(tmp_path / "evil.pt"), k=3)
    assert not (tmp_path / "pwned").exists()


def test_write_safetensors_streams_what_save_file_writes(tmp_path, monkeypatch):
    """The streaming writer (no bytes copy of the tensors; a transposed tensor written a
    block of columns at a time) writes files that safetensors reads back exactly: every
    dtype train-sae and save_saelens use, 0-dim and empty tensors, a transpose over several
    blocks, and the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    import sae_sparse._safetensors as st
    monkeypatch.setattr(st, "_BLOCK_BYTES", 64)  # 3 columns of 5 fp32 rows per block
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 11, generator=g)
    t = {"W_enc": st.Transposed(W), "bf16": torch.randn(7, 3, generator=g).to(torch.bfloat16),
         "f64": torch.randn(4, generator=g, dtype=torch.float64), "step": torch.tensor(3.0),
         "ids": torch.arange(9).view(3, 3), "mask": torch.tensor([True, False, True]),
         "empty": torch.zeros(0, 4), "strided": torch.randn(6, 6, generator=g)[:, ::2]}
    path = tmp_path / "x.safetensors"
    st.write_safetensors(str(path), t, metadata={"format": "pt", "run": 7})
    back = load_file(path)
    assert torch.equal(back.pop("W_enc"), W.T)
    for n, v in t.items():
        if n != "W_enc":
            assert back[n].dtype == v.dtype and torch.equal(back[n], v), n
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "run": "7"}
