"""The GPU benchmark scripts run end to end (--smoke: tiny shapes, CPU, Triton interpreter),
so a script broken by a kernel-library change fails here rather than on a GPU lease."""
import os
import subprocess
import sys

import pytest
import torch

import sae_sparse as ss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = [pytest.mark.skipif("triton" not in ss.available_backends(), reason="needs triton"),
              pytest.mark.exhaustive]  # ~3 minutes of interpreted benchmark smoke runs


def smoke(script, *args):
    """benchmarks/<script> --smoke ARGS in a subprocess under the interpreter; its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--smoke",
                          *args], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.parametrize("script", ["bench_gpu.py", "encode_sweep.py", "decode_sweep.py"])
def test_gpu_benchmark_script_smoke(script):
    out = smoke(script, "--shapes", "A")
    table = [line for line in out.stdout.splitlines() if line.startswith("| A")]
    assert table and not any("nan" in line.split("|")[3] for line in table), out.stdout


def test_scale_benchmark_smoke():
    """benchmarks/bench_scale.py end to end on two tiny dictionaries: every row timed."""
    out = smoke("bench_scale.py")
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| ")
            and line[2].isdigit()]
    assert len(rows) == 8, out.stdout
    assert all(float(r[4]) > 0 for r in rows), out.stdout


def test_gpu_session_script_runs_its_parts(tmp_path):
    """benchmarks/gpu_session.sh: valid bash; a part runs under its time limit into its log,
    a failing part is reported in the summary without stopping the script."""
    script = os.path.join(ROOT, "benchmarks", "gpu_session.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = dict(os.environ, OUT=str(tmp_path), PARTS="profile")  # no GPU here: it fails
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "card.txt").exists() and (tmp_path / "profile.log").exists()
    line = [s for s in out.stdout.splitlines() if s.startswith("profile")]
    assert line and f"rc={0 if torch.cuda.is_available() else 1}" in line[0], out.stdout
