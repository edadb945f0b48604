"""The README's Python examples run as written, and its links stay inside the repository.

The blocks run in order in one fresh interpreter (one namespace, as a reader pasting them into
a session would), in an empty directory; a block that imports an optional peer library that is
not installed is skipped along with those that follow from it."""
import os
import re
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def python_blocks():
    text = open(README, encoding="utf-8").read()
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 6


def test_readme_python_blocks_run_as_written(tmp_path):
    blocks = python_blocks()
    runner = textwrap.dedent('''
        import importlib.util, sys, traceback
        blocks = %r
        ns = {"__name__": "__main__"}
        for n, src in enumerate(blocks, 1):
            mods = [m for m in ("sparsify", "datasets") if f"import {m}" in src
                    or f"from {m} " in src]
            if any(importlib.util.find_spec(m) is None for m in mods):
                print(f"block {n}: skipped ({mods} not installed)")
                continue
            try:
                exec(compile(src, f"README block {n}", "exec"), ns)
            except Exception:
                traceback.print_exc()
                print(f"README block {n} failed")
                sys.exit(1)
            print(f"block {n}: ok")
        ''') % (blocks,)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", runner], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ran = r.stdout.count(": ok")
    assert ran + r.stdout.count("skipped") == len(blocks)
    assert ran >= len(blocks) - 1, r.stdout


def test_readme_links_stay_in_the_repository():
    text = open(README, encoding="utf-8").read()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        assert not re.match(r"[a-z]+://", link), f"{link} leaves the repository"
        assert os.path.exists(os.path.join(ROOT, link.split("#")[0])), link
    assert "../shared" not in text
