"""Test setup: poison uninitialised memory so an output a kernel forgot to write shows up."""
import os

os.environ.setdefault("SAE_SPARSE_POISON", "1")  # C++ kernels fill their outputs with NaN / -1
# Without a GPU, Triton kernels run (on CPU tensors) in the Triton interpreter. Must be set
# before triton is imported.
if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # one process per core already (-n auto)
    torch.set_num_threads(1)

_empty, _empty_like = torch.empty, torch.empty_like


def _poison(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(-1)
    return t


@pytest.fixture(autouse=True)
def poison_torch_empty(monkeypatch):
    """torch.empty / empty_like return NaN-filled (floats) or -1-filled (ints) tensors."""
    # the default device is passed on: a `with torch.device("meta")` block finds its
    # constructors by looking torch.empty up, which is this wrapper, not the original
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: _poison(
        _empty(*a, device=device if device is not None else torch.get_default_device(), **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _poison(_empty_like(*a, **k)))
    yield


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.quick_ids("id", ...)`` on a parametrized test keeps only those
    parametrizations in the quick run (``python -m pytest -q``); the others get the
    ``exhaustive`` marker, which the quick run deselects and ``.ci/run`` runs
    (``python -m pytest -q -m exhaustive``). An id that names no parametrization of its
    test stops the run: it would keep nothing, silently."""
    ids, named = {}, {}
    for item in items:
        keep = item.get_closest_marker("quick_ids")
        if keep is None or not hasattr(item, "callspec"):
            continue
        test = (item.path, item.originalname)
        ids.setdefault(test, set()).add(item.callspec.id)
        named[test] = keep.args
        if item.callspec.id not in keep.args:
            item.add_marker(pytest.mark.exhaustive)
    for test, wanted in named.items():
        unknown = sorted(set(wanted) - ids[test])
        whole = not (config.getoption("deselect") or config.getoption("keyword")
                     or any("::" in a for a in config.args))  # else some ids are not here
        if unknown and whole:
            raise pytest.UsageError(
                f"{test[0].name}::{test[1]}: quick_ids {unknown} match no parametrization "
                f"(its ids look like {sorted(ids[test])[0]!r})")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
