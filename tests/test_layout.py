"""The package's layout: no module imports another that (directly or not) imports it back,
counting the imports inside functions too; the old ``sae_sparse.train`` still works."""
import ast
import importlib
import pathlib
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1] / "sae_sparse"


def _graph(missing=None):
    """module -> the package modules it imports (anywhere in it); relative imports of no
    module are appended to ``missing``."""
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.with_suffix("").relative_to(ROOT.parent).parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                found = [t for t in [target] + [f"{target}.{a.name}" for a in node.names]
                         if t in mods]
                if node.level and target not in mods and missing is not None:
                    missing.append(f"{m}: from {'.' * node.level}{node.module or ''}")
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names if a.name in mods]
            else:
                continue
            # a module's own package (its __init__) is importing it, not a dependency
            graph[m] |= {t for t in found if t != m and not m.startswith(t + ".")}
    return graph


def _cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state = {}

    def visit(n, path):
        state[n] = 1
        for t in sorted(graph[n]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state:
                found = visit(t, path + [t])
                if found:
                    return found
        state[n] = 2
        return None
    for n in sorted(graph):
        if n not in state:
            found = visit(n, [n])
            if found:
                return found
    return None


def test_no_import_cycles_and_no_dangling_relative_imports():
    missing = []
    graph = _graph(missing)
    assert not missing, missing
    assert "sae_sparse.training.trainer" in graph and graph["sae_sparse.hookpoints"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_old_train_module_warns_and_keeps_its_names():
    sys.modules.pop("sae_sparse.train", None)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        T = importlib.import_module("sae_sparse.train")
    assert any(issubclass(x.category, DeprecationWarning) and "sae_sparse.training" in
               str(x.message) for x in w)
    from sae_sparse import training
    assert T.train_adapter is training.train_adapter and T.TrainConfig is training.TrainConfig
    assert T._Schedule is training.Schedule and callable(T.model_logits)
