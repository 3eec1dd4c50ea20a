"""The import graph of mistral_ref.tokenizer: one-directional (imports inside functions and TYPE_CHECKING blocks
count too), no torch, nothing else of mistral_ref."""

from __future__ import annotations

import ast
from pathlib import Path

import mistral_ref.tokenizer

PACKAGE = "mistral_ref.tokenizer"
PACKAGE_DIR = Path(mistral_ref.tokenizer.__file__).parent


def module_name(path: Path) -> str:
    return PACKAGE if path.name == "__init__.py" else f"{PACKAGE}.{path.stem}"


def imported_names(source: str, module: str) -> set[str]:
    """Absolute names of everything an import statement anywhere in ``source`` names (modules and, for
    ``from x import y``, also ``x.y``, which may be a submodule)."""
    is_package = module == PACKAGE
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                source_module = f"{base}.{node.module}" if node.module else base
            else:
                source_module = node.module or ""
            found.add(source_module)
            found.update(f"{source_module}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (the package itself is ``__init__``)."""
    sources = {module_name(p): p.read_text(encoding="utf-8") for p in sorted(PACKAGE_DIR.glob("*.py"))}
    return {m: {n for n in imported_names(src, m) if n in sources and n != m} for m, src in sources.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or ``None`` if it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_checker_sees_every_import_and_every_cycle() -> None:
    src = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .base import Tokenizer\n"
        "def f():\n    from . import chat\n    import torch.nn\n"
    )
    names = imported_names(src, f"{PACKAGE}.stream")
    assert {f"{PACKAGE}.base", f"{PACKAGE}.chat", "torch.nn"} <= names
    assert f"{PACKAGE}.errors" in imported_names("from .errors import TokenizerError", PACKAGE)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_tokenizer_modules_import_each_other_one_way() -> None:
    graph = import_graph()
    assert len(graph) >= 9 and f"{PACKAGE}.templates" in graph[f"{PACKAGE}.chat"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_tokenizer_module_imports_torch_or_the_rest_of_mistral_ref() -> None:
    for path in sorted(PACKAGE_DIR.glob("*.py")):
        for name in imported_names(path.read_text(encoding="utf-8"), module_name(path)):
            assert name.split(".")[0] != "torch", f"{path.name} imports {name}"
            if name.split(".")[0] == "mistral_ref":
                inside = name == PACKAGE or name.startswith(PACKAGE + ".")
                assert inside, f"{path.name} imports {name}, outside the tokenizer package"
