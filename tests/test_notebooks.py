"""The teaching notebooks (notebooks/*.ipynb) run top to bottom, and are stored clean and up to date.

Each notebook is executed in a fresh Jupyter kernel by nbclient.  The kernel is *this* interpreter
(sys.executable, i.e. the project's .venv): a kernel spec pointing at it is written to a temporary directory,
so nothing depends on which kernels a machine has installed (a fresh CI clone has none).  A cell error fails
the test with the cell's traceback; a notebook that exceeds its time budget fails too
(MISTRAL_REF_NOTEBOOK_TIMEOUT seconds per notebook, default 300).  Notebooks run in a temporary working
directory with no network use, and single-threaded (MISTRAL_REF_NOTEBOOK_THREADS, default 1): on a shared or
busy 2-core machine two torch threads per kernel are several times *slower* than one, and test workers running
notebooks side by side must not oversubscribe the cores.

    .venv/bin/pytest tests/test_notebooks.py -q                 # all of them (about 4 minutes on 2 cores)
    .venv/bin/pytest tests/test_notebooks.py -q -k generation   # one
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
BUDGET_S = float(os.environ.get("MISTRAL_REF_NOTEBOOK_TIMEOUT", "300"))
THREADS = os.environ.get("MISTRAL_REF_NOTEBOOK_THREADS", "1")
KERNEL_NAME = "mistral-ref-test-python"


def _kernel_manager(tmp_path: Path):
    """A KernelManager whose only kernel spec runs ipykernel in this very interpreter."""
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path / "kernels"
    write_kernel_spec(kernels / KERNEL_NAME, overrides={"display_name": "mistral-ref test kernel"})
    spec = json.loads((kernels / KERNEL_NAME / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable, spec["argv"]
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm)


def _cell_error(nb, exc: Exception) -> str:
    """The source of the first cell with an error output, and its traceback, for the failure message."""
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(out.get("traceback", [])))
                return f"cell {cell.get('id')}:\n{cell.source}\n---\n{tb}"
    return str(exc)


# Notebooks that use an oracle extra (transformers, the mistral-common wheel's tokenizer files) are marked
# oracle, like the tests that do, and skipped when that extra is missing.
ORACLES = {"02_checkpoints_parity": "transformers", "03_tokenizers_chat": "mistral_common"}


def _params():
    for path in NOTEBOOKS:
        module = ORACLES.get(path.stem)
        marks = [pytest.mark.oracle] if module else []
        if module and importlib.util.find_spec(module) is None:
            marks.append(pytest.mark.skip(reason=f"{path.name} needs {module} (the test extra)"))
        yield pytest.param(path, id=path.stem, marks=marks)


# Run first in each kernel (not part of the notebook): every figure a notebook shows is checked before it is shown.
# A label, tick label, title or annotation reaching outside the figure would be cut off in the picture; the ticks of
# an axis that counts things (experts, layers, rows, tiles, blocks) must be whole numbers.
FIGURE_CHECK = """
import re as _re

import matplotlib.pyplot as _plt
from matplotlib.text import Text as _Text

_COUNTED = _re.compile(r"(query |key )?(expert|layer|row|tile|block)s?\\b")  # an axis that counts things
_show = _plt.show


def _checked_show(*args, **kwargs):
    for num in _plt.get_fignums():
        fig = _plt.figure(num)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        drawn = fig.get_tightbbox(renderer)  # inches: everything drawn, as bbox_inches="tight" would save it
        w, h = fig.get_size_inches()
        if drawn.x0 < -0.01 or drawn.y0 < -0.01 or drawn.x1 > w + 0.01 or drawn.y1 > h + 0.01:
            inside = fig.bbox.contains
            cut = [t.get_text() for t in fig.findobj(_Text) if t.get_visible() and t.get_text().strip() and not (
                   inside(*t.get_window_extent(renderer).min) and inside(*t.get_window_extent(renderer).max))]
            raise AssertionError(f"figure {num} is drawn past its edges {drawn.bounds} (size {w} x {h}): "
                                 f"cut off: {cut[:5]}")
        for ax in fig.axes:
            for label, ticks, (lo, hi) in ((ax.get_xlabel(), ax.get_xticks(), sorted(ax.get_xlim())),
                                           (ax.get_ylabel(), ax.get_yticks(), sorted(ax.get_ylim()))):
                if _COUNTED.match(label.lower()):
                    shown = [t for t in ticks if lo <= t <= hi]
                    if any(float(t) != int(t) for t in shown):
                        raise AssertionError(f"figure {num}: axis {label!r} has fractional ticks {shown}")
    return _show(*args, **kwargs)


_plt.show = _checked_show
"""


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", list(_params()))
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path, record_property):
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(FIGURE_CHECK, id="figure-check"))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    deadline = time.monotonic() + BUDGET_S

    def remaining(cell) -> int:  # nbclient's per-cell timeout, spent from one budget for the whole notebook
        return max(1, int(deadline - time.monotonic()))

    client = nbclient.NotebookClient(
        nb, km=_kernel_manager(tmp_path), timeout=int(BUDGET_S), timeout_func=remaining,
        resources={"metadata": {"path": str(workdir)}}, allow_errors=False, record_timing=True,
    )
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS,
           "PYDEVD_DISABLE_FILE_VALIDATION": "1"}  # silences ipykernel's debugger notice about frozen modules
    start = time.monotonic()
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellTimeoutError as e:
        pytest.fail(f"{path.name} exceeded its budget of {BUDGET_S:.0f} s: {e}")
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed in {_cell_error(nb, e)}")
    elapsed = time.monotonic() - start
    record_property("seconds", round(elapsed, 1))
    print(f"{path.name}: {elapsed:.1f} s")
    figures = sum(out.get("output_type") == "display_data" and "image/png" in out.get("data", {})
                  for cell in nb.cells for out in cell.get("outputs", []))
    assert figures > 0, f"{path.name} drew no figure"


# ---- static checks (fast) ------------------------------------------------------------------------------------
def test_there_are_notebooks_and_the_readme_lists_each():
    assert len(NOTEBOOKS) >= 6
    readme = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    for path in NOTEBOOKS:
        assert path.name in readme, f"notebooks/README.md does not mention {path.name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {cell.id} has output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_imports_the_library_and_defines_no_model_code(path: Path):
    """Notebooks teach with mistral_ref's own code: they import it and never define modules of their own."""
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    tree = ast.parse(code)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "mistral_ref" in imported, f"{path.name} does not import mistral_ref"
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            bases = {ast.unparse(b) for b in node.bases}
            assert not bases & {"nn.Module", "torch.nn.Module", "Module"}, \
                f"{path.name} defines model code (class {node.name}); import it from mistral_ref instead"


def test_figures_use_constrained_layout_and_titles_state_no_generated_text():
    """Constrained layout keeps labels inside the figure (checked on every figure when the notebooks run); a title
    never quotes model output (notebook 04 once titled a chart with a sampled, wrong sentence)."""
    for source in sorted((NOTEBOOK_DIR / "src").glob("*.py")):
        text = source.read_text(encoding="utf-8")
        assert '"figure.constrained_layout.use": True' in text, source.name
        assert "tight_layout" not in text, f"{source.name}: tight_layout overrides the constrained layout"
        for line in text.splitlines():
            if "set_title(" in line or "suptitle(" in line:
                assert "decode(" not in line and ".tokens" not in line, f"{source.name}: {line.strip()}"


def test_committed_notebooks_match_their_sources():
    sys.path.insert(0, str(NOTEBOOK_DIR))
    try:
        import build
    finally:
        sys.path.remove(str(NOTEBOOK_DIR))
    sources = sorted((NOTEBOOK_DIR / "src").glob("*.py"))
    assert [s.stem for s in sources] == [p.stem for p in NOTEBOOKS]
    for source in sources:
        built = build.render(build.build_notebook(source))
        stored = (NOTEBOOK_DIR / f"{source.stem}.ipynb").read_text(encoding="utf-8")
        assert built == stored, f"{source.stem}.ipynb is stale: run .venv/bin/python notebooks/build.py"
