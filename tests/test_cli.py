"""The command line: info prints the family table (instantly, without torch), --version, help texts with their
defaults, --threads on every command, --compile's report, serve's port check, chat's commands and default reply
length, the embedded model's dtype however it is named; chat / generate / serve / demo run end to end."""

import argparse
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

import mistral_ref
from mistral_ref import cli
from mistral_ref.cli import build_parser, default_threads, main
from mistral_ref.embedded import EMBEDDED_MODEL_DIR
from mistral_ref.family import family_table


def test_info_command(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "mistral-nemo-12b" in out and out.strip() == family_table()


def test_info_imports_no_torch_and_prints_at_once():
    """`info` used to take 11 s (torch, then torch._dynamo); it needs neither: the counts come from the shapes."""
    code = ("import sys, time; t = time.perf_counter(); from mistral_ref.cli import main; main(['info']); "
            "print(time.perf_counter() - t, sorted(m for m in sys.modules if m.split('.')[0] == 'torch' "
            "or m == 'mistral_ref.model'))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    seconds, modules = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert modules == "[]"
    assert float(seconds) < 1.0 and wall < 5.0, (seconds, wall)  # measured ~0.05 s in-process, ~0.2-0.5 s wall


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"mistral-ref {mistral_ref.__version__}\n"


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from ((f"{name} {a}", action) for a, action in _options(sub))
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield "/".join(action.option_strings) or action.dest, action


def test_every_option_says_what_it_does_and_its_default():
    options = list(_options(build_parser()))
    assert len(options) > 30
    for name, action in options:
        assert action.help, name
        if action.option_strings or action.nargs == "?":  # optional: its default is stated, or it is required
            assert "default:" in action.help or ("(required)" in action.help and action.required), name


# ---- threads ----------------------------------------------------------------------------------------------------
def test_default_threads_one_for_small_models_else_the_free_physical_cores():
    assert default_threads(4_200_000, cores=8, busy=0)[0] == 1  # the embedded model: threads only fight
    assert default_threads(7_000_000_000, cores=8, busy=0)[0] == 8
    assert default_threads(7_000_000_000, cores=8, busy=3)[0] == 5  # a busy core stalls every parallel step
    assert default_threads(7_000_000_000, cores=2, busy=2)[0] == 1
    assert default_threads(None, cores=4, busy=1)[0] == 3
    assert 1 <= cli.physical_cores() <= (torch.get_num_threads() + 1024)


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_threads_option_is_applied_by_every_command(tmp_path_factory, monkeypatch, capsys, restore_threads):
    """demo, convert, chat, generate and serve take --threads N and run with N torch threads (serve: in the
    thread that answers requests, which the server starts after the setting)."""
    import io

    import mistral_ref.checkpoint
    import mistral_ref.demo
    import mistral_ref.server

    seen = {}

    def in_new_thread():
        box = []
        t = threading.Thread(target=lambda: box.append(torch.get_num_threads()))
        t.start()
        t.join()
        return box[0]

    monkeypatch.setattr(mistral_ref.demo, "run_demo", lambda: seen.setdefault("demo", torch.get_num_threads()) * 0)
    monkeypatch.setattr(mistral_ref.checkpoint, "convert_checkpoint",
                        lambda *a, **k: seen.setdefault("convert", torch.get_num_threads()))
    monkeypatch.setattr(mistral_ref.server, "serve", lambda *a, **k: seen.setdefault("serve", in_new_thread()))
    path, _ = _checkpoint(tmp_path_factory)
    for n, argv in enumerate([["demo"], ["convert", str(path), str(tmp_path_factory.mktemp("o")), "--to", "hf"],
                              ["serve", str(path), "--port", "0"]], start=2):
        torch.set_num_threads(1)
        assert main([*argv, "--threads", str(n)]) == 0
        assert seen[argv[0]] == n
    for n, argv in enumerate([["generate", str(path), "--prompt", "Hi", "--max-tokens", "2"],
                              ["chat", str(path)]], start=2):
        monkeypatch.setattr("sys.stdin", io.StringIO(""))
        torch.set_num_threads(1)
        assert main([*argv, "--threads", str(n)]) == 0
        assert torch.get_num_threads() == n
    err = capsys.readouterr().err
    assert err.count("threads: 2 (--threads)") == 2 and "threads: 4 (--threads)" in err
    assert main(["generate", str(path), "--prompt", "Hi", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_without_threads_option_the_default_is_chosen_and_said(tmp_path_factory, monkeypatch, capsys,
                                                               restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    path, _ = _checkpoint(tmp_path_factory)
    assert main(["generate", str(path), "--prompt", "Hi", "--max-tokens", "2"]) == 0
    assert torch.get_num_threads() == 1
    assert "one thread is fastest for a model this small" in capsys.readouterr().err  # a tiny test model
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert main(["generate", str(path), "--prompt", "Hi", "--max-tokens", "2"]) == 0
    assert "threads: 1 (OMP_NUM_THREADS)" in capsys.readouterr().err


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


def test_compile_says_it_compiles_and_reports_compile_time_apart_from_tokens_per_second(
        tmp_path_factory, capsys, monkeypatch):
    """generate --compile announces the compilation, times it on a warm-up of the same shape, then reports the
    tokens/s of the real run alone (compile_decode is stubbed: compiling itself is timed by make bench)."""
    from mistral_ref.model import Transformer

    path, _ = _checkpoint(tmp_path_factory)
    monkeypatch.setattr(Transformer, "compile_decode", lambda self, *a, **k: time.sleep(0.3) or self)
    assert main(["generate", str(path), "--prompt", "Hi", "--max-tokens", "3", "--temperature", "0", "--compile"]) == 0
    err = capsys.readouterr().err
    assert "compiling the decode step (torch.compile, regional: " in err and ") now;" in err
    assert "not counted in tokens/s below" in err and "compiled in 0." in err
    assert err.index("compiled in") < err.index("3 tokens in")


def test_serve_checks_the_port_before_loading_the_model(monkeypatch, capsys):
    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded although the port is taken")

    monkeypatch.setattr(cli, "load_for_cli", must_not_load)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


def test_chat_help_lists_the_commands_and_sends_nothing_to_the_model(tmp_path_factory, capsys, monkeypatch):
    import io

    from mistral_ref.api import chat_completion
    from mistral_ref.checkpoint import load_model

    path, tok = _checkpoint(tmp_path_factory)
    monkeypatch.setattr("sys.stdin", io.StringIO("/help\n/frobnicate\nHello there\n"))
    assert main(["chat", str(path), "--temperature", "0", "--max-tokens", "4"]) == 0
    out = capsys.readouterr()
    expected = chat_completion(load_model(path), tok, [{"role": "user", "content": "Hello there"}], temperature=0,
                               max_tokens=4)["choices"][0]["message"]["content"]
    assert out.out.splitlines() == [expected]  # one reply: /help and /frobnicate never reached the model
    assert out.err.count("chat commands:") == 2 and "unknown command /frobnicate" in out.err
    for command in ("/help", "/reset", "/exit"):
        assert command in out.err


def test_chat_replies_have_a_default_length(tmp_path_factory, capsys, monkeypatch):
    import io

    from mistral_ref.model import Transformer

    path, _ = _checkpoint(tmp_path_factory)
    monkeypatch.setattr(Transformer, "compile_decode", lambda self, *a, **k: self)  # compiling: make bench
    monkeypatch.setattr(cli, "CHAT_MAX_TOKENS", 5)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    assert main(["chat", str(path), "--temperature", "0", "--compile"]) == 0
    err = capsys.readouterr().err
    assert "reached max_tokens (5)" in err  # the random test model never says EOS: cut at the default
    assert "5 tokens in" in err  # --compile reports each reply's time


@pytest.mark.slow
def test_chat_compiles_in_the_background_and_says_when_the_compiled_step_is_ready(tmp_path_factory, tmp_path,
                                                                                   capsys, monkeypatch):
    """chat --compile: the reply starts at once (eager steps) and is the eager reply; the compiled step (dynamo's
    eager backend here: inductor is timed by make bench) is reported ready, saved, and loaded by the next start."""
    import io

    from mistral_ref.backends.compiled import compile_decode
    from mistral_ref.model import Transformer

    path, _ = _checkpoint(tmp_path_factory)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    assert main(["chat", str(path), "--temperature", "0", "--max-tokens", "12"]) == 0
    eager = capsys.readouterr().out
    monkeypatch.setattr(Transformer, "compile_decode",
                        lambda self, **k: compile_decode(self, backend="eager", **k))
    for start in ("compiled and saved", "loaded"):
        torch._dynamo.reset()
        monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
        assert main(["chat", str(path), "--temperature", "0", "--max-tokens", "12", "--compile"]) == 0
        out = capsys.readouterr()
        assert out.out == eager
        assert "in the background" in out.err and "compiled decode step ready" in out.err
        assert f"({start})" in out.err


def test_chat_default_reply_length_is_capped_by_the_context(tmp_path_factory, capsys, monkeypatch):
    import io

    path, tok = _checkpoint(tmp_path_factory)
    prompt = len(tok.encode_chat([{"role": "user", "content": "Hello there"}]))
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    assert main(["chat", str(path), "--temperature", "0", "--max-context", str(prompt + 3)]) == 0
    assert "reached max_tokens (3)" in capsys.readouterr().err


def test_the_embedded_model_gives_the_same_text_by_default_and_by_path(capsys):
    """It used to run in fp32 by default and in bf16 (the file's dtype) when named by its path: other text."""
    argv = ["--prompt", "Returns the", "--max-tokens", "24", "--temperature", "0", "--ignore-eos"]
    assert main(["generate", *argv]) == 0
    default = capsys.readouterr()
    assert main(["generate", str(EMBEDDED_MODEL_DIR), *argv]) == 0
    by_path = capsys.readouterr()
    assert default.out == by_path.out and len(default.out) > 20
    assert "(torch.float32)" in default.err and "(torch.float32)" in by_path.err
    assert main(["generate", str(EMBEDDED_MODEL_DIR), *argv, "--dtype", "bfloat16"]) == 0
    assert "(torch.bfloat16)" in capsys.readouterr().err  # --dtype still wins


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


def test_the_cli_stacks_the_experts_of_the_model_it_loads():
    """load_for_cli stacks a MoE model's experts (their parameters become views of the stacks, same values), so an
    eager one-token step takes the C experts kernel, and joins each layer's wq, wk, wv into one tensor (a prompt's
    one product of the three); the logits of a step equal the plain model's."""
    from mistral_ref.backends.linear import joined
    from mistral_ref.embedded import load_embedded

    model, _, _ = cli.load_for_cli(None, "float32")
    plain, _ = load_embedded(dtype="float32")
    for m, laid_out in ((model, True), (plain, False)):
        qkv = [[getattr(layer.attention, n).weight for n in ("wq", "wk", "wv")] for layer in m.layers]
        assert all((joined(ws) is not None) == laid_out for ws in qkv)
    layers = [layer.feed_forward for layer in model.layers]
    assert all(ff.stacked is not None for ff in layers)
    for ff in layers:
        w1 = ff.stacked[0]
        assert ff.experts[1].w1.weight.data_ptr() == w1[1].data_ptr()
    assert all(layer.feed_forward.stacked is None for layer in plain.layers)
    tokens = torch.tensor([[1, 5, 9, 30]])
    positions = torch.arange(4)[None]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, positions), plain(tokens, positions), rtol=1e-5, atol=1e-5)
    from mistral_ref.generation import generate

    prompt = [[1, 5, 9, 30, 2, 7]]  # one-token decode steps: the stacked model's go to the C experts kernel
    stacked, lists = (generate(m, prompt, 8, temperature=0.0)[0].tokens for m in (model, plain))
    assert stacked == lists
