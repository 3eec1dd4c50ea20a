"""The package surface: every lazily exported name resolves, and importing it stays cheap."""

import subprocess
import sys

import mistral_ref


def test_every_export_resolves():
    for name in mistral_ref.__all__:
        assert getattr(mistral_ref, name) is not None, name


def test_import_is_lazy():
    """`import mistral_ref` alone imports neither torch nor the tokenizer libraries."""
    code = "import sys, mistral_ref; print('torch' in sys.modules, 'sentencepiece' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
