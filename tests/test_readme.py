"""Every Python snippet in README.md runs as written.

Each ```python block runs on its own, in a fresh interpreter, in an empty temporary directory (so a snippet must
build whatever it needs: the embedded model stands in for a downloaded checkpoint).  A line
`<!-- readme: server -->` before a block runs it against `mistral-ref serve` (the embedded model) on the address
the snippet names; `<!-- readme: torchrun N -->` runs it under torchrun with N processes.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- readme: (?P<tag>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def snippets() -> list[tuple[int, str, str]]:
    text = (REPO / "README.md").read_text()
    return [(text[:m.start()].count("\n") + 1, m["tag"] or "", m["code"]) for m in BLOCK.finditer(text)]


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    return env


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


@pytest.mark.slow
@pytest.mark.parametrize("line, tag, code", snippets(), ids=[f"README.md:{n}" for n, _, _ in snippets()])
def test_readme_snippet_runs(line, tag, code, tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(code)
    command = [sys.executable, str(script)]
    server = None
    if tag.startswith("torchrun"):
        n = tag.split()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", n, "--master-port", "29512",
                   str(script)]
    elif tag == "server":
        host, port = re.search(r"http://([\d.]+):(\d+)", code).groups()
        if not port_free(host, int(port)):
            pytest.skip(f"{host}:{port} is in use on this machine")
        server = subprocess.Popen([sys.executable, "-m", "mistral_ref", "serve", "--host", host, "--port", port],
                                  cwd=tmp_path, env=environment(), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while port_free(host, int(port)):
            assert server.poll() is None and time.time() < deadline, server.stderr.read() if server.stderr else ""
            time.sleep(0.5)
    elif tag:
        raise AssertionError(f"README.md:{line}: unknown readme tag {tag!r}")
    try:
        out = subprocess.run(command, cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600)
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    assert out.returncode == 0, f"README.md:{line} failed:\n{code}\n{out.stderr[-4000:]}"


def test_snippets_are_found():
    assert len(snippets()) >= 8 and all(code.strip() for _, _, code in snippets())
