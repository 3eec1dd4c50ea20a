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


def test_save_gguf_refuses_what_its_architectures_cannot_hold(tmp_path):
    """What llama.cpp's "llama" / "mistral4" would compute differently, and already-quantized models: a clear
    CheckpointError naming the field, no file."""
    pytest.importorskip("gguf")
    from test_mla import tiny

    from mistral_ref import CheckpointError, load_embedded, quantize_model
    from mistral_ref.checkpoint.gguf import save_gguf
    from mistral_ref.config import YarnArgs
    from mistral_ref.model import Transformer

    small4 = dataclasses.replace(tiny(), norm_eps=1e-6)
    refused = {
        "no fine-grained experts": dataclasses.replace(small4, fine_moe=None),
        "norm_eps is 1e-05": dataclasses.replace(small4, norm_eps=1e-5),
        "routes within 2 of 4 expert groups": tiny("sigmoid", norm_eps=1e-6),
        "beta / alpha are 16": dataclasses.replace(small4, yarn=dataclasses.replace(small4.yarn, beta=16.0)),
        "apply_scale True": dataclasses.replace(small4, yarn=YarnArgs(4.0, 8)),
        "mscale_all_dim 0.5": dataclasses.replace(small4, mla=dataclasses.replace(small4.mla, mscale_all_dim=0.5)),
        "26 layers": dataclasses.replace(small4, n_layers=26),
    }
    for message, args in refused.items():
        with pytest.raises(CheckpointError, match=message):
            save_gguf(Transformer(args), tmp_path / "mla.gguf")
    with pytest.raises(CheckpointError, match=r"quantized \(int8\)"):
        save_gguf(quantize_model(load_embedded()[0], "int8"), tmp_path / "q.gguf")
    assert not list(tmp_path.iterdir())


def test_mistral4_metadata_and_tensors(tmp_path):
    """A Mistral-Small-4-shaped model as "mistral4": the keys llama.cpp's DeepSeek-V2 loader reads, and the
    tensors: kv_b_proj split into attn_k_b (H, c, n: its key rows transposed) and attn_v_b (H, v, c), the experts
    stacked, the first (dense) layer's feed-forward as ffn_gate / up / down, every other tensor as it is."""
    from test_mla import tiny

    args = dataclasses.replace(tiny(), norm_eps=1e-6, vocab_size=3072)
    model = random_model(args).float()
    path = save_gguf(model, tmp_path / "small4.gguf", "F32", tokenizer=load_tokenizer(EMBEDDED_MODEL_DIR).path)
    reader = open_gguf(path)
    meta = {k[len("mistral4."):]: f.contents() for k, f in reader.fields.items() if k.startswith("mistral4.")}
    mla, moe = args.mla, args.fine_moe
    assert reader.fields["general.architecture"].contents() == "mistral4"
    assert {k: meta[k] for k in ("attention.head_count_kv", "attention.key_length", "attention.value_length",
                                 "attention.key_length_mla", "attention.value_length_mla", "attention.q_lora_rank",
                                 "attention.kv_lora_rank", "rope.dimension_count", "leading_dense_block_count",
                                 "expert_count", "expert_used_count", "expert_shared_count",
                                 "expert_feed_forward_length", "expert_gating_func", "rope.scaling.type",
                                 "rope.scaling.original_context_length", "attention.temperature_length",
                                 "expert_weights_norm")} == {
        "attention.head_count_kv": 1, "attention.key_length": mla.kv_lora_rank + mla.qk_rope_head_dim,
        "attention.value_length": mla.kv_lora_rank, "attention.key_length_mla": mla.qk_head_dim,
        "attention.value_length_mla": mla.v_head_dim, "attention.q_lora_rank": mla.q_lora_rank,
        "attention.kv_lora_rank": mla.kv_lora_rank, "rope.dimension_count": mla.qk_rope_head_dim,
        "leading_dense_block_count": 1, "expert_count": moe.num_experts,
        "expert_used_count": moe.num_experts_per_tok, "expert_shared_count": 1,
        "expert_feed_forward_length": moe.moe_intermediate_size, "expert_gating_func": 1,
        "rope.scaling.type": "yarn", "rope.scaling.original_context_length": 8,
        "attention.temperature_length": 8, "expert_weights_norm": True}
    assert meta["rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)
    assert meta["attention.temperature_scale"] == pytest.approx(0.1)
    tensors = {t.name: t for t in reader.tensors}

    def array(name: str) -> np.ndarray:
        t = tensors[name]
        return np.asarray(t.data).reshape([int(d) for d in reversed(t.shape.tolist())])

    state = model.state_dict()
    H, n, v, c = args.n_heads, mla.qk_nope_head_dim, mla.v_head_dim, mla.kv_lora_rank
    kv_b = state["layers.1.attention.kv_b_proj.weight"].reshape(H, n + v, c).numpy()
    assert np.array_equal(array("blk.1.attn_k_b.weight"), kv_b[:, :n].transpose(0, 2, 1))
    assert np.array_equal(array("blk.1.attn_v_b.weight"), kv_b[:, n:])
    assert "blk.1.attn_kv_b.weight" not in tensors
    assert np.array_equal(array("blk.1.ffn_up_exps.weight"), torch.stack(
        [state[f"layers.1.feed_forward.experts.{e}.w3.weight"] for e in range(moe.num_experts)]).numpy())
    assert np.array_equal(array("blk.1.ffn_down_shexp.weight"),
                          state["layers.1.feed_forward.shared_experts.w2.weight"].numpy())
    assert np.array_equal(array("blk.0.ffn_gate.weight"), state["layers.0.feed_forward.w1.weight"].numpy())
    assert np.array_equal(array("blk.0.attn_q_b.weight"), state["layers.0.attention.q_b_proj.weight"].numpy())
    assert array("blk.1.ffn_gate_inp.weight").shape == (moe.num_experts, args.dim)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["softmax", "sigmoid", "no q_lora"])
def test_llama_cpp_runs_our_mistral4_gguf_as_we_do(tmp_path, one_thread, variant):
    """The same function in llama.cpp: a Mistral-Small-4-shaped model (latent attention absorbed there, expanded
    here; a dense first layer, then routed experts and a shared one) as an fp32 "mistral4" GGUF, its logits over
    40 positions ours within 1e-5: past YaRN's original context (8) and across the temperature scaling's steps
    (every 8 positions), with softmax routing and with sigmoid routing (score-correction bias, routed scale 2.5),
    with and without the low-rank query; then 16 greedy tokens equal."""
    from test_mla import tiny

    llama_cpp_module = llama_cpp()
    args = tiny("sigmoid" if variant == "sigmoid" else "softmax", q_lora_rank=None if variant == "no q_lora" else 12)
    args = dataclasses.replace(args, norm_eps=1e-6, vocab_size=3072)
    if variant == "sigmoid":  # llama.cpp routes over all experts: one group
        args = dataclasses.replace(args, fine_moe=dataclasses.replace(args.fine_moe, n_group=1, topk_group=1))
    model = random_model(args).float()
    for layer in model.layers:  # a score-correction bias that moves the choice of experts
        bias = getattr(getattr(layer.feed_forward, "gate", None), "e_score_correction_bias", None)
        if bias is not None:
            bias.copy_(torch.randn(bias.shape, generator=torch.Generator().manual_seed(3)))
    path = save_gguf(model, tmp_path / "small4.gguf", "F32", tokenizer=load_tokenizer(EMBEDDED_MODEL_DIR).path)
    tokens = torch.randint(0, args.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    f32 = llama_cpp_module.GGML_TYPE_F32
    llm = llama_cpp_module.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=1, type_k=f32,
                                 type_v=f32, logits_all=True, verbose=False)
    llm.eval(tokens)
    with torch.no_grad():
        logits = model(torch.tensor([tokens]))[0].numpy()
    assert np.abs(llm.scores[:40] - logits).max() / np.abs(logits).max() < 1e-5
    ours = generate(model, [tokens[:24]], 16, temperature=0.0, ignore_eos=True)[0].tokens
    llm.reset()
    llm.eval(tokens[:24])
    theirs = []
    for _ in range(16):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == ours
