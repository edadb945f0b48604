"""Every Triton kernel compiled ahead of time for Hopper (sm_90) at the configurations its
launcher picks on a GPU -- no GPU needed, so CI checks what the interpreter cannot: that the
kernels compile (types, layouts, TMA descriptors) and that ptxas keeps them free of register
spills. The compiles run in a subprocess without TRITON_INTERPRET (see tests/hopper_compile.py).
"""
import json
import os
import subprocess
import sys

import pytest

import hopper_compile

triton = pytest.importorskip("triton")
try:
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
except ImportError as e:  # pragma: no cover - a triton build without the NVIDIA backend
    pytest.skip(f"no NVIDIA backend in triton: {e}", allow_module_level=True)

NAMES = [c[0] for c in hopper_compile.cases()]
pytestmark = pytest.mark.exhaustive  # one ~40 s compile of every kernel


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, hopper_compile.__file__], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return {d["name"]: d for d in map(json.loads, out.stdout.splitlines())}


@pytest.mark.parametrize("name", NAMES)
def test_kernel_compiles_for_hopper_without_spills(report, name):
    r = report[name]
    assert r["ok"], r["error"]
    assert r["spill_bytes"] == 0, f"{name}: {r['regs']} registers, {r['spill_bytes']} bytes spilled"
