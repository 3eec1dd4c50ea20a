"""backends/ops_builder.py, the process that builds the operators' C++ library: run as cpu_gemv runs it (a script,
standard library only), with commands that need no compiler."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mistral_ref.backends.cpu_gemv import BUILDER


def run_builder(tmp_path: Path, commands: list[list[str]], lock: Path | None = None) -> subprocess.CompletedProcess:
    spec = {"target": str(tmp_path / "lib.so"), "lock": str(lock or tmp_path / "lib.lock"), "built": "out.so",
            "commands": commands}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    return subprocess.run([sys.executable, "-I", str(BUILDER), str(spec_file)], capture_output=True, text=True,
                          timeout=60)


def test_the_builder_runs_its_commands_in_order_and_renames_the_result(tmp_path):
    done = run_builder(tmp_path, [["sh", "-c", "echo first > {tmp}/part"],
                                  ["sh", "-c", "cat {tmp}/part > {tmp}/out.so; echo second >> {tmp}/out.so"]])
    assert done.returncode == 0 and done.stdout == "" and done.stderr == "", done
    target = tmp_path / "lib.so"
    assert target.read_text() == "first\nsecond\n" and target.stat().st_mode & 0o777 == 0o700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.lock", "lib.so"]  # spec read and deleted, no tmp dir


def test_the_builder_does_nothing_when_the_target_exists(tmp_path):
    (tmp_path / "lib.so").write_text("built before")
    done = run_builder(tmp_path, [["sh", "-c", "echo again > {tmp}/out.so"]])
    assert done.returncode == 0 and (tmp_path / "lib.so").read_text() == "built before"


def test_a_failing_command_is_one_line_naming_it_and_leaves_no_target(tmp_path):
    done = run_builder(tmp_path, [["sh", "-c", "echo compiling; echo 'error: no such header' >&2; exit 3"],
                                  ["sh", "-c", "echo never > {tmp}/out.so"]])
    assert done.returncode == 1 and done.stdout == "failed (sh): error: no such header\n", done
    assert not (tmp_path / "lib.so").exists()
    done = run_builder(tmp_path, [["no-such-compiler-here", "-c", "x.c"]])
    assert done.returncode == 1 and done.stdout.startswith("cannot run no-such-compiler-here: "), done


def test_a_lock_that_cannot_be_taken_is_one_line_not_a_traceback(tmp_path):
    done = run_builder(tmp_path, [["sh", "-c", "echo x > {tmp}/out.so"]], lock=tmp_path / "missing" / "lib.lock")
    assert done.returncode == 1 and done.stderr == "", done
    assert done.stdout.startswith("cannot lock ") and done.stdout.count("\n") == 1, done
