"""The command line: info prints the family table with published parameter counts; demo runs end to end."""

import subprocess
import sys

import pytest

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


# ---- chat / generate / serve (issue 5) --------------------------------------------------------------------------
def _checkpoint(tmp_path_factory):
    import shutil

    from chat_models import DATA, SP_V3, tiny_model, tokenizer

    from mistral_ref.checkpoint import save_checkpoint

    if DATA is None:
        pytest.skip("the mistral-common wheel ships the tokenizer files")
    tok = tokenizer(SP_V3)
    path = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(tiny_model(tok, max_seq_len=512), path)
    shutil.copy(DATA / SP_V3, path / "tokenizer.model.v3")  # a temporary copy of the test asset
    return path, tok


def test_generate_command_streams_the_greedy_completion(tmp_path_factory, capsys):
    from mistral_ref.checkpoint import load_model
    from mistral_ref.generation import generate

    path, tok = _checkpoint(tmp_path_factory)
    assert main(["generate", str(path), "--prompt", "Once upon a time", "--max-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    prompt = tok.encode("Once upon a time", bos=True)
    (ref,) = generate(load_model(path), [prompt], 6, temperature=0, eos_id=tok.eos_id)
    # a raw completion continues the prompt's text: it keeps the space SentencePiece puts before the first piece
    continuation = tok.decode(prompt + ref.tokens)[len(tok.decode(prompt)):]
    assert continuation != tok.decode(ref.tokens)  # the space matters here, so the check below has teeth
    assert out.out == continuation + "\n"
    assert "6 tokens" in out.err and "finish: length" in out.err


def test_compile_option_compiles_the_decode_step_before_generating(tmp_path_factory, capsys, monkeypatch):
    """--compile calls Transformer.compile_decode (compiling itself is left to the benchmark: it takes minutes)."""
    from mistral_ref.model import Transformer

    path, _ = _checkpoint(tmp_path_factory)
    calls = []
    monkeypatch.setattr(Transformer, "compile_decode", lambda self, *a, **k: calls.append(self) or self)
    assert main(["generate", str(path), "--prompt", "Hi", "--max-tokens", "2", "--temperature", "0",
                 "--compile"]) == 0
    assert len(calls) == 1 and isinstance(calls[0], Transformer)
    assert main(["generate", str(path), "--prompt", "Hi", "--max-tokens", "2", "--temperature", "0"]) == 0
    assert len(calls) == 1
    capsys.readouterr()


def test_chat_command_reads_turns_and_streams_replies(tmp_path_factory, capsys, monkeypatch):
    import io

    from mistral_ref.api import chat_completion
    from mistral_ref.checkpoint import load_model

    path, tok = _checkpoint(tmp_path_factory)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/reset\nSecond question\n"))
    assert main(["chat", str(path), "--temperature", "0", "--max-tokens", "5", "--system", "Be brief."]) == 0
    out = capsys.readouterr()
    model = load_model(path)
    expected = [chat_completion(model, tok, [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": q}], temperature=0, max_tokens=5)
                ["choices"][0]["message"]["content"] for q in ("Hello there", "Second question")]
    assert out.out.splitlines() == expected  # /reset: the second question is asked on a fresh conversation
    assert "[conversation cleared]" in out.err


def test_chat_without_checkpoint_uses_the_embedded_model_or_says_why_not(capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n"))
    code = main(["chat", "--max-tokens", "3"])
    err = capsys.readouterr().err
    if code == 0:
        assert "[using the embedded model" in err
    else:
        assert code == 2 and "embedded model" in err


@pytest.mark.slow
def test_serve_command_answers_http(tmp_path_factory):
    import json
    import signal
    import urllib.request

    path, _ = _checkpoint(tmp_path_factory)
    proc = subprocess.Popen([sys.executable, "-m", "mistral_ref", "serve", str(path), "--port", "0",
                             "--model-name", "cli-test"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(proc.stderr.read())
        url = line.split(" on ")[1].split()[0]
        with urllib.request.urlopen(url + "/info", timeout=60) as resp:
            assert json.loads(resp.read())["model_name"] == "cli-test"
        req = urllib.request.Request(url + "/v1/chat/completions", method="POST",
                                     data=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 2}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert json.loads(resp.read())["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_generate_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 -m mistral_ref generate` shards the model and prints the same greedy text."""
    import os
    import shutil
    import socket

    import torch

    from mistral_ref.checkpoint import save_checkpoint
    from mistral_ref.config import ModelArgs, MoeArgs
    from mistral_ref.model import Transformer
    from mistral_ref.tokenizer import mistral_common_data_dir

    data = mistral_common_data_dir()
    if data is None:
        pytest.skip("mistral-common's tokenizer files are not installed")
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=24, vocab_size=32768,
                     sliding_window=6, moe=MoeArgs(4, 2))
    model = Transformer(args)
    for p in model.parameters():  # decisive logits, so greedy ties cannot differ between 1 and 2 ranks
        p.data.normal_(0, 0.3)
    save_checkpoint(model, tmp_path / "ckpt", format="native")
    shutil.copy(data / "mistral_instruct_tokenizer_240323.model.v3", tmp_path / "ckpt" / "tokenizer.model.v3")
    cmd = ["generate", str(tmp_path / "ckpt"), "--prompt", "Hello there, how are", "--temperature", "0",
           "--max-tokens", "12", "--ignore-eos"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    one = subprocess.run([sys.executable, "-m", "mistral_ref", *cmd], capture_output=True, text=True, env=env,
                         timeout=300)
    assert one.returncode == 0, one.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "mistral_ref", *cmd],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "sharded over 2 ranks" in two.stderr
    assert one.stdout.strip() and two.stdout == one.stdout


@pytest.mark.slow
def test_demo_runs_end_to_end():
    """`make demo`: the family table, then the embedded model completing, chatting (EOS) and calling a tool."""
    out = subprocess.run([sys.executable, "-m", "mistral_ref", "demo"], capture_output=True, text=True,
                         timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "| mixtral-8x7b |" in text and "== The embedded model: tiny-mixtral" in text
    assert text.count("[finish_reason=stop]") >= 3  # chat replies end with EOS
    assert "tools offered: ['add', 'multiply', 'convert_units']" in text
