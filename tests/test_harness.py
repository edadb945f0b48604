"""The test harness itself: a quick_ids entry that names no parametrization stops the run
(it would silently keep none of the cases it meant to keep)."""
import pathlib
import shutil
import subprocess
import sys

CONFTEST = pathlib.Path(__file__).with_name("conftest.py")


def _collect(tmp_path, ids, *args):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_ids.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('a', [1, 2])\n"
        "@pytest.mark.parametrize('b', ['x', 'y'])\n"
        f"@pytest.mark.quick_ids({', '.join(repr(i) for i in ids)})\n"
        "def test_f(a, b):\n    pass\n")
    return subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-m", "not exhaustive", *args, str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True)


def test_quick_ids_that_match_no_parametrization_stop_the_run(tmp_path):
    ok = _collect(tmp_path, ["x-1", "y-2"])
    assert ok.returncode == 0 and "2/4 tests collected" in ok.stdout, ok.stdout + ok.stderr
    bad = _collect(tmp_path, ["x-1", "1-y"])  # pytest's id is y-1: b's values come first
    assert bad.returncode != 0
    assert "quick_ids ['1-y'] match no parametrization" in bad.stdout + bad.stderr
    # selecting with -k leaves some ids out of the collection: no verdict then
    assert _collect(tmp_path, ["x-1", "1-y"], "-k", "x").returncode == 0
