"""`make demo` / `mistral-ref demo`: the family table, then the embedded tiny Mixtral at work.

The embedded model (mistral_ref/assets/tiny-mixtral, 4.2M parameters, trained on a CPU by mistral_ref.train) is
loaded through the same `load_model` path as any real checkpoint.  The demo completes text, answers chat turns
with the V3 template (streaming, token by token), and runs a tool-call round trip: the model emits a
[TOOL_CALLS] JSON call, the demo executes the tool in Python, sends the result back, and the model reports it.
It is tiny: expect it to be right on what it was trained for (greetings, capitals, the add / multiply /
convert_units tools) and wrong on much else (it cannot translate or repeat free text).
"""

from __future__ import annotations

import json
import sys
import time

from mistral_ref.api import chat_completion
from mistral_ref.embedded import EMBEDDED_MODEL_DIR, TOOLS, load_embedded, run_tool
from mistral_ref.family import family_table, parameter_counts
from mistral_ref.generation import generate_stream


def _stream_chat(model, tok, messages: list[dict], **params) -> tuple[str, list[dict], str]:
    """Print a streamed reply; return (content, tool_calls, finish_reason)."""
    content, calls, finish = "", [], ""
    for chunk in chat_completion(model, tok, messages, stream=True, temperature=0, max_tokens=80, **params):
        choice = chunk["choices"][0]
        piece = choice["delta"].get("content") or ""
        content += piece
        print(piece, end="", flush=True)
        calls += choice["delta"].get("tool_calls") or []
        finish = choice["finish_reason"] or finish
    return content, calls, finish


def run_demo() -> int:
    print("== The Mistral family (parameter counts from the shapes, equal to the meta-device model's) ==\n")
    print(family_table())

    t0 = time.perf_counter()
    model, tok = load_embedded()
    counts = parameter_counts(model.args)
    a = model.args
    print(f"\n== The embedded model: {EMBEDDED_MODEL_DIR.name} (loaded in {time.perf_counter() - t0:.2f} s) ==")
    print(f"a real trained Mixtral-architecture model, small enough to ship: {counts['total'] / 1e6:.1f}M parameters "
          f"({counts['active'] / 1e6:.1f}M active), dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads / "
          f"{a.n_kv_heads} kv heads of {a.head_dim}, {a.moe.num_experts} experts top-{a.moe.num_experts_per_tok}, "
          f"sliding window {a.sliding_window}; tokenizer {tok.kind} {tok.version} ({tok.vocab_size} pieces)")

    print("\n== Text completion (no template, greedy, streamed) ==")
    prompt = "Returns the"
    print(f"> {prompt}", end="", flush=True)
    for event in generate_stream(model, tok, tok.encode(prompt, bos=True), 40, temperature=0, stop=["\n"],
                                 continue_prompt_text=True):
        print(event.text, end="", flush=True)
    print()

    print("\n== Chat (V3 template, greedy, streamed; each reply ends with EOS) ==")
    for question in ("What is the capital of Italy?", "Bonjour !", "Who are you?"):
        print(f"user: {question}\nassistant: ", end="", flush=True)
        _, _, finish = _stream_chat(model, tok, [{"role": "user", "content": question}])
        print(f"   [finish_reason={finish}]")

    print("\n== Tool calling round trip ==")
    tools = list(TOOLS.values())
    messages: list[dict] = [{"role": "user", "content": "What is 27 times 14?"}]
    print(f"tools offered: {[t['function']['name'] for t in tools]}")
    print(f"user: {messages[0]['content']}\nassistant: ", end="", flush=True)
    content, calls, finish = _stream_chat(model, tok, messages, tools=tools)
    if finish != "tool_calls" or not calls:
        print(f"\n[the model did not call a tool this time (finish_reason={finish})]")
        return 0
    call = calls[0]
    print(f"[TOOL_CALLS] {call['function']['name']}({call['function']['arguments']})  id={call['id']}")
    result = run_tool(call["function"]["name"], json.loads(call["function"]["arguments"]))
    print(f"tool ({call['function']['name']}) -> {result}")
    messages += [{"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"], "content": result}]
    print("assistant: ", end="", flush=True)
    _, _, finish = _stream_chat(model, tok, messages, tools=tools)
    print(f"   [finish_reason={finish}]")
    print("\nMore: `mistral-ref chat` (interactive, this model by default), `mistral-ref serve`, notebooks/.",
          file=sys.stderr)
    return 0
