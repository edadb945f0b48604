"""Builds csrc/ with CMake and runs the standalone C++ test through ctest."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.exhaustive  # a CMake build of csrc/, ~30 s
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None,
                    reason="cmake/ctest not installed")
def test_ctest(tmp_path):
    import torch.utils

    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    env = dict(os.environ, PYTHONPATH="")

    def run(*cmd):
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
        return r.stdout

    run("cmake", "-S", ROOT, "-B", str(build), *gen,
        f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        f"-DPython_EXECUTABLE={sys.executable}")
    run("cmake", "--build", str(build), "-j2")
    out = run("ctest", "--test-dir", str(build), "--output-on-failure")
    assert "100% tests passed" in out
