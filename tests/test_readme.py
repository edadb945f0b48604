"""The Python examples of the README and of every guide in docs/ run as written, and their links
stay inside the repository.

Each file's blocks run in order in one fresh interpreter (one namespace, as a reader pasting
them into a session would), in an empty directory; a block that imports an optional peer
library that is not installed is skipped along with those that follow from it."""
import glob
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
IDS = [os.path.relpath(p, ROOT) for p in PAGES]


def python_blocks(path=README):
    text = open(path, encoding="utf-8").read()
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_readme_is_a_front_door_with_examples():
    assert len(open(README, encoding="utf-8").read().splitlines()) <= 300
    assert python_blocks(README)
    assert sum(len(python_blocks(p)) for p in PAGES) >= 8


@pytest.mark.parametrize("path", [p for p in PAGES if python_blocks(p)],
                         ids=[i for p, i in zip(PAGES, IDS) if python_blocks(p)])
def test_python_blocks_run_as_written(tmp_path, path):
    blocks = python_blocks(path)
    name = os.path.basename(path)
    runner = textwrap.dedent('''
        import importlib.util, sys, traceback
        blocks, name = %r, %r
        ns = {"__name__": "__main__"}
        for n, src in enumerate(blocks, 1):
            mods = [m for m in ("sparsify", "datasets") if f"import {m}" in src
                    or f"from {m} " in src]
            if any(importlib.util.find_spec(m) is None for m in mods):
                print(f"block {n}: skipped ({mods} not installed)")
                continue
            try:
                exec(compile(src, f"{name} block {n}", "exec"), ns)
            except Exception:
                traceback.print_exc()
                print(f"{name} block {n} failed")
                sys.exit(1)
            print(f"block {n}: ok")
        ''') % (blocks, name)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", runner], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ran = r.stdout.count(": ok")
    assert ran + r.stdout.count("skipped") == len(blocks)
    assert ran >= len(blocks) - 1, r.stdout


@pytest.mark.parametrize("path", PAGES, ids=IDS)
def test_links_stay_in_the_repository(path):
    text = open(path, encoding="utf-8").read()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links or path.endswith("design.md")
    for link in links:
        assert not re.match(r"[a-z]+://", link), f"{link} leaves the repository"
        target = link.split("#")[0]
        if target:
            assert os.path.exists(os.path.join(os.path.dirname(path), target)), link
    assert "../shared" not in text
