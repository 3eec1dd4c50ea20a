"""The generate loop: parity with transformers, ragged batches, frozen rows, logprobs, penalties, seeds,
validation, streaming text and stop strings (with the real SentencePiece and Tekken tokenizers)."""

from __future__ import annotations

import math

import pytest
import torch

from mistral_ref import generation as generation_module
from mistral_ref.cache import KVCache
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.generation import StopStrings, generate, generate_stream
from mistral_ref.model import Transformer
from mistral_ref.sampling import GenerationParamError
from mistral_ref.tokenizer import load_tokenizer, mistral_common_data_dir

DATA = mistral_common_data_dir()
needs_tokenizer_files = pytest.mark.skipif(DATA is None, reason="needs the mistral-common wheel's files")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only fight over the shared cores
    yield
    torch.set_num_threads(n)


def tiny(window=6, moe: bool = False, vocab: int = 64, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                     vocab_size=vocab, sliding_window=window, moe=MoeArgs(4, 2) if moe else None, **kw)
    model = Transformer(args).eval()
    with torch.no_grad():
        model.output.weight.mul_(8)  # decisive logits: greedy choices are not decided by rounding
    return model


def rand_prompts(lengths: list[int], vocab: int = 64, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def force(ids: list[int], eos: int | None = None):
    """A logits processor that makes row 0 generate exactly `ids` (then `eos`, if given)."""

    def proc(generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        n = generated.shape[1]
        target = ids[n] if n < len(ids) else eos
        if target is not None:
            logits[:, :] = -math.inf
            logits[:, target] = 0.0
        return logits

    return proc


# ---- parity with transformers ------------------------------------------------------------------------------
def hf_pair(kind: str, tmp_path):
    """A random transformers model, saved with save_pretrained and loaded back by checkpoint.load_model."""
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    from mistral_ref.checkpoint import load_model

    torch.manual_seed(0)
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8, rms_norm_eps=1e-6,
              rope_theta=1e4, max_position_embeddings=256, initializer_range=0.1)
    if kind == "nemo":  # head_dim 32 != hidden_size / heads = 16
        kw.update(head_dim=32, rope_theta=1e6)
    if kind == "mixtral":
        hf = MixtralForCausalLM(MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **kw))
    else:
        hf = MistralForCausalLM(MistralConfig(**kw))
    hf.eval().save_pretrained(tmp_path)
    return hf, load_model(tmp_path, dtype=torch.float32).eval()


@pytest.mark.oracle
@pytest.mark.parametrize("kind", ["mistral", "mixtral", "nemo"])
def test_greedy_tokens_equal_transformers_generate(kind: str, tmp_path) -> None:
    """64 greedy tokens past a window of 8, for a ragged batch (prompts of 5 and 12 tokens) vs HF alone."""
    hf, model = hf_pair(kind, tmp_path)
    assert model.args.sliding_window == 8 and (kind != "nemo" or model.args.head_dim * 4 != model.args.dim)
    prompts = rand_prompts([5, 12], vocab=256, seed=1)
    ours = generate(model, prompts, 64, temperature=0)
    for prompt, res in zip(prompts, ours):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, min_new_tokens=64,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        assert res.tokens == out[0, len(prompt):].tolist()
        assert res.finish_reason == "length"


# ---- batches, chunking, stopping ---------------------------------------------------------------------------
def test_ragged_batch_equals_each_prompt_alone() -> None:
    model = tiny(window=6, moe=True)
    prompts = rand_prompts([1, 7, 20])
    batch = generate(model, prompts, 24, temperature=0, logprobs=True)
    for prompt, res in zip(prompts, batch):
        alone = generate(model, [prompt], 24, temperature=0, logprobs=True)[0]
        assert res.tokens == alone.tokens and len(res.tokens) == 24
        assert max(abs(a - b) for a, b in zip(res.logprobs, alone.logprobs)) < 1e-4
    assert len({tuple(r.tokens) for r in batch}) == 3  # the rows really differ


@pytest.mark.parametrize("chunk_size", [1, 3, 6, 9, 100])
def test_chunked_prefill_never_changes_the_output(chunk_size: int) -> None:
    model = tiny(window=6)
    prompts = rand_prompts([5, 6, 7, 15])
    want = generate(model, prompts, 18, temperature=0, logprobs=True)
    got = generate(model, prompts, 18, temperature=0, logprobs=True, chunk_size=chunk_size)
    for a, b in zip(got, want):
        assert a.tokens == b.tokens
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_logprobs_equal_teacher_forced_scores() -> None:
    """Sampled tokens (temperature, top_p, penalties) of a ragged batch: their logprobs and top alternatives
    are the raw log_softmax of a no-cache forward over prompt + output."""
    model = tiny(window=5, moe=True)
    prompts = rand_prompts([3, 9])
    results = generate(model, prompts, 16, temperature=1.3, top_p=0.9, presence_penalty=0.5,
                       frequency_penalty=0.5, seed=0, logprobs=True, top_logprobs=5)
    for prompt, res in zip(prompts, results):
        seq = torch.tensor([prompt + res.tokens])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq)[0, len(prompt) - 1:-1], dim=-1)  # (16, V)
        want = logp.gather(1, torch.tensor(res.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(res.logprobs), want, atol=1e-5, rtol=0)
        top_v, top_i = logp.topk(5, dim=-1)
        for t, pairs in enumerate(res.top_logprobs):
            assert [i for i, _ in pairs] == top_i[t].tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in pairs]), top_v[t], atol=1e-5, rtol=0)
        assert any(lp < logp[t].max() - 1e-3 for t, lp in enumerate(res.logprobs))  # not all argmax: sampled


def test_stop_tokens_freeze_finished_rows() -> None:
    model = tiny(window=6)
    prompts = rand_prompts([4, 10, 7])
    free = generate(model, prompts, 20, temperature=0)
    eos = free[0].tokens[3]  # row 0 will stop at its 4th token
    first = {i: r.tokens.index(eos) if eos in r.tokens else None for i, r in enumerate(free)}
    stopped = generate(model, prompts, 20, temperature=0, eos_id=eos)
    for i, (res, ref) in enumerate(zip(stopped, free)):
        n = first[i]
        if n is None:
            assert (res.tokens, res.finish_reason, res.stop_token_id) == (ref.tokens, "length", None)
        else:
            assert (res.tokens, res.finish_reason, res.stop_token_id) == (ref.tokens[:n], "stop", eos)
    assert first[0] <= 3 and any(v is None or v > first[0] for v in first.values())  # others went on
    # stop_token_ids works like eos_id, and ignore_eos turns both off: exactly max_tokens, same tokens
    assert [r.tokens for r in generate(model, prompts, 20, temperature=0, stop_token_ids=[eos])] == \
        [r.tokens for r in stopped]
    ignored = generate(model, prompts, 20, temperature=0, eos_id=eos, stop_token_ids=[eos], ignore_eos=True)
    assert [(r.tokens, r.finish_reason) for r in ignored] == [(r.tokens, "length") for r in free]


def test_decoding_ends_when_every_row_has_stopped() -> None:
    model = tiny(window=6)
    prompt = rand_prompts([5])[0]
    eos = generate(model, [prompt], 10, temperature=0)[0].tokens[2]
    calls = []
    model.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    res = generate(model, [prompt], 50, temperature=0, eos_id=eos)[0]
    assert res.finish_reason == "stop" and len(res.tokens) <= 2
    assert len(calls) == 1 + len(res.tokens)  # prefill, then one decode step per token before the stop token
    assert all(shape == (1, 1) for shape in calls[1:])  # decode: one token per row per step


def test_penalties_equal_a_recomputation_over_generated_tokens() -> None:
    """Greedy decoding with penalties equals a naive loop that re-runs the whole sequence each step and
    penalises counts of the *generated* tokens only (the prompt repeats one token to make that matter)."""
    model = tiny(window=6)
    prompt = [7, 7, 7, 7, 3, 7, 7]
    pres, freq = 1.5, 0.75
    got = generate(model, [prompt], 20, temperature=0, presence_penalty=pres, frequency_penalty=freq)
    got = got[0].tokens
    seq, counts = list(prompt), torch.zeros(64)
    with torch.no_grad():
        for _ in range(20):
            logits = model(torch.tensor([seq]))[0, -1] - counts * freq - (counts > 0).float() * pres
            seq.append(int(logits.argmax()))
            counts[seq[-1]] += 1
    assert got == seq[len(prompt):]
    assert got != generate(model, [prompt], 20, temperature=0)[0].tokens  # the penalties did something


def test_seed_reproduces_sampling() -> None:
    model = tiny(window=6)
    prompts = rand_prompts([4, 8])
    a = generate(model, prompts, 16, temperature=1.0, seed=123)
    b = generate(model, prompts, 16, temperature=1.0, seed=123)
    c = generate(model, prompts, 16, temperature=1.0, seed=124)
    assert [r.tokens for r in a] == [r.tokens for r in b] != [r.tokens for r in c]
    torch.manual_seed(5)
    d = generate(model, prompts, 16, temperature=1.0)
    torch.manual_seed(5)
    assert [r.tokens for r in d] == [r.tokens for r in generate(model, prompts, 16, temperature=1.0)]


def test_cache_is_sized_from_the_request_not_the_model(monkeypatch) -> None:
    sizes = []

    class Recording(KVCache):
        def __init__(self, args, batch_size, max_seq_len, *a, **kw):
            super().__init__(args, batch_size, max_seq_len, *a, **kw)
            sizes.append((batch_size, max_seq_len, [(c.capacity, c.rolling) for c in self.layers]))

    monkeypatch.setattr(generation_module, "KVCache", Recording)
    model = tiny(window=(4, None), max_seq_len=1_000_000)
    generate(model, rand_prompts([3, 9]), 5, temperature=0)
    assert sizes == [(2, 9 + 5, [(4, True), (14, False)])]


def test_logits_processor_constrains_generation() -> None:
    model = tiny(window=6)
    target = [5, 9, 9, 2, 60]
    res = generate(model, rand_prompts([4]), 8, temperature=0.8, logits_processors=[force(target, eos=1)],
                   eos_id=1)[0]
    assert (res.tokens, res.finish_reason, res.stop_token_id) == (target, "stop", 1)


# ---- validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(temperature=2.5), r"temperature must be in \[0, 2\]"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(presence_penalty=-2.5), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=3), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(max_tokens=0), r"max_tokens must be >= 1, got 0"),
    (dict(top_logprobs=21, logprobs=True), r"top_logprobs must be in \[0, 20\]"),
    (dict(top_logprobs=3), r"top_logprobs > 0 requires logprobs=True"),
    (dict(prompts=[[1, 2], []]), r"prompts\[1\] is empty"),
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts=[[1, 64]]), r"prompts\[0\]\[1\] = 64 is not a token id of this model \(integers 0..63\)"),
    (dict(prompts=[[1, -1]]), r"prompts\[0\]\[1\] = -1 is not a token id"),
    (dict(prompts=[[1, 2.0]]), r"prompts\[0\]\[1\] = 2.0 is not a token id"),
    (dict(prompts=[[1] * 20], max_tokens=13), r"prompts\[0\] has 20 tokens; with max_tokens=13 that is 33 "
                                               r"positions, beyond the model's context max_seq_len=32"),
    (dict(eos_id=64), "eos_id / stop_token_ids: 64 is not a token id"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
])
def test_bad_requests_name_the_parameter(kwargs: dict, message: str) -> None:
    model = tiny(window=6, max_seq_len=32)
    call = dict(prompts=[[1, 2, 3]], max_tokens=4, temperature=0.0) | kwargs
    with pytest.raises(GenerationParamError, match=message):
        generate(model, **call)
    if "prompts" not in kwargs and "eos_id" not in kwargs:  # the streaming form checks before the first event
        tok = FakeTokenizer()
        with pytest.raises(GenerationParamError, match=message):
            generate_stream(model, tok, **{"prompt_ids": call.pop("prompts")[0]} | call)


# ---- streaming ---------------------------------------------------------------------------------------------
class FakeTokenizer:
    """eos_id and stream_decoder() over a byte vocabulary (id = byte value, eos = 0), for validation tests."""

    eos_id = 0

    def stream_decoder(self):
        import codecs

        dec = codecs.getincrementaldecoder("utf-8")("replace")

        class Decoder:
            def feed(self, token_id: int) -> str:
                return dec.decode(bytes([token_id]))

            def flush(self) -> str:
                return dec.decode(b"", final=True)

        return Decoder()


def test_stop_strings_hold_back_possible_prefixes() -> None:
    s = StopStrings(["STOP"])
    assert s.push("ab S") == ("ab ", None)  # "S" could start "STOP"
    assert s.push("T") == ("", None)
    assert s.push("x") == ("STx", None)  # resolved: not a stop string after all
    assert s.push("...ST") == ("...", None)
    assert s.push("OP and more") == ("", "STOP")
    s = StopStrings(["abcd", "bc"])  # the first stop string to complete ends generation
    assert [s.push(c) for c in "abc"] == [("", None), ("", None), ("a", "bc")]
    s = StopStrings(["STOP", "END"])
    assert s.push("x END y STOP") == ("x ", "END")  # earliest occurrence wins
    s = StopStrings(["\n\n"])
    assert s.push("a\n") == ("a", None) and s.flush() == "\n"
    assert StopStrings(None).push("anything") == ("anything", None)
    with pytest.raises(GenerationParamError, match=r"stop\[1\] must be a non-empty string"):
        StopStrings(["ok", ""])


@pytest.fixture(scope="module")
def tokenizers():
    if DATA is None:
        pytest.skip("the mistral-common wheel ships the tokenizer files")
    return {name: load_tokenizer(DATA / name) for name in ("tokenizer.model.v1", "tekken_240718.json")}


@pytest.fixture(scope="module")
def models(tokenizers):
    return {name: tiny(window=4, vocab=tok.vocab_size, seed=1) for name, tok in tokenizers.items()}


TOKENIZERS = ["tokenizer.model.v1", "tekken_240718.json"]
TEXT = "Parrot 🦜 ꙮ 𓀀 café, 日本語 — naïve STOP here"


def joined(events) -> str:
    return "".join(e.text for e in events)


@needs_tokenizer_files
@pytest.mark.parametrize("name", TOKENIZERS)
def test_stream_releases_whole_characters_only(name: str, tokenizers, models) -> None:
    """Force the model to write TEXT (multi-byte characters split across byte-fallback / byte-level tokens):
    no event carries U+FFFD, the stream is the text, and it ends at EOS without decoding it."""
    tok, model = tokenizers[name], models[name]
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    prompt = tok.encode("Say it", bos=True)
    events = list(generate_stream(model, tok, prompt, 60, temperature=0,
                                  logits_processors=[force(ids, tok.eos_id)]))
    assert [e.token_id for e in events[:-1]] == ids
    assert all("\ufffd" not in e.text for e in events)
    assert any(e.text == "" for e in events[:-1])  # some tokens were incomplete characters, held back
    assert joined(events) == TEXT
    last = events[-1]
    assert (last.token_id, last.finish_reason, last.stop_reason) == (None, "stop", tok.eos_id)


@needs_tokenizer_files
@pytest.mark.parametrize("name", TOKENIZERS)
def test_raw_completion_continues_the_prompt_text(name: str, tokenizers, models) -> None:
    """continue_prompt_text: the stream is decode(prompt + output) minus decode(prompt), so the space that begins
    a SentencePiece continuation ("Returns the" + "▁given") is kept."""
    tok, model = tokenizers[name], models[name]
    prompt = tok.encode("Returns the", bos=True)
    # SentencePiece adds the "▁" itself (a "▁given" piece); Tekken needs the space spelled out
    word = tok.encode(" given value" if tok.kind == "tekken" else "given value")
    events = list(generate_stream(model, tok, prompt, 20, temperature=0, continue_prompt_text=True,
                                  logits_processors=[force(word, tok.eos_id)]))
    assert joined(events) == tok.decode(prompt + word)[len(tok.decode(prompt)):]
    assert joined(events).startswith(" given")


@needs_tokenizer_files
@pytest.mark.parametrize("name", TOKENIZERS)
def test_stream_equals_the_non_streamed_text(name: str, tokenizers, models) -> None:
    """Sampled random-model output (stray bytes included): the concatenated stream equals decode(generate)."""
    tok, model = tokenizers[name], models[name]
    prompt = tok.encode("Once upon a time", bos=True)
    for seed in range(2):
        kw = dict(temperature=1.0, seed=seed, logprobs=True, top_logprobs=2)
        res = generate(model, [prompt], 40, eos_id=tok.eos_id, **kw)[0]
        events = list(generate_stream(model, tok, prompt, 40, **kw))
        assert joined(events) == tok.decode(res.tokens)
        assert [e.token_id for e in events[:-1]] == res.tokens
        assert [e.logprob for e in events[:-1]] == res.logprobs
        assert [e.top_logprobs for e in events[:-1]] == res.top_logprobs
        assert events[-1].finish_reason == res.finish_reason


@needs_tokenizer_files
@pytest.mark.parametrize("name", TOKENIZERS)
def test_stop_string_across_token_boundaries(name: str, tokenizers, models) -> None:
    tok, model = tokenizers[name], models[name]
    ids = tok.encode("Parrot naïve STOP here")  # both vocabularies split " STOP" into " ST" + "OP"
    text = tok.decode(ids)
    assert "STOP" in text and not any("STOP" in tok.decode([i]) for i in ids)  # no single token holds it
    events = list(generate_stream(model, tok, tok.encode("Go", bos=True), 40, temperature=0,
                                  stop=["STOP", "xyz"], logits_processors=[force(ids)]))
    assert joined(events) == text[: text.index("STOP")]
    assert (events[-1].finish_reason, events[-1].stop_reason) == ("stop", "STOP")
    k = next(k for k in range(len(ids)) if "STOP" in tok.decode(ids[: k + 1]))
    assert [e.token_id for e in events[:-1]] == ids[: k + 1]  # ended on the token that completed the match
    # ignore_eos does not disable stop strings; a stop string never seen lets generation run to the length
    assert joined(generate_stream(model, tok, [tok.bos_id], 40, temperature=0, stop="STOP", ignore_eos=True,
                                  logits_processors=[force(ids)])) == text[: text.index("STOP")]
    tail = list(generate_stream(model, tok, [tok.bos_id], len(ids), temperature=0, stop=["here!"],
                                logits_processors=[force(ids)]))
    assert joined(tail) == text and tail[-1].finish_reason == "length"  # " here" was held back, then released


@needs_tokenizer_files
@pytest.mark.parametrize("name", TOKENIZERS)
def test_stop_strings_match_a_reference_on_sampled_text(name: str, tokenizers, models) -> None:
    """Reference: generation stops at the first token after which the decoded text contains a stop string, and
    the output is cut before that string's earliest occurrence."""
    tok, model = tokenizers[name], models[name]
    prompt = tok.encode("Tell me", bos=True)
    full = generate(model, [prompt], 40, temperature=1.0, seed=3, ignore_eos=True)[0].tokens
    text = tok.decode(full)
    clean = [i for i in range(5, len(text) - 3) if "\ufffd" not in text[i:i + 3]]
    stops = [text[clean[len(clean) // 2]:][:3], text[clean[-1]:][:2]]
    prefixes = [tok.decode(full[:k]) for k in range(1, len(full) + 1)]
    k = next(k for k, t in enumerate(prefixes) if any(s in t for s in stops))
    want = prefixes[k][: min(prefixes[k].find(s) for s in stops if s in prefixes[k])]
    events = list(generate_stream(model, tok, prompt, 40, temperature=1.0, seed=3, ignore_eos=True,
                                  stop=stops))
    assert joined(events) == want
    assert len(events) - 1 == k + 1 and events[-1].finish_reason == "stop"


def test_integer_like_inputs_are_accepted() -> None:
    """numpy integers in prompts and a bare int as stop_token_ids are ordinary ids."""
    import numpy as np

    model = tiny()
    prompt = [3, 4, 5]
    ref = generate(model, [prompt], 4, temperature=0, stop_token_ids=[7])[0]
    out = generate(model, [[np.int64(t) for t in prompt]], 4, temperature=0, stop_token_ids=7)[0]
    assert out == ref


def test_a_cache_that_cannot_fit_in_memory_is_refused_clearly() -> None:
    """A model without a declared context is bounded by memory: an absurd max_tokens names itself."""
    model = tiny()
    assert model.args.max_seq_len is None
    with pytest.raises(GenerationParamError, match=r"max_tokens: the KV cache .* GiB"):
        generate(model, [[1, 2]], 10**12, temperature=0)
