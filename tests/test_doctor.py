"""`sae-sparse doctor`: passes on this machine's backends, and fails (exit 1, the op named)
on a fused kernel that is wrong on purpose."""
import json
import os
import subprocess
import sys

import pytest
import torch

import sae_sparse as ss
from sae_sparse import doctor


def test_doctor_quick_passes_on_this_cpu():
    """As a user runs it (no interpreter: the torch and cpp backends), in a fresh process."""
    env = dict(os.environ, TRITON_INTERPRET="0", SAE_SPARSE_POISON="1")
    r = subprocess.run([sys.executable, "-m", "sae_sparse.doctor", "--quick", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] and out["environment"]["torch"] == torch.__version__
    backends = {(c["backend"], c["path"]) for c in out["checks"]}
    assert ("torch", "-") in backends
    assert ("cpp", "-") in backends or "cpp" not in ss.available_backends()
    assert {c["op"] for c in out["checks"]} == set(doctor.OPS)
    assert {c["case"] for c in out["checks"]} == {c.name for c in doctor.CASES}


def test_doctor_cli_is_the_module(capsys):
    from sae_sparse.cli import main
    assert main(["doctor", "--quick", "--op", "decode", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "checks against the float64 reference" in out and "this install can be trusted" in out


@pytest.mark.skipif("triton" not in ss.available_backends()
                    or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the triton kernels in the interpreter")
def test_doctor_catches_a_wrong_fused_kernel(monkeypatch, capsys):
    """The fused FusedSAEEdit's backward with its bias gradient dropped (a mutation no composed-path
    test saw): the triton sae_edit rows fail (both paths: the path choice is the encode's and
    the decode's, the backward is the Function's own), torch and cpp pass; exit status 1."""
    from sae_sparse.triton import functions as F
    real = F.FusedSAEEdit.backward

    def no_dbias(ctx, dy, dovf):
        grads = list(real(ctx, dy, dovf))
        grads[8] = torch.zeros_like(grads[8]) if grads[8] is not None else None  # bias
        return tuple(grads)
    monkeypatch.setattr(F.FusedSAEEdit, "backward", staticmethod(no_dbias))
    monkeypatch.setattr(doctor, "CASES", doctor.CASES[:1])
    assert doctor.main(["--quick", "--op", "sae_edit", "--device", "cpu", "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)["checks"]
    bad = [(r["backend"], r["path"]) for r in rows if not r["ok"]]
    assert bad == [("triton", "fused"), ("triton", "torch")], rows
    assert "d adapter.bias" in next(r["problem"] for r in rows if not r["ok"])


@pytest.mark.skipif("triton" not in ss.available_backends()
                    or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the triton kernels in the interpreter")
def test_doctor_timing_table_with_a_fake_clock(monkeypatch):
    """The GPU part of the doctor (timings of the fused path, the torch composition and the
    bare GEMM, then the path chosen on a first call), run on the CPU with a clock that says
    1 ms for everything: the fused path wins the tie, checked and trusted."""
    import triton.testing

    from sae_sparse.triton import paths
    monkeypatch.setattr(triton.testing, "do_bench", lambda f, **k: (f(), 1.0)[1])
    monkeypatch.setattr(paths, "_TIMER", lambda f: (f(), 1.0)[1])
    monkeypatch.setattr(paths, "_CACHE", {})
    monkeypatch.setattr(paths, "_REFUSED", {})
    rows = doctor.timings(torch.device("cpu"), {"tiny": (5, 16, 300, 4)}, log=lambda *_: None)
    assert rows == [dict(shape="tiny", N=5, D=16, S=300, k=4, fused_ms=1.0, torch_ms=1.0,
                         gemm_ms=1.0, chosen="fused", refused=[])]
