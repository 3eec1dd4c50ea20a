"""The package as users meet it: the public API is what it says, imports are acyclic and light, and the
triton backend is found, chosen and run without environment tricks."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import mistral_ref

REPO = Path(__file__).resolve().parents[1]


def submodules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(mistral_ref.__path__, "mistral_ref.")
                  if not m.name.endswith("__main__"))


def test_no_export_is_shadowed_by_a_submodule():
    """`import mistral_ref as mr; mr.generate(...)` must call the function even after every submodule has been
    imported (a submodule named like an export would replace it on the package)."""
    for name in submodules():
        try:
            importlib.import_module(name)
        except ImportError as e:  # an optional extra that is not installed
            pytest.skip(f"{name}: {e}")
    for name in mistral_ref.__all__:
        value = getattr(mistral_ref, name)
        assert not isinstance(value, type(mistral_ref)), f"mistral_ref.{name} is a module, not the export"
    assert callable(mistral_ref.generate) and callable(mistral_ref.chat_completion)


def test_dir_and_help_list_the_public_api():
    listed = dir(mistral_ref)
    assert set(mistral_ref.__all__) <= set(listed)
    text = subprocess.run([sys.executable, "-c", "import mistral_ref; help(mistral_ref)"], capture_output=True,
                          text=True, env={**os.environ, "PAGER": "cat"}, check=True).stdout
    for name in ("load_model", "generate", "chat_completion", "Transformer"):
        assert name in text


def imports_of(path: Path, module: str) -> set[str]:
    """mistral_ref modules imported by a file, at any depth (function-local imports and TYPE_CHECKING blocks
    excluded only where they are typing-only)."""
    tree = ast.parse(path.read_text())
    found = set()
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for n in ast.walk(node)}
    package = module.rsplit(".", 1)[0] if not path.name == "__init__.py" else module
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return found


def test_no_import_cycles_counting_imports_inside_functions():
    modules = {name: Path(importlib.util.find_spec(name).origin) for name in submodules()}
    modules["mistral_ref"] = Path(mistral_ref.__file__)
    graph = {name: {m for m in imports_of(path, name) if m in modules and m != name}
             for name, path in modules.items()}
    # a package's __init__ is imported by its submodules implicitly: that edge is not a cycle of the code
    graph = {name: {m for m in deps if not name.startswith(m + ".")} for name, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_reference_core_imports_no_engine_and_no_kernels():
    """The reference modules reach the engine only through the registry, by name."""
    engine = {m for m in submodules() if m.startswith("mistral_ref.backends.")} - {"mistral_ref.backends.compiled"}
    for name in ("attention", "rope", "moe", "norm", "cache", "model", "config"):
        deps = imports_of(REPO / "mistral_ref" / f"{name}.py", f"mistral_ref.{name}")
        assert not any(d.startswith("triton") for d in deps), name
        assert not deps & engine, (name, deps & engine)  # the registry (mistral_ref.backends) only
    # model.compile_decode hands the model to the engine's compiler (a function-local import, the one exception)
    assert imports_of(REPO / "mistral_ref" / "model.py", "mistral_ref.model") & engine == set()


def run_python(code: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                         cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_importing_the_model_is_light():
    """No torch._dynamo (seconds), no Triton, for `import mistral_ref.model` and building a model on meta."""
    out = run_python("import sys\nfrom mistral_ref.model import meta_model\nfrom mistral_ref import PRESETS\n"
                     "meta_model(PRESETS['mistral-7b-v0.3'])\n"
                     "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'triton'))))")
    assert out.strip() == "[]"


@pytest.mark.triton
def test_triton_backend_without_any_environment_variable():
    """On a machine without a GPU, set_backend("triton") works from a plain Python process (no TRITON_INTERPRET):
    the package chooses Triton's interpreter itself, and leaves the environment as it was."""
    code = """
import os, torch
from mistral_ref.config import ModelArgs
from mistral_ref.model import Transformer
args = ModelArgs(dim=32, n_layers=1, hidden_dim=48, n_heads=4, n_kv_heads=2, head_dim=8, vocab_size=50,
                 norm_eps=1e-5, rope_theta=1e4)
model = Transformer(args).eval()
tokens = torch.randint(0, 50, (1, 6))
with torch.no_grad():
    ref = model.set_backend("reference")(tokens)
    out = model.set_backend("triton")(tokens)
print(float((out - ref).abs().max()), os.environ.get("TRITON_INTERPRET"))
"""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the kernels compile for it")
    err, env_after = run_python(code).split()
    assert float(err) < 1e-5 and env_after == "None"


def test_the_kernel_sources_are_package_data():
    """The C and C++ sources that backends/cpu_gemv.py compiles at run time ship in the wheel (package-data)."""
    import fnmatch
    import re

    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.package-data]", 1)[1]
    patterns = re.findall(r'"([^"]+)"', re.search(r"^mistral_ref = \[(.*?)\]", section, re.M | re.S).group(1))
    sources = [p.relative_to(REPO / "mistral_ref").as_posix() for p in (REPO / "mistral_ref").rglob("*")
               if p.suffix in (".c", ".cpp", ".h")]
    assert sources and all(any(fnmatch.fnmatch(s, pat) for pat in patterns) for s in sources), (sources, patterns)
