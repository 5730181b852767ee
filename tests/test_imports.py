"""The package is a ladder: each module sits on a rung and imports only its own rung or lower ones, at the
top of the file. Read from the source alone (no torch, nothing imported), so it runs in milliseconds.

The ladder, lowest first, is LADDER below; the README's "Where to change what" shows the same one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "parti"

# Lowest first. A module may import modules of its own rung or of lower rungs, never higher ones.
LADDER: list[tuple[str, ...]] = [
    ("errors",),  # the one error type every message goes through
    ("settings", "files", "device", "layers", "prompts", "synthetic", "optim", "fetch", "health"),  # no model knowledge
    ("validate", "checkpoint", "hub", "metrics"),  # the folder format, Hub lookups, metric maths
    ("tokenizer", "generator", "text", "losses", "inception"),  # the models
    ("data", "batches", "decoding", "quantize", "state", "distributed", "runs"),  # data, the eager step, int8
    ("cache", "compiled", "sampling", "speculative", "plots"),  # the code cache, the samplers, pictures
    ("pipeline", "loop", "audit"),  # prompts -> images; the training skeleton; the memorisation audit
    ("evaluate", "train_tokenizer", "train_generator"),  # evaluation runs and the two stages
    ("push", "app", "demo", "notebook"),  # what users run
    ("cli",),  # the command line
]
RUNG = {name: i for i, rung in enumerate(LADDER) for name in rung}
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), filename=str(p)) for p in sorted(PACKAGE.glob("*.py"))
            if p.stem != "__init__"}


def _parti_imports(tree: ast.Module, modules: set[str]) -> list[tuple[str, list[str], ast.stmt, bool]]:
    """(imported parti module, imported names, the statement, whether it is at the top of the file)."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "parti" and len(parts) > 1:
                    found.append((parts[1], [], node, id(node) in top))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            parts = node.module.split(".")
            if parts[0] != "parti":
                continue
            if len(parts) > 1:
                found.append((parts[1], [a.name for a in node.names], node, id(node) in top))
            else:  # `from parti import text`: module imports; `__version__` is the package's own
                for alias in node.names:
                    if alias.name in modules:
                        found.append((alias.name, [], node, id(node) in top))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"relative import at line {node.lineno}: use `from parti.x import ...`")
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {dep for dep, *_ in _parti_imports(tree, set(modules)) if dep != name}
            for name, tree in modules.items()}


def test_every_module_is_on_one_rung():
    names = set(_modules())
    placed = [name for rung in LADDER for name in rung]
    assert len(placed) == len(set(placed)), "a module is on two rungs"
    assert names - set(placed) == set(), "modules on no rung: add them to LADDER (and the README)"
    assert set(placed) - names == set(), "LADDER names modules that do not exist"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> the modules it imports) as a path back to its start, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [name])):
            return cycle
    return None


def test_no_import_cycle_even_inside_functions():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_a_higher_rung():
    wrong = [f"{name} (rung {RUNG[name]}) imports {dep} (rung {RUNG[dep]})"
             for name, deps in _graph().items() for dep in deps if RUNG[dep] > RUNG[name]]
    assert wrong == []


def test_parti_modules_are_imported_at_the_top_of_the_file():
    modules = _modules()
    inside = [f"parti/{name}.py:{node.lineno} imports parti.{dep} inside a function"
              for name, tree in modules.items() for dep, _, node, at_top in _parti_imports(tree, set(modules))
              if not at_top]
    assert inside == []


def test_no_private_name_is_imported_from_another_module():
    modules = _modules()
    private = [f"parti/{name}.py:{node.lineno} imports {n} from parti.{dep}"
               for name, tree in modules.items() for dep, names, node, _ in _parti_imports(tree, set(modules))
               for n in names if n.startswith("_") and dep != name]
    assert private == []


def test_no_function_is_longer_than_the_style_allows():
    long = [f"parti/{name}.py:{node.lineno} {node.name} has {node.end_lineno - node.lineno + 1} lines"
            for name, tree in _modules().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


@pytest.mark.parametrize("source, message", [
    ("def f():\n    from parti.tokenizer import load_tokenizer\n", "inside a function"),
    ("from parti.runs import _read_lock\n", "_read_lock"),
])
def test_the_checks_catch_what_they_guard(source, message):
    """The readers above see an import inside a function and a private name: a check that cannot fail guards
    nothing."""
    tree = ast.parse(source)
    found = _parti_imports(tree, set(RUNG))
    assert found, "the import was not seen"
    dep, names, node, at_top = found[0]
    if message == "inside a function":
        assert not at_top
    else:
        assert message in names and at_top


def test_a_cycle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None


def test_the_readme_is_short_and_draws_the_ladder():
    readme = (PACKAGE.parent / "README.md").read_text()
    assert len(readme.splitlines()) < 180, "the README is for a newcomer: measurements and history go to docs/"
    ladder = readme.split("## Where to change what", 1)[1].split("```", 2)[1]
    missing = [name for name in RUNG if f" {name}" not in ladder and f"{name}.py" not in ladder]
    assert missing == [], f"modules missing from the README's ladder: {missing}"
