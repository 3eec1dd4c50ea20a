"""Build the operators' C++ library (cpu_gemv_ops.cpp) in a process of its own, which outlives the one that asked.

cpu_gemv.build_ops starts this file as a script (``python -I ops_builder.py SPEC.json``; standard library only, so
it starts in milliseconds) in a new session at low priority, and waits for it in a background thread.  A short
`mistral-ref chat` or `generate` may exit long before the ~15 s build ends: the build still completes and the next
start loads the library, instead of every short start beginning the build again and leaving a half-done compiler
behind.

SPEC.json: {"commands": [[argv...], ...] (run in order, in a temporary directory next to the target; "{tmp}" in
an argument is that directory), "built": the file the last command writes (relative to {tmp}), "target": where
it goes (atomically, by rename), "lock": a file locked while building (processes sharing the cache build once)}.
The spec file is deleted once read.  Exit status 0 when the target exists; otherwise 1 and one line on stdout
saying what failed.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT_S = 600  # per command


def build(spec: dict) -> str | None:
    """Run spec's commands unless its target exists; None on success, else what failed (one line)."""
    target = Path(spec["target"])
    try:
        lock = open(spec["lock"], "w")
    except OSError as e:
        return f"cannot lock {spec['lock']}: {e}"
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process building the same target: wait for it, then done
        except OSError as e:
            return f"cannot lock {spec['lock']}: {e}"
        if target.exists():
            return None
        try:
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                error = run_commands(spec["commands"], tmp)
                if error:
                    return error
                built = Path(tmp) / spec["built"]
                os.chmod(built, 0o700)
                os.replace(built, target)  # atomic: a reader finds a whole file or none
        except OSError as e:  # (no room, no permission, a command that did not write `built`)
            return f"cannot build in {target.parent}: {e}"
    return None


def run_commands(commands: list[list[str]], tmp: str) -> str | None:
    """Each command in turn, "{tmp}" in its arguments replaced; None when all succeed, else the first failure."""
    for command in commands:
        argv = [arg.replace("{tmp}", tmp) for arg in command]
        try:
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"took over {TIMEOUT_S} s ({argv[0]})"
        except OSError as e:
            return f"cannot run {argv[0]}: {e}"
        if done.returncode != 0:
            lines = done.stdout.strip().splitlines() or ["(no output)"]
            errors = [line for line in lines if "error" in line]  # (a compiler's last line is often context)
            return f"failed ({argv[0]}): {errors[0] if errors else lines[-1]}"
    return None


def main(argv: list[str]) -> int:
    try:
        os.nice(10)  # a build beside decoding takes the cores' spare time
    except OSError:
        pass
    spec_file = Path(argv[1])
    spec = json.loads(spec_file.read_text())
    spec_file.unlink()
    error = build(spec)
    if error:
        try:
            os.write(sys.stdout.fileno(), f"{error}\n".encode())
        except OSError:
            pass  # the process that asked has exited: only the target matters
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
