"""Installing mistral-ref: runtime requirements are ranges, Triton is optional, and pip's resolver accepts the
project's metadata with CPU-only torch, with PyPI's CUDA torch, and without Triton.

The resolution tests build the project's wheel and run pip's real resolver on it with ``--dry-run`` (nothing is
installed), isolated from this machine's pip configuration (``--isolated`` with PIP_CONFIG_FILE=/dev/null) and
against PyPI alone.  PyPI's CUDA torch wheels are 0.5 GB each plus 2.5 GB of nvidia-* wheels, so the metadata is
read with HTTP range requests (``--use-feature=fast-deps``; pip >= 25.3 then downloads no wheel in a dry run:
~15 MB per resolution).  When the running pip is older, a recent pip wheel (2 MB) is fetched and run from the
wheel file.  Without PyPI these tests skip and say why.  The CPU-only case uses the CPU torch wheel that pip's
configured find-links hold on this machine (the same wheel and metadata as PyTorch's CPU index, which this machine
cannot reach); where there is none it skips.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
requirements = pytest.importorskip("packaging.requirements")
markers = pytest.importorskip("packaging.markers")

ROOT = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/simple"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# environment-marker values of the platforms that matter (packaging.markers.default_environment() keys)
LINUX_X86_64 = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "x86_64"}
LINUX_AARCH64 = {"platform_system": "Linux", "sys_platform": "linux", "platform_machine": "aarch64"}
MACOS_ARM64 = {"platform_system": "Darwin", "sys_platform": "darwin", "platform_machine": "arm64"}
WINDOWS = {"platform_system": "Windows", "sys_platform": "win32", "platform_machine": "AMD64"}


def _names(reqs: list[str]) -> dict[str, requirements.Requirement]:
    out = {}
    for text in reqs:
        r = requirements.Requirement(text)
        out[r.name.lower()] = r
    return out


# ---- the metadata ---------------------------------------------------------------------------------------------
def test_runtime_requirements_are_ranges_without_triton():
    deps = _names(PROJECT["dependencies"])
    assert set(deps) == {"torch", "safetensors", "sentencepiece", "tiktoken", "numpy"}
    for name, r in deps.items():
        assert not any(s.operator in ("==", "===", "~=") for s in r.specifier), f"{name} is pinned: {r}"
        assert not any(s.operator in ("<", "<=") for s in r.specifier), f"{name} has an upper bound: {r}"
    assert "triton" not in deps
    assert deps["tiktoken"].specifier.contains("0.13.0") and not deps["tiktoken"].specifier.contains("0.12.0")


def test_triton_is_in_the_kernels_extra_only_where_triton_ships_wheels():
    extras = PROJECT["optional-dependencies"]
    holders = [name for name, reqs in extras.items() if "triton" in _names(reqs)]
    assert holders == ["kernels"]
    (triton,) = [r for r in map(requirements.Requirement, extras["kernels"]) if r.name == "triton"]
    env = markers.default_environment()
    for platform, wanted in ((LINUX_X86_64, True), (LINUX_AARCH64, True), (MACOS_ARM64, False), (WINDOWS, False)):
        assert triton.marker.evaluate({**env, **platform}) is wanted, platform
    # torch 2.13.0's CUDA wheel pins triton 3.7.1: the range must admit it (a pin on 3.8.0 made pip give up)
    assert triton.specifier.contains("3.7.1")


def test_the_version_has_one_source():
    import mistral_ref

    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mistral_ref.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", mistral_ref.__version__)


def test_the_notebooks_extra_installs_what_notebooks_readme_runs():
    readme = (ROOT / "notebooks" / "README.md").read_text()
    assert ".[notebooks]" in readme and "jupyter lab" in readme
    assert {"jupyterlab", "ipykernel", "matplotlib"} <= set(_names(PROJECT["optional-dependencies"]["notebooks"]))


def test_make_installs_a_cpu_torch_and_says_what_it_does():
    """The Makefile's set-up: no silent pip (-q), torch from local CPU wheels or PyTorch's CPU index, then the
    project constrained to the versions the tests passed with (what the rest of this file resolves)."""
    make = (ROOT / "Makefile").read_text()
    assert not re.search(r"pip install[^\n]* -q\b", make)
    assert "TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu" in make
    assert "--index-url $(TORCH_CPU_INDEX)" in make and "*+cpu*)" in make
    tested = dict(line.split("==") for line in re.search(r"TESTED := (.*)", make).group(1).split())
    assert _names(PROJECT["dependencies"])["torch"].specifier.contains(tested["torch"])
    (triton,) = [r for r in map(requirements.Requirement, PROJECT["optional-dependencies"]["kernels"])]
    assert triton.specifier.contains(tested["triton"])


# ---- pip's resolver ---------------------------------------------------------------------------------------------
def _pypi_reachable() -> bool:
    try:
        with urllib.request.urlopen(f"{PYPI}/pip/", timeout=15) as r:
            return r.status == 200
    except OSError:
        return False


def _isolated_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # with --isolated: no configuration file at all
    return env


def _pip(tmp: Path) -> list[str]:
    """A pip command whose dry runs read metadata without downloading wheels (pip >= 25.3 with fast-deps)."""
    out = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True)
    m = re.match(r"pip (\d+)\.(\d+)", out.stdout)
    if m and (int(m[1]), int(m[2])) >= (25, 3):
        return [sys.executable, "-m", "pip"]
    subprocess.run([sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--index-url", PYPI,
                    "--dest", str(tmp), "pip>=25.3"], check=True, capture_output=True, env=_isolated_env(),
                   timeout=300)
    (wheel,) = tmp.glob("pip-*.whl")
    return [sys.executable, str(wheel / "pip")]  # pip runs from its wheel file


def _local_cpu_torch_wheel() -> Path | None:
    """The CPU torch wheel for this Python in pip's configured find-links (pip config list), if any."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    dirs = [d for line in out.stdout.splitlines() if re.search(r"find-links=", line)
            for d in line.split("=", 1)[1].strip("'\"").split()]
    dirs += os.environ.get("PIP_FIND_LINKS", "").split()
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    found = sorted(p for d in dirs if Path(d).is_dir() for p in Path(d).glob(f"torch-*+cpu-{tag}-*.whl"))
    return found[-1] if found else None


def _resolve(pip: list[str], tmp: Path, name: str, reqs: list[str], constraints: list[str] = ()) -> dict:
    """pip install --dry-run on PyPI alone; returns {"rc", "output", "install": {name: (version, url)}}."""
    report = tmp / f"{name}.json"
    cmd = [*pip, "install", "--isolated", "--dry-run", "--ignore-installed", "--use-feature=fast-deps",
           "--index-url", PYPI, "--report", str(report)]
    if constraints:
        (tmp / f"{name}-constraints.txt").write_text("\n".join(constraints) + "\n")
        cmd += ["-c", str(tmp / f"{name}-constraints.txt")]
    out = subprocess.run([*cmd, *reqs], capture_output=True, text=True, env=_isolated_env(), timeout=900)
    install = {}
    if out.returncode == 0:
        for item in json.loads(report.read_text())["install"]:
            meta = item["metadata"]
            name = re.sub(r"[-_.]+", "-", meta["name"]).lower()  # PEP 503 normalised
            install[name] = (meta["version"], item["download_info"]["url"])
    return {"rc": out.returncode, "output": out.stdout + out.stderr, "install": install}  # pip explains on stdout


@pytest.fixture(scope="module")
def resolutions(tmp_path_factory) -> dict[str, dict]:
    """Every resolution at once (they wait on the network, not the CPU)."""
    if not _pypi_reachable():
        pytest.skip(f"{PYPI} is unreachable: the resolution of the metadata was not checked")
    tmp = tmp_path_factory.mktemp("resolve")
    pip = _pip(tmp / "pip")
    src = tmp / "src"  # build from a copy: an in-tree build would leave build/ and *.egg-info behind
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("mistral_ref", "triton_kernels"):
        shutil.copytree(ROOT / part, src / part, ignore=ignore)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    build = subprocess.run([*pip, "wheel", "--isolated", "--no-deps", "--index-url", PYPI, "--wheel-dir",
                            str(tmp / "dist"), str(src)], capture_output=True, text=True, env=_isolated_env(),
                           timeout=600)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp / "dist").glob("mistral_ref-*.whl")
    cases = {
        # a new user on Linux x86_64: PyPI's torch is the CUDA build
        "cuda": ([f"{wheel}[kernels]"], []),
        # the case that failed: torch 2.13.0 (CUDA) depends on triton==3.7.1, the project pinned triton==3.8.0
        "cuda-2.13": ([f"{wheel}[kernels]"], ["torch==2.13.0"]),
        # the same check has teeth: pinning triton 3.8.0 again must be refused
        "cuda-2.13-triton-3.8": ([f"{wheel}[kernels]", "triton==3.8.0"], ["torch==2.13.0"]),
    }
    cpu = _local_cpu_torch_wheel()
    if cpu is not None:  # what `make` installs: CPU torch, then the project with its test and kernels extras
        cases["cpu"] = ([str(cpu), f"{wheel}[kernels,test]"], [])
        cases["cpu-no-extras"] = ([str(cpu), str(wheel)], [])
        cases["cpu-notebooks"] = ([str(cpu), f"{wheel}[notebooks]"], [])  # notebooks/README.md's install
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = {k: pool.submit(_resolve, pip, tmp, k, reqs, cons) for k, (reqs, cons) in cases.items()}
        results = {k: f.result() for k, f in futures.items()}
    results["version"] = wheel.name.split("-")[1]
    return results


def _ok(result: dict) -> dict:
    assert result["rc"] == 0, result["output"][-3000:]
    return result["install"]


@pytest.mark.slow
@pytest.mark.network
def test_resolves_with_pypis_cuda_torch_and_the_kernels_extra(resolutions):
    install = _ok(resolutions["cuda"])
    assert "+" not in install["torch"][0] and any(n.startswith("nvidia-") for n in install)  # the CUDA build
    assert "triton" in install and "mistral-ref" in install


@pytest.mark.slow
@pytest.mark.network
def test_resolves_the_reported_case_cuda_torch_2_13(resolutions):
    install = _ok(resolutions["cuda-2.13"])
    assert install["torch"][0] == "2.13.0" and install["triton"][0] == "3.7.1"


@pytest.mark.slow
@pytest.mark.network
def test_the_resolution_check_fails_on_a_conflict(resolutions):
    result = resolutions["cuda-2.13-triton-3.8"]
    assert result["rc"] != 0 and "ResolutionImpossible" in result["output"]
    assert "torch 2.13.0 depends on triton==3.7.1" in result["output"]


@pytest.mark.slow
@pytest.mark.network
def test_resolves_with_cpu_torch_and_without_triton(resolutions):
    if "cpu" not in resolutions:
        pytest.skip("no CPU torch wheel in pip's find-links here (PyTorch's CPU index is not reachable from "
                    "this machine): the CPU-only resolution was not checked")
    full = _ok(resolutions["cpu"])  # what `make` resolves
    assert full["torch"][0].endswith("+cpu") and not any(n.startswith("nvidia-") for n in full)
    assert {"triton", "transformers", "mistral-common", "pytest"} <= set(full)
    base = _ok(resolutions["cpu-no-extras"])  # the library alone: no Triton, no GPU libraries
    assert "triton" not in base and not any(n.startswith(("nvidia-", "cuda-")) for n in base)
    assert {"torch", "safetensors", "sentencepiece", "tiktoken", "numpy", "mistral-ref"} <= set(base)
    assert base["mistral-ref"][0] == resolutions["version"]
    notebooks = _ok(resolutions["cpu-notebooks"])  # JupyterLab for `jupyter lab notebooks/`
    assert {"jupyterlab", "ipykernel", "matplotlib"} <= set(notebooks) and "+cpu" in notebooks["torch"][0]
