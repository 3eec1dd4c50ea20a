"""The command line: info prints the family table with published parameter counts; demo runs end to end."""

import subprocess
import sys

from mistral_ref.cli import family_table, main


def test_family_table_has_every_preset_and_published_counts():
    table = family_table()
    for name in ("mistral-7b-v0.1", "mixtral-8x7b", "mixtral-8x22b", "mistral-nemo-12b", "mistral-large-2407"):
        assert f"| {name} |" in table
    assert "| 46.70B | 12.88B |" in table  # Mixtral-8x7B: 46.7B total, 12.9B active
    assert "| 140.63B | 39.16B |" in table  # Mixtral-8x22B: 141B / 39B


def test_info_command(capsys):
    assert main(["info"]) == 0
    assert "mistral-nemo-12b" in capsys.readouterr().out


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "mistral_ref", "info"], capture_output=True, text=True, check=True)
    assert "mixtral-8x22b" in out.stdout


def test_errors_are_reported_not_raised(tmp_path, capsys):
    # converting a directory that holds no checkpoint is a clear one-line error, exit code 2
    assert main(["convert", str(tmp_path), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "error" in capsys.readouterr().err
