"""`mistral-ref parity` end to end on tiny random checkpoints in every format: exact agreement of two loaders,
a perturbed layer that the report points at, transformers (HF, native and GGUF checkpoints) with the JSON and
the plot, the error of a quantization, and mismatched sides refused before anything loads."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from model_helpers import random_model

from mistral_ref import parity
from mistral_ref.checkpoint import CheckpointError, save_checkpoint
from mistral_ref.cli import main
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.embedded import EMBEDDED_MODEL_DIR

ARGS = ModelArgs(dim=64, n_layers=4, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=160,
                 norm_eps=1e-6, rope_theta=1e4, sliding_window=7, max_seq_len=512)
MOE_ARGS = dataclasses.replace(ARGS, n_layers=3, moe=MoeArgs(4, 2))
TOKENS = "1 17 33 5 99 140 2 8 61 77 150 3 12 44 9 101 120"  # 17 > the window


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One random model in every format: native, hf (+ tokenizer), gguf (F32 and Q8_0); and a MoE in hf."""
    root = tmp_path_factory.mktemp("parity")
    model = random_model(ARGS)
    out = {"native": save_checkpoint(model, root / "native").config.parent,
           "hf": save_checkpoint(model, root / "hf", format="hf").config.parent,
           "moe-native": save_checkpoint(random_model(MOE_ARGS, seed=1), root / "moe-native").config.parent}
    out["moe-hf"] = save_checkpoint(random_model(MOE_ARGS, seed=1), root / "moe-hf", format="hf").config.parent
    if _has("gguf"):
        from mistral_ref.checkpoint import save_gguf

        (root / "gguf").mkdir()
        out["gguf"] = save_gguf(model, root / "gguf" / "m.gguf", "F32")
        # transformers' GGUF loader ignores llama.attention.sliding_window: its comparisons use a window-free model
        plain = random_model(dataclasses.replace(ARGS, sliding_window=None), seed=2)
        out["plain-hf"] = save_checkpoint(plain, root / "plain-hf", format="hf").config.parent
        out["q8"] = save_gguf(plain, root / "gguf" / "plain-q8_0.gguf", "Q8_0")
    return out


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_cli(*argv: str, capsys) -> tuple[int, str, str]:
    code = main(["parity", *argv, "--threads", "1"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- two loaders, one computation: exact ---------------------------------------------------------------------
@pytest.mark.parametrize("other", ["hf", "gguf"])
def test_native_against_another_format_is_exact(checkpoints, other, tmp_path, capsys):
    if other not in checkpoints:
        pytest.skip("the gguf package is not installed")
    out = tmp_path / "report.json"
    code, text, err = run_cli(str(checkpoints["native"]), "--against", str(checkpoints[other]), "--tokens", TOKENS,
                              "--layers", "--generate", "5", "--json", str(out), capsys=capsys)
    assert code == 0, text + err
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["records"]]
    assert names[:4] == ["embeddings", "layers.0.attention", "layers.0.feed_forward", "layers.0.residual"]
    assert names[-2:] == ["norm", "logits"] and len(names) == 1 + 3 * ARGS.n_layers + 2
    assert all(r["max_abs"] == 0 and r["nmse"] == 0 and abs(r["cosine"] - 1) < 1e-12 for r in report["records"])
    assert report["logits"]["top1"] == 1 and report["logits"]["kl_max"] == 0
    assert report["greedy"]["first_divergence"] is None and len(report["greedy"]["a_tokens"]) == 5
    assert report["first_jump"] is None and report["passed"]
    assert "PASS: logits max_rel 0.00e+00 <= tolerance 1e-05 (float32)" in text
    assert "layer 4/4" in err and "peak resident memory" in err  # progress per layer, memory per side


def test_moe_router_choices_are_compared(checkpoints, tmp_path):
    tokens = [int(t) for t in TOKENS.split()]
    report = parity.run_parity(checkpoints["moe-native"], checkpoints["moe-hf"], tokens, dtype="float32")
    assert [r.layer for r in report.routers] == [0, 1, 2]
    assert all(r.agree == r.tokens == len(tokens) and r.first_difference is None for r in report.routers)
    assert "layers.1.router          experts agree on 17/17 tokens" in report.table()


# ---- a wrong layer is found -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tensor,record", [
    ("layers.2.feed_forward.w2.weight", "layers.2.feed_forward"),
    ("layers.1.attention.wv.weight", "layers.1.attention"),
])
def test_a_perturbed_layer_is_pointed_at(checkpoints, tmp_path, tensor, record, capsys):
    """Copy the checkpoint, nudge one tensor by 1%: the report's first jump is that layer's record, everything
    before it is exact, the logits fail the tolerance (exit status 1), and the plot marks it."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["native"], broken)
    weights = load_file(broken / "consolidated.safetensors")
    weights[tensor] = weights[tensor] * 1.01
    save_file(weights, broken / "consolidated.safetensors")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code, text, _ = run_cli(str(broken), "--against", str(checkpoints["hf"]), "--tokens", TOKENS,
                            "--json", str(out), "--plot", str(png), capsys=capsys)
    assert code == 1
    report = json.loads(out.read_text())
    assert report["first_jump"] == record == report["first_over_tolerance"]
    names = [r["name"] for r in report["records"]]
    assert all(r["max_abs"] == 0 for r in report["records"][:names.index(record)])
    assert report["records"][names.index(record)]["max_rel"] > 1e-3
    assert f"{record:<24}" in text and "<- first jump" in text and "FAIL: logits max_rel" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_first_jump_rule():
    def rec(name, err):
        return parity.RecordError(name, name, None, err, err, err, 1.0)

    smooth = [rec("a", 0), rec("b", 1e-7), rec("c", 3e-7), rec("d", 2e-6)]
    assert parity.first_jump(smooth, 1e-5) is None  # below the tolerance nothing jumps
    assert parity.first_jump([*smooth, rec("e", 1e-3), rec("f", 1e-1)], 1e-5) == "e"
    assert parity.first_jump([rec("a", 2e-2), rec("b", 3e-2)], 1e-5) == "a"  # wrong from the start
    assert parity.first_jump([rec("a", 1e-4), rec("b", 5e-4)], 1e-5) == "a"


def test_error_measures():
    b = torch.tensor([[1.0, -2.0], [4.0, 0.5]])
    a = b + torch.tensor([[0.0, 0.1], [-0.2, 0.0]])
    r = parity.compare("layers.3.residual", a, b)
    assert (r.layer, r.kind) == (3, "residual")
    assert r.max_abs == pytest.approx(0.2) and r.max_rel == pytest.approx(0.05)
    assert r.nmse == pytest.approx((0.01 + 0.04) / (1 + 4 + 16 + 0.25))
    assert r.cosine == pytest.approx(float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0)))
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, -2.0, -3.0], [0.0, 2.0, 1.0, -1.0, -2.0, -3.0]])
    agree = parity.logits_agreement(logits, logits.flip(-1))
    assert agree.top1 == 0 and agree.kl_mean > 0
    same = parity.logits_agreement(logits, logits)
    assert (same.top1, same.top5, same.kl_max) == (1, 1, 0)


# ---- against transformers -------------------------------------------------------------------------------------
@pytest.mark.oracle
@pytest.mark.parametrize("name", ["hf", "native", "moe-hf"])
def test_against_transformers(checkpoints, name, tmp_path, capsys):
    """transformers loads the HF files (native ones through a temporary conversion); fp32 within 1e-5, every
    record within it too, the same greedy tokens; bf16 within its default tolerance."""
    pytest.importorskip("transformers")
    out = tmp_path / "r.json"
    code, text, err = run_cli(str(checkpoints[name]), "--tokens", TOKENS, "--layers", "--generate", "4",
                              "--json", str(out), capsys=capsys)
    assert code == 0, text + err
    report = json.loads(out.read_text())
    assert report["b"]["name"] == "transformers" and report["b"]["format"] == "hf"
    assert max(r["max_rel"] for r in report["records"]) <= 1e-5
    assert report["greedy"]["first_divergence"] is None
    assert ("converting them to Hugging Face files" in err) == (name == "native")
    if name.startswith("moe"):
        assert len(report["routers"]) == MOE_ARGS.n_layers
    code, text, _ = run_cli(str(checkpoints[name]), "--tokens", TOKENS, "--dtype", "bfloat16", capsys=capsys)
    assert code == 0 and "(bfloat16)" in text


@pytest.mark.oracle
def test_gguf_against_transformers_and_a_quantization_against_its_source(checkpoints, tmp_path, capsys):
    pytest.importorskip("transformers")
    if "q8" not in checkpoints or not _has("accelerate"):
        pytest.skip("needs gguf and accelerate")
    code, text, err = run_cli(str(checkpoints["q8"]), "--tokens", TOKENS, "--layers", capsys=capsys)
    assert code == 0, text + err  # transformers' GGUF loader and ours: the same dequantized weights
    assert "(gguf, float32)" in text
    out = tmp_path / "q.json"
    code, text, _ = run_cli(str(checkpoints["q8"]), "--against", str(checkpoints["plain-hf"]), "--tokens",
                            TOKENS, "--layers", "--json", str(out), capsys=capsys)
    assert code == 1  # Q8_0 is not the fp32 model: it fails fp32's tolerance ...
    report = json.loads(out.read_text())
    assert report["first_jump"] == "embeddings"  # ... from the first (quantized) tensor on
    err = report["records"][-1]["max_rel"]
    assert 1e-3 < err < 1 and report["logits"]["top1"] >= 0.5, report["logits"]
    code, _, _ = run_cli(str(checkpoints["q8"]), "--against", str(checkpoints["plain-hf"]), "--tokens", TOKENS,
                         "--tolerance", str(err * 1.01), capsys=capsys)
    assert code == 0


def test_gguf_comparisons_transformers_would_get_wrong_are_refused(checkpoints, tmp_path):
    if "gguf" not in checkpoints:
        pytest.skip("the gguf package is not installed")
    from mistral_ref.checkpoint import save_gguf

    moe = save_gguf(random_model(MOE_ARGS), tmp_path / "moe.gguf", "F32")
    with pytest.raises(CheckpointError, match=r"moe\.gguf: a MoE GGUF .*--against HF_DIR"):
        parity.run_parity(moe, "transformers", [1, 2, 3])
    with pytest.raises(CheckpointError, match=r"m\.gguf: attention\.sliding_window is 7, .* spans 10 positions"):
        parity.run_parity(checkpoints["gguf"], "transformers", list(range(1, 9)), generate=2)


# ---- probes ---------------------------------------------------------------------------------------------------
def test_probe_tokens(checkpoints, tmp_path):
    ids, how = parity.probe_tokens(EMBEDDED_MODEL_DIR)
    assert ids[0] == 1 and "prompt" in how
    assert parity.probe_tokens(EMBEDDED_MODEL_DIR, tokens="1, 2,3")[0] == [1, 2, 3]
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "user", "content": "Hello"}]))
    from mistral_ref.tokenizer import load_tokenizer

    tok = load_tokenizer(EMBEDDED_MODEL_DIR)
    assert parity.probe_tokens(EMBEDDED_MODEL_DIR, chat=chat)[0] == tok.encode_chat([{"role": "user",
                                                                                       "content": "Hello"}])
    ids, how = parity.probe_tokens(checkpoints["native"])  # no tokenizer: fixed pseudo-random ids
    assert len(ids) == 16 and ids == parity.probe_tokens(checkpoints["native"])[0] and "seed 0" in how
    with pytest.raises(CheckpointError, match="no tokenizer file"):
        parity.probe_tokens(checkpoints["native"], prompt="hello")
    with pytest.raises(ValueError, match="expected integers"):
        parity.probe_tokens(checkpoints["native"], tokens="1 two 3")


# ---- sides that cannot be compared ---------------------------------------------------------------------------
def test_vocabulary_and_shape_mismatches_are_refused(checkpoints, tmp_path, capsys):
    other = save_checkpoint(random_model(dataclasses.replace(ARGS, vocab_size=192)), tmp_path / "v192")
    code, _, err = run_cli(str(checkpoints["native"]), "--against", str(other.config.parent), "--tokens", TOKENS,
                           capsys=capsys)
    assert code == 2
    assert f"{checkpoints['native']}: vocab_size = 160, but {other.config.parent}: vocab_size = 192" in err
    deeper = save_checkpoint(random_model(dataclasses.replace(ARGS, n_layers=5)), tmp_path / "deep")
    with pytest.raises(CheckpointError, match="n_layers = 4, but .*n_layers = 5"):
        parity.run_parity(checkpoints["native"], deeper.config.parent, [1, 2, 3])
    with pytest.raises(CheckpointError, match=r"token id 160 \(position 1 of the probe\) is outside the "
                                              r"vocabulary \(vocab_size 160\)"):
        parity.run_parity(checkpoints["native"], checkpoints["hf"], [1, 160])


def test_tokenizers_that_differ_are_refused(tmp_path):
    """Two checkpoints of the embedded model, one whose SentencePiece file has one piece renamed."""
    a = tmp_path / "a"
    shutil.copytree(EMBEDDED_MODEL_DIR, a)
    b = tmp_path / "b"
    shutil.copytree(EMBEDDED_MODEL_DIR, b)
    from mistral_ref.tokenizer import load_tokenizer

    tok = load_tokenizer(a)
    piece = next(tok.id_to_piece(i) for i in range(500, tok.vocab_size) if len(tok.id_to_piece(i)) == 4)
    model_file = b / "tokenizer.model.v3"
    raw = model_file.read_bytes()
    renamed = piece[:-1] + ("q" if piece[-1] != "q" else "z")
    assert raw.count(piece.encode()) >= 1 and renamed.encode() not in raw
    model_file.write_bytes(raw.replace(piece.encode(), renamed.encode(), 1))
    with pytest.raises(CheckpointError, match=rf"tokenizer\.model\.v3 and .*tokenizer\.model\.v3: token \d+ is "
                                              rf"'{piece}' in one and '{renamed}' in the other"):
        parity.check_compatible(a, b, [1, 2])


def test_cli_errors_without_the_optional_packages(checkpoints, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("transformers", "matplotlib") else real(name, *a))
    code, _, err = run_cli(str(checkpoints["native"]), "--tokens", TOKENS, capsys=capsys)
    assert code == 2 and "--against transformers needs the transformers package" in err
    code, _, err = run_cli(str(checkpoints["native"]), "--against", str(checkpoints["hf"]), "--plot", "x.png",
                           capsys=capsys)
    assert code == 2 and "--plot needs matplotlib" in err


def test_tokenizers_of_another_kind_are_refused(checkpoints, tmp_path):
    from mistral_ref.tokenizer import mistral_common_data_dir

    data = mistral_common_data_dir()
    if data is None:
        pytest.skip("needs mistral-common's tokenizer files")
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(checkpoints["native"], a)
    shutil.copytree(checkpoints["hf"], b)
    shutil.copy(EMBEDDED_MODEL_DIR / "tokenizer.model.v3", a)
    shutil.copy(data / "tekken_240718.json", b / "tekken.json")
    with pytest.raises(CheckpointError, match=r"tokenizer\.model\.v3 is a sentencepiece tokenizer, .*tekken\.json a "
                                              r"tekken one"):
        parity.check_compatible(a, b, [1, 2])
