"""The embedded tiny Mixtral (mistral_ref.embedded): it loads, it learned, it chats and it calls tools.

Bounds are the values measured on the shipped checkpoint plus a margin; they fail if the checkpoint is replaced by
a worse one or by random weights, or if loading, the tokenizer, the chat template or generation breaks.
"""

from __future__ import annotations

import json
import random
import re
import warnings

import pytest
import torch

from mistral_ref import train_data as data
from mistral_ref.checkpoint import load_model
from mistral_ref.config import ModelArgs
from mistral_ref.embedded import EMBEDDED_MODEL_DIR, load_embedded
from mistral_ref.family import parameter_counts
from mistral_ref.generation import generate
from mistral_ref.train import TINY_MIXTRAL, TrainConfig, evaluate, held_out_sets

# Measured on the shipped checkpoint (fp32 compute from the bf16 file); each bound = measured value + margin.
HELD_OUT_TEXT_LOSS_BOUND = 4.22 + 0.10  # nats per token on held-out Django strings and docstrings
HELD_OUT_CHAT_LOSS_BOUND = 1.30 + 0.10  # nats per assistant token on 300 held-out conversations
TOOL_NAME_RATE_BOUND = 0.90  # right tool, parseable call, then EOS: measured 100/100 (seed 20,000)
TOOL_ARGS_RATE_BOUND = 0.85  # arguments exactly those of the question: measured 100/100
ROUND_TRIP_RATE_BOUND = 0.85  # answer quotes the tool's result and ends with EOS: measured 99/100
SHUFFLE_WIN_RATE_BOUND = 0.85  # measured 47/48 (see the test)


@pytest.fixture(scope="module")
def embedded():
    return load_embedded()


def greedy(model, prompts: list[list[int]], max_tokens: int, eos_id: int):
    return generate(model, prompts, max_tokens, temperature=0.0, eos_id=eos_id)


# ---- the files ---------------------------------------------------------------------------------------------------
def test_checkpoint_is_a_small_native_mixtral_directory():
    names = {p.name for p in EMBEDDED_MODEL_DIR.iterdir()}
    assert {"params.json", "consolidated.safetensors", "tokenizer.model.v3", "DATA.md"} <= names
    assert not any(n.endswith((".pth", ".pt", ".bin")) for n in names)
    assert (EMBEDDED_MODEL_DIR / "consolidated.safetensors").stat().st_size < 10 * 2**20
    args = ModelArgs.from_params_json(EMBEDDED_MODEL_DIR)
    assert args == TINY_MIXTRAL
    assert args.moe.num_experts == 8 and args.moe.num_experts_per_tok == 2
    assert args.n_kv_heads < args.n_heads and args.head_dim != args.dim // args.n_heads
    assert args.sliding_window < TrainConfig.seq_len
    assert 3_000_000 < parameter_counts(args)["total"] < 6_000_000
    stored = load_model(EMBEDDED_MODEL_DIR)
    assert stored.dtype == torch.bfloat16


def test_load_embedded_gives_an_fp32_model_and_its_v3_tokenizer(embedded):
    model, tok = embedded
    assert model.dtype == torch.float32 and not model.training
    assert tok.version == "v3" and tok.vocab_size == model.args.vocab_size
    assert (EMBEDDED_MODEL_DIR / "tokenizer.model.v3").read_bytes() == \
        (EMBEDDED_MODEL_DIR.parents[2] / "tokenizers" / "tiny-mixtral" / "tokenizer.model.v3").read_bytes()


@pytest.mark.oracle
def test_control_pieces_sit_at_the_ids_of_mistrals_v3_tokenizer(embedded):
    import sentencepiece as spm

    from mistral_ref.tokenizer import mistral_common_data_dir

    real = spm.SentencePieceProcessor(
        model_file=str(mistral_common_data_dir() / "mistral_instruct_tokenizer_240323.model.v3"))
    ours = spm.SentencePieceProcessor(model_file=str(EMBEDDED_MODEL_DIR / "tokenizer.model.v3"))
    for i in range(10):
        assert ours.id_to_piece(i) == real.id_to_piece(i) == data.CONTROL_PIECES[i]
        assert (ours.is_control(i), ours.is_unknown(i)) == (real.is_control(i), real.is_unknown(i))
    assert ours.is_byte(10) and ours.id_to_piece(10) == "<0x00>"  # byte fallback: no text is ever <unk>


def _openai(messages: list[dict]) -> list[dict]:
    out = json.loads(json.dumps(messages))
    for m in out:
        for call in m.get("tool_calls") or []:
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    return out


@pytest.mark.oracle
def test_training_conversations_are_the_real_v3_template(embedded):
    """What the model was trained on equals mistral-common's V3 encoding, turn by turn (prompt + turn + EOS)."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    _, tok = embedded
    mt = MistralTokenizer.from_file(str(EMBEDDED_MODEL_DIR / "tokenizer.model.v3"), mode=ValidationMode.test)
    pairs = json.loads((EMBEDDED_MODEL_DIR / "heldout.json").read_text())["pairs"]
    rng = random.Random(7)
    for _ in range(40):
        messages, tools = data.chat_conversation(rng, pairs)
        ids, mask = data.encode_conversation(tok, messages, tools)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            req = ChatCompletionRequest.from_openai(_openai(messages), tools=tools, continue_final_message=True)
            expected = mt.encode_chat_completion(req).tokens + [tok.eos_id]
        assert ids == expected


# ---- what it learned ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_held_out_loss_is_below_the_measured_bound(embedded):
    model, tok = embedded
    held = json.loads((EMBEDDED_MODEL_DIR / "heldout.json").read_text())
    sets = held_out_sets(tok, held["text_docs"], held["pairs"], TrainConfig(seed=held["seed"]))
    losses = {name: evaluate(model, batches) for name, batches in sets.items()}
    assert losses["text"] < HELD_OUT_TEXT_LOSS_BOUND, losses
    assert losses["chat"] < HELD_OUT_CHAT_LOSS_BOUND, losses


def test_text_is_more_likely_than_the_same_words_shuffled(embedded):
    """Completing text sensibly, measured: held-out strings beat their own words in random order."""
    model, tok = embedded
    docs = json.loads((EMBEDDED_MODEL_DIR / "heldout.json").read_text())["text_docs"]
    rng = random.Random(0)
    lines = [line for d in docs[:40] for line in d.splitlines() if len(line.split()) >= 4][:48]
    wins = 0
    for line in lines:
        words = line.split()
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        scores = []
        for text in (line, " ".join(shuffled)):
            ids = torch.tensor([[tok.bos_id, *tok.encode(text)]])
            logits = model(ids)
            scores.append(torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).sum().item())
        wins += scores[0] > scores[1]
    assert wins / len(lines) >= SHUFFLE_WIN_RATE_BOUND, f"{wins}/{len(lines)}"


# prompt -> text the greedy answer must contain (measured: every one holds, each answer ends with EOS by 19 tokens)
CHAT_EXPECTATIONS = {
    "Hello!": "How can I help you?",
    "Bonjour !": "Comment puis-je vous aider ?",
    "Hallo!": "Wie kann ich helfen?",
    "¡Hola!": "¿En qué puedo ayudarte?",
    "Ciao!": "Come posso aiutarti?",
    "Who are you?": "Mixtral",
    "What is the capital of France?": "Paris",
    "Capital of Japan?": "Tokyo",
    "Which city is the capital of Italy?": "Rome",
    "Repeat exactly: The password is too short.": "",
    "Translate into German: Enter a valid date.": "",
}


def test_chat_answers_follow_the_template_and_end_with_eos(embedded):
    model, tok = embedded
    prompts = [tok.encode_chat([{"role": "user", "content": p}]) for p in CHAT_EXPECTATIONS]
    results = greedy(model, prompts, 64, tok.eos_id)
    for (prompt, expected), r in zip(CHAT_EXPECTATIONS.items(), results):
        answer = tok.decode(r.tokens)
        assert r.finish_reason == "stop" and r.stop_token_id == tok.eos_id, (prompt, answer)
        assert answer.strip() and expected in answer, (prompt, answer)
        assert not any(tok.is_special(t) for t in r.tokens), (prompt, r.tokens)


def _tool_cases(n: int):
    rng = random.Random(20_000)  # not a seed the training stream used
    return [data.tool_conversation(rng) for _ in range(n)]


@pytest.mark.slow
def test_tool_prompts_get_the_right_call_and_the_result_is_reported(embedded):
    model, tok = embedded
    cases = _tool_cases(100)
    prompts = [tok.encode_chat(messages[:1], tools=tools) for messages, tools in cases]
    results = greedy(model, prompts, 64, tok.eos_id)
    right_name, right_args, follow_ups = 0, 0, []
    for (messages, tools), r in zip(cases, results):
        calls = tok.parse_assistant(r.tokens).get("tool_calls") or []
        wanted = messages[1]["tool_calls"][0]["function"]
        if r.stop_token_id == tok.eos_id and len(calls) == 1 and calls[0]["function"]["name"] == wanted["name"]:
            right_name += 1
            right_args += json.loads(calls[0]["function"]["arguments"]) == wanted["arguments"]
            call = calls[0]
            follow_ups.append((messages, tools, [
                messages[0],
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                 "content": messages[2]["content"]},
            ]))
    assert right_name / len(cases) >= TOOL_NAME_RATE_BOUND, f"right tool called in {right_name}/{len(cases)}"
    assert right_args / len(cases) >= TOOL_ARGS_RATE_BOUND, f"exact arguments in {right_args}/{len(cases)}"

    # The round trip: given the tool's result, the model answers in text quoting it, and ends its turn.
    prompts = [tok.encode_chat(conv, tools=tools) for _, tools, conv in follow_ups]
    answers = greedy(model, prompts, 48, tok.eos_id)
    reported = 0
    for (messages, _, _), r in zip(follow_ups, answers):
        result = re.escape(messages[2]["content"])
        reported += r.stop_token_id == tok.eos_id and \
            re.search(rf"(?<![\d.]){result}(?![\d])", tok.decode(r.tokens)) is not None
    assert reported / len(cases) >= ROUND_TRIP_RATE_BOUND, f"result reported in {reported}/{len(cases)}"
