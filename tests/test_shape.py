"""The house rules docs/architecture.md states, checked on the source: no import circle (imports inside
functions count: they only postpone a circle), no objective named in the training loop, no evaluator named in
the code that loops over evaluators."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from vaelab.evaluation.evaluators import EVALUATORS
from vaelab.objectives import OBJECTIVES

PACKAGE = Path(__file__).resolve().parents[1] / "vaelab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _absolute(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The module a `from ... import` names, relative ones (from . import x) made absolute."""
    base = node.module or ""
    if not node.level:
        return base
    package = here if is_package else here.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{base}".rstrip(".")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The vaelab modules `path` imports at run time, at any depth (TYPE_CHECKING blocks are annotations)."""
    found: set[str] = set()
    here = module_name(path)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, here, path.name == "__init__.py")
            for alias in node.names:  # a submodule where it is one, else a name from `base` itself
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    resolved = set()
    for name in found:
        while name and name not in modules:  # vaelab.x.y.name -> the module that defines it
            name = name.rpartition(".")[0]
        if name and name != here:
            resolved.add(name)
    return resolved


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := walk(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle_through_a_function_level_import(tmp_path: Path):
    package = tmp_path / "vaelab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from vaelab.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from vaelab import a\n    return a\n")
    (package / "c.py").write_text("from vaelab.b import thing\n")  # c -> b only: no circle through it
    modules = {"vaelab", "vaelab.a", "vaelab.b"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, package
    try:
        graph = {module_name(p): imports_of(p, modules) for p in sorted(package.glob("*.py"))}
    finally:
        PACKAGE = saved
    assert find_cycle(graph) in (["vaelab.a", "vaelab.b", "vaelab.a"], ["vaelab.b", "vaelab.a", "vaelab.b"])


def test_no_import_circle_in_the_package():
    assert find_cycle(import_graph()) is None


def _source(folder: str, *names: str) -> dict[str, str]:
    paths = [p for name in names for p in (PACKAGE / folder).glob(name)] if folder else \
        [PACKAGE / name for name in names]
    return {str(p.relative_to(PACKAGE)): p.read_text() for p in paths}


def test_no_objective_is_named_in_the_training_loop():
    names = sorted(OBJECTIVES)
    assert len(names) >= 6  # beta_vae, beta_tcvae, factorvae, dip_vae_i, dip_vae_ii, infovae
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    hits = {path: pattern.findall(text) for path, text in _source("training", "*.py").items()}
    assert {path: found for path, found in hits.items() if found} == {}


def test_no_evaluator_is_named_where_evaluators_are_looped_over():
    names = sorted(EVALUATORS)
    assert {"elbo", "latents", "iwae", "probe", "disentanglement"} <= set(names)
    pattern = re.compile(r"[\"'](" + "|".join(map(re.escape, names)) + r")[\"']")
    files = {**_source("evaluation", "plan.py", "stage.py"), **_source("", "cost.py", "cli.py"),
             **_source("report", "__init__.py")}
    hits = {path: pattern.findall(text) for path, text in files.items()}
    assert {path: found for path, found in hits.items() if found} == {}
