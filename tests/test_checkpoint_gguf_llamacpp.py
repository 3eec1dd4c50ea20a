"""GGUF files that llama.cpp loads: save_gguf's tokenizer metadata (checkpoint/gguf_tokenizer.py), read back by our
reader, and — where llama-cpp-python is installed (the `bench` extra builds it) — read by llama.cpp itself: the
same token ids as our tokenizers and the same greedy tokens as our model."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from model_helpers import random_model

from mistral_ref.checkpoint import CheckpointError, load_model, save_gguf
from mistral_ref.checkpoint.gguf import open_gguf
from mistral_ref.checkpoint.gguf_tokenizer import BYTE, BYTE_ALPHABET, CONTROL, NORMAL, UNKNOWN, UNUSED
from mistral_ref.config import ModelArgs
from mistral_ref.embedded import EMBEDDED_MODEL_DIR
from mistral_ref.generation import generate
from mistral_ref.tokenizer import load_tokenizer, mistral_common_data_dir

pytest.importorskip("gguf")

DENSE = ModelArgs(dim=64, n_layers=1, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=3072,
                  norm_eps=1e-6, rope_theta=1e4)
TEXTS = ["Hello world", "  two leading spaces", "a  b\n\ttabs and\nnew lines\n", "Ünïcödé: 日本語 and 🙂",
         "def f(x):\n    return x ** 2  # 12345", "[INST] is plain text here [/INST]", "trailing space "]


def tokenizer_fields(path) -> dict:
    reader = open_gguf(path)
    return {k[len("tokenizer.ggml."):]: f.contents() for k, f in reader.fields.items()
            if k.startswith("tokenizer.ggml.")}


def llama_cpp():
    """The llama_cpp module, or a skip that says how to get it."""
    try:
        import llama_cpp
    except ImportError as e:  # not installed, or its shared library failed to load
        pytest.skip(f"llama_cpp is not importable ({e}): pip install 'mistral-ref[bench]' builds llama.cpp")
    return llama_cpp


# ---- our side: what is written, read back by our reader ---------------------------------------------------
def test_sentencepiece_metadata_round_trips(tmp_path, one_thread):
    model = load_model(EMBEDDED_MODEL_DIR, dtype="float32")
    path = save_gguf(model, tmp_path / "tiny.gguf", "F32")  # the tokenizer is found next to the checkpoint
    tok = load_tokenizer(EMBEDDED_MODEL_DIR)
    meta = tokenizer_fields(path)
    assert meta["model"] == "llama" and "merges" not in meta
    assert meta["tokens"] == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    types = meta["token_type"]
    assert [i for i, t in enumerate(types) if t == CONTROL] == sorted(tok.special_tokens.values())
    assert types[tok.unk_id] == UNKNOWN
    byte_a = meta["tokens"].index("<0x41>")
    assert types[byte_a] == BYTE and types[tok.encode("the")[-1]] == NORMAL
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok.path))
    assert meta["scores"] == [float(np.float32(sp.get_score(i))) for i in range(tok.vocab_size)]
    assert (meta["bos_token_id"], meta["eos_token_id"], meta["unknown_token_id"]) == (tok.bos_id, tok.eos_id, 0)
    assert meta["add_bos_token"] is True and meta["add_eos_token"] is False
    assert meta["add_space_prefix"] is True and meta["remove_extra_whitespaces"] is False
    # the model itself is untouched by the extra metadata
    loaded = load_model(path)
    assert loaded.args == model.args
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_larger_embedding_gets_unused_pad_tokens_and_a_smaller_one_is_refused(tmp_path):
    tok_file = load_tokenizer(EMBEDDED_MODEL_DIR).path
    path = save_gguf(random_model(dataclasses.replace(DENSE, vocab_size=3200)), tmp_path / "m.gguf", "F32",
                     tokenizer=tok_file)
    meta = tokenizer_fields(path)
    assert len(meta["tokens"]) == len(meta["token_type"]) == len(meta["scores"]) == 3200
    assert meta["tokens"][3072:] == [f"[PAD{i}]" for i in range(3072, 3200)]
    assert set(meta["token_type"][3072:]) == {UNUSED}
    with pytest.raises(CheckpointError, match="3072 tokens but the model's embedding only 1000 rows"):
        save_gguf(random_model(dataclasses.replace(DENSE, vocab_size=1000)), tmp_path / "x.gguf", "F32",
                  tokenizer=tok_file)
    assert not (tmp_path / "x.gguf").exists()


def test_without_a_tokenizer_the_file_says_llama_cpp_cannot_load_it(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="mistral_ref.checkpoint.gguf"):
        path = save_gguf(random_model(DENSE), tmp_path / "m.gguf", "F32")
    assert "llama.cpp cannot load it" in caplog.text
    assert tokenizer_fields(path) == {}


def tekken_tokenizer():
    data = mistral_common_data_dir()
    if data is None or not (data / "tekken_240911.json").is_file():
        pytest.skip("needs mistral-common's tekken_240911.json (the test extra installs mistral-common)")
    return load_tokenizer(data / "tekken_240911.json")


@pytest.mark.slow
def test_tekken_merges_reproduce_tiktoken():
    """Byte-level BPE with the derived merges (lowest merge index first, as llama.cpp merges; a word that is a
    token stays whole, llama.cpp's ignore_merges for "tekken") gives tiktoken's tokens, word by word."""
    from mistral_ref.checkpoint.gguf_tokenizer import tokenizer_metadata

    tok = tekken_tokenizer()
    meta = tokenizer_metadata(tok, tok.vocab_size)
    assert (meta["model"], meta["pre"]) == ("gpt2", "tekken")
    tokens = meta["tokens"]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and set(meta["token_type"][:1000]) == {CONTROL}
    assert meta["bos_token_id"] == tok.bos_id and meta["eos_token_id"] == tok.eos_id
    index = {t: i for i, t in enumerate(tokens) if i >= tok.num_special_tokens}
    priority = {tuple(m.split(" ")): i for i, m in reversed(list(enumerate(meta["merges"])))}

    def bpe(word: str) -> list[int]:
        spelled = "".join(BYTE_ALPHABET[b] for b in word.encode())
        if spelled in index:
            return [index[spelled]]
        parts = list(spelled)
        while True:
            pairs = [(priority[p], i) for i, p in enumerate(zip(parts, parts[1:])) if p in priority]
            if not pairs:
                return [index[p] for p in parts]
            _, i = min(pairs)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]

    words = [" hello", " unbelievably", " Antidisestablishmentarianism", " naïve", " 東京都", " tokenization",
             " pneumonoultramicroscopicsilicovolcanoconiosis", "Ġ", " Schwarzenegger", " Привет", " 🙂🙂", "\n\n\n"]
    for word in words:
        assert bpe(word) == tok.encode(word), word


# ---- llama.cpp's side ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_llama_cpp_tokenizes_like_our_sentencepiece(tmp_path):
    llama_cpp_module = llama_cpp()
    path = save_gguf(load_model(EMBEDDED_MODEL_DIR, dtype="float32"), tmp_path / "tiny.gguf", "F16")
    tok = load_tokenizer(EMBEDDED_MODEL_DIR)
    llm = llama_cpp_module.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    assert llm.tokenize(b"Hi", add_bos=True)[0] == tok.bos_id


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_our_tekken(tmp_path):
    llama_cpp_module = llama_cpp()
    tok = tekken_tokenizer()
    args = dataclasses.replace(DENSE, dim=32, hidden_dim=32, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size)
    path = save_gguf(random_model(args), tmp_path / "nemo.gguf", "F16", tokenizer=tok)
    llm = llama_cpp_module.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text


@pytest.mark.slow
def test_llama_cpp_greedy_tokens_equal_ours(tmp_path, one_thread):
    """The embedded model (tiny Mixtral) as an fp32 GGUF: llama.cpp's greedy continuation equals ours for 32
    tokens, and its logits over prompt + continuation are ours within 1e-5.  llama.cpp's KV cache is F32 here (its
    default F16 cache moves logits by ~1e-4 relative, enough to flip a near-tie: this prompt has one at step 21).
    Prompt plus continuation stay inside the model's 96-token sliding window, which llama.cpp's "llama"
    architecture does not apply."""
    llama_cpp_module = llama_cpp()
    model = load_model(EMBEDDED_MODEL_DIR, dtype="float32")
    tok = load_tokenizer(EMBEDDED_MODEL_DIR)
    path = save_gguf(model, tmp_path / "tiny.gguf", "F32")
    prompt = tok.encode("The view function returns an HTTP response", bos=True)
    assert len(prompt) + 32 <= model.args.sliding_window
    ours = generate(model, [prompt], 32, temperature=0.0, ignore_eos=True)[0].tokens
    f32 = llama_cpp_module.GGML_TYPE_F32
    llm = llama_cpp_module.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=1, type_k=f32,
                                 type_v=f32, logits_all=True, verbose=False)
    llm.eval(prompt)
    theirs = []
    for _ in range(32):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == ours
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours]))[0, :-1].numpy()
    assert np.abs(llm.scores[:llm.n_tokens - 1] - logits).max() / np.abs(logits).max() < 1e-5


def test_save_gguf_refuses_what_the_llama_architecture_cannot_hold(tmp_path):
    """Latent attention / fine-grained experts and already-quantized models: a clear CheckpointError, no file."""
    pytest.importorskip("gguf")
    from test_mla import tiny

    from mistral_ref import CheckpointError, load_embedded, quantize_model
    from mistral_ref.checkpoint.gguf import save_gguf
    from mistral_ref.model import Transformer

    with pytest.raises(CheckpointError, match="latent attention / fine-grained experts"):
        save_gguf(Transformer(tiny()), tmp_path / "mla.gguf")
    with pytest.raises(CheckpointError, match=r"quantized \(int8\)"):
        save_gguf(quantize_model(load_embedded()[0], "int8"), tmp_path / "q.gguf")
    assert not list(tmp_path.iterdir())
