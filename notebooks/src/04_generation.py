# Source of notebooks/04_generation.ipynb (build with: .venv/bin/python notebooks/build.py)

# %% [markdown]
# # 04 · Generation: the KV cache, sampling, streaming, log-probabilities and JSON mode
#
# A language model gives next-token logits; *generation* is everything around that: a **KV cache** so each new
# token costs one position of work instead of re-reading the whole prompt, a **sampler** that turns logits into
# a choice, a **streaming detokenizer** that turns ids into text as they come, and optional **constraints** such
# as JSON mode. All of it lives in `mistral_ref.cache`, `sampling`, `generation`, `grammar` and `api` (plus
# `json_mode`, the hand-written JSON grammar this notebook opens up).
#
# The model: the tiny Mixtral trained by this project and shipped inside the package
# (`mistral_ref.embedded.load_embedded()`, 4.2M parameters, a V3 chat template, a 3,072-piece tokenizer). It is
# small enough to run everything here in seconds — and small enough that its answers are often wrong, which is
# useful too.

# %%
import json

import matplotlib.pyplot as plt
import torch

from mistral_ref.api import chat_completion
from mistral_ref.cache import KVCache
from mistral_ref.config import ModelArgs
from mistral_ref.embedded import EMBEDDED_MODEL_DIR, load_embedded
from mistral_ref.generation import generate, generate_stream
from mistral_ref.json_mode import JsonLogitsProcessor, advance, initial_state, json_vocab
from mistral_ref.model import Transformer
from mistral_ref.sampling import sample, sampling_probs
from mistral_ref.tokenizer import load_tokenizer

# constrained layout: labels, titles and colour bars are never clipped, whatever saves or shows the figure
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (9, 3.2), "figure.constrained_layout.use": True})
if (EMBEDDED_MODEL_DIR / "consolidated.safetensors").is_file():
    model, tok = load_embedded()
    TRAINED = True
else:  # an install without the package data: same mechanics, random weights (the text will be noise)
    print("embedded weights not found: using a random model of the same shape")
    tok = load_tokenizer(EMBEDDED_MODEL_DIR / "tokenizer.model.v3")
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=128, n_layers=4, head_dim=48, hidden_dim=256, n_heads=4, n_kv_heads=2,
                                  vocab_size=tok.vocab_size, sliding_window=96)).eval()
    TRAINED = False
print(model.args)
print(tok)

# %% [markdown]
# ## 1. The rolling KV cache
#
# Each attention layer caches the keys (already rotated by RoPE) and values of past tokens. With a sliding
# window of W keys a layer never looks further back than W positions, so its cache is a **rolling buffer of W
# slots**: position p lives in slot `p % W`, overwriting position p − W, which no future query can see anyway.
# Memory stays W slots however long the generation runs.
#
# We watch it on a one-layer model with W = 4: a prompt of 3 tokens, then one token per step. The picture shows
# which position each slot holds after each call (the cache records it, `LayerCache.pos`; −1 = empty).

# %%
W = 4
toy_args = ModelArgs(dim=32, n_layers=1, hidden_dim=64, n_heads=4, n_kv_heads=2, vocab_size=64, sliding_window=W)
torch.manual_seed(0)
toy = Transformer(toy_args).eval()
tokens = torch.randint(0, 64, (1, 14))
cache = KVCache(toy_args, batch_size=1, max_seq_len=tokens.shape[1])
print(f"cache capacity per layer: {cache[0].capacity} slots (rolling: {cache[0].rolling}), "
      f"{cache.nbytes()} bytes for any sequence length")
history, cached_logits = [], []
with torch.no_grad():
    full_logits = toy(tokens)  # (1, 14, vocab): the whole sequence at once, no cache
    cached_logits.append(toy(tokens[:, :3], torch.arange(3)[None], cache)[:, -1])  # prefill 3 tokens
    history.append(cache[0].pos[0].clone())
    for p in range(3, tokens.shape[1]):  # decode: one token per call
        cached_logits.append(toy(tokens[:, p:p + 1], torch.tensor([[p]]), cache)[:, -1])
        history.append(cache[0].pos[0].clone())
        assert cache[0].pos[0, p % W] == p  # position p sits in slot p % W
cached = torch.stack(cached_logits, 1)  # (1, 12, vocab): logits at positions 2 .. 13
print("cached decoding == full forward:", torch.allclose(cached, full_logits[:, 2:], atol=1e-5))
assert torch.allclose(cached, full_logits[:, 2:], atol=1e-5)

grid = torch.stack(history)  # (calls, W)
fig, ax = plt.subplots(figsize=(9, 2.8))
ax.imshow(grid.T, cmap="viridis", aspect="auto", vmin=-1)
for t in range(grid.shape[0]):
    for s in range(W):
        ax.text(t, s, int(grid[t, s]), ha="center", va="center", color="w", fontsize=9)
ax.set_xticks(range(grid.shape[0]))
ax.set_xticklabels(["prefill 0-2"] + [f"decode {p}" for p in range(3, tokens.shape[1])], rotation=45, fontsize=8)
ax.set_ylabel("slot")
ax.set_title(f"rolling buffer, W={W}: position p is written to slot p % {W}")
plt.show()

# %% [markdown]
# ## 2. Sampling: temperature and top-p
#
# The sampler turns logits into a distribution (`sampling.sampling_probs`): divide by the **temperature** and
# softmax (T < 1 sharpens, T > 1 flattens, T = 0 is argmax), then **top-p** keeps the smallest set of most likely
# tokens whose mass reaches p — including the token that crosses p — and renormalises. Here are the model's real
# next-token logits after the text "This field", a point where it hesitates between many continuations (after a
# chat question it is usually near-certain of its first word, which makes dull plots).

# %%
prompt = [tok.bos_id, *tok.encode("This field")]
with torch.no_grad():
    logits = model(torch.tensor([prompt]))[0, -1]  # (vocab,) fp32
order = logits.argsort(descending=True)[:12]
labels = [repr(tok.id_to_piece(int(i)).replace("▁", " ")) for i in order]

fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
for j, t in enumerate((0.5, 1.0, 1.5)):
    probs = sampling_probs(logits[None], temperature=t, top_p=1.0)[0]
    axes[0].bar([i + (j - 1) * 0.27 for i in range(12)], probs[order].tolist(), 0.27, label=f"temperature {t}")
for j, top_p in enumerate((1.0, 0.9, 0.5)):
    probs = sampling_probs(logits[None], temperature=1.0, top_p=top_p)[0]
    axes[1].bar([i + (j - 1) * 0.27 for i in range(12)], probs[order].tolist(), 0.27, label=f"top_p {top_p}")
for ax in axes:
    ax.set_xticks(range(12))
    ax.set_xticklabels(labels, rotation=60, fontsize=8)
    ax.set_ylabel("probability")
    ax.legend(fontsize=8)
axes[0].set_title("temperature reshapes the distribution", fontsize=10)
axes[1].set_title("top-p cuts the tail and renormalises (T = 1)", fontsize=10)
plt.show()

# %%
temps = torch.linspace(0.1, 2.0, 40)
entropy = []
for t in temps:
    probs = sampling_probs(logits[None], float(t), 1.0)[0]
    entropy.append(-(probs * probs.clamp(min=1e-30).log()).sum().item())
top_ps = torch.linspace(0.05, 1.0, 40)
nucleus = [int((sampling_probs(logits[None], 1.0, float(p))[0] > 0).sum()) for p in top_ps]
fig, axes = plt.subplots(1, 2, figsize=(11, 3))
axes[0].plot(temps, entropy)
axes[0].set_xlabel("temperature")
axes[0].set_ylabel("entropy (nats)")
axes[1].semilogy(top_ps, nucleus)
axes[1].set_xlabel("top_p")
axes[1].set_ylabel("tokens kept (nucleus size)")
plt.show()

# The sampler draws from exactly this distribution: 4,000 seeded draws (temperature 1, top_p 0.9) against
# sampling_probs, on the 8 most likely tokens; and never a token outside the nucleus.
expected = sampling_probs(logits[None], 1.0, 0.9)[0]
draws = sample(logits.expand(4000, -1), 1.0, 0.9, generator=torch.Generator().manual_seed(0))
observed = torch.bincount(draws, minlength=logits.shape[0]) / draws.numel()
for i in order[:8]:
    print(f"{tok.id_to_piece(int(i))!r:12} expected {expected[i]:.4f}  observed {observed[i]:.4f}")
print(f"nucleus: {int((expected > 0).sum())} tokens; draws outside it: {int((observed[expected == 0] > 0).sum())}")
assert (observed[order[:8]] - expected[order[:8]]).abs().max() < 0.02 and observed[expected == 0].sum() == 0

# %% [markdown]
# ## 3. Streaming text
#
# Tokens are not characters. With SentencePiece's byte fallback an emoji is four tokens `<0xF0>` `<0x9F>` …,
# each of them a *part* of one UTF-8 character; a Tekken token can likewise end in the middle of a character.
# A streaming decoder must hold back incomplete bytes and release text only when it is valid — so the pieces
# concatenate to exactly `decode(all ids)`:

# %%
text = "Grüße 👋 🙂!"
ids = tok.encode(text)
decoder = tok.stream_decoder()
released = []
for i in ids:
    delta = decoder.feed(i)
    released.append(delta)
    print(f"{i:5}  {tok.id_to_piece(i)!r:10} -> released {delta!r}")
released.append(decoder.flush())
assert "".join(released) == tok.decode(ids) == text

# %% [markdown]
# `generate_stream` runs generation and that decoder together, yielding one event per token (with its
# log-probability if asked), and applies **stop strings** on the decoded text — across token boundaries, cutting
# the output right before the match:

# %%
chat = tok.encode_chat([{"role": "user", "content": "Hello! Who are you?"}])
events = list(generate_stream(model, tok, chat, max_tokens=40, temperature=0.0, logprobs=True))
for e in events[:8]:
    print(e)
print("...", events[-1])
streamed = "".join(e.text for e in events)
generated = [e.token_id for e in events if e.token_id is not None]
assert streamed == tok.decode(generated)
print("\nstreamed text:", repr(streamed))

words = streamed.split()
if len(words) >= 3:
    stop = " ".join(words[1:3])  # stop at the second and third words
    cut = list(generate_stream(model, tok, chat, max_tokens=40, temperature=0.0, stop=[stop]))
    print(f"with stop={stop!r}: {''.join(e.text for e in cut)!r} (finish: {cut[-1].finish_reason}, "
          f"{cut[-1].stop_reason!r})")
    assert "".join(e.text for e in cut) == streamed[: streamed.index(stop)]

# %% [markdown]
# ## 4. Log-probabilities
#
# `generate(..., logprobs=True, top_logprobs=k)` reports, for every generated token, `log p(token)` under the
# model's raw distribution (before temperature, top-p and constraints) and the k best alternatives. They must
# equal the **teacher-forced** scores: run the whole sequence through the model once and read off
# `log_softmax` at each generated position. A short bar below is a draw the model did not prefer (temperature
# 0.8 lets such draws through); one unlikely token can lead the rest of the text away from the path the greedy
# answer follows, and a tiny model then goes on confidently — compare the two texts printed under the chart,
# and read sampled text as a sample, not as a statement of fact.

# %%
(result,) = generate(model, [chat], max_tokens=24, temperature=0.8, seed=1, eos_id=tok.eos_id, logprobs=True,
                     top_logprobs=3)
sequence = torch.tensor([chat + result.tokens])
with torch.no_grad():
    teacher = torch.log_softmax(model(sequence)[0], -1)  # (T, vocab)
positions = torch.arange(len(chat) - 1, len(chat) - 1 + len(result.tokens))
forced = teacher[positions, torch.tensor(result.tokens)]
print(f"max |generate's logprob − teacher-forced| = {(forced - torch.tensor(result.logprobs)).abs().max():.1e}")
assert torch.allclose(forced, torch.tensor(result.logprobs), atol=1e-4)

pieces = [tok.id_to_piece(t).replace("▁", "␣") for t in result.tokens]
fig, ax = plt.subplots(figsize=(11, 3.4))
ax.bar(range(len(pieces)), torch.tensor(result.logprobs).exp().tolist(), color="slateblue")
ax.set_xticks(range(len(pieces)))
ax.set_xticklabels(pieces, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
ax.set_ylim(0, 1.05)
ax.set_ylabel("p(token) = exp(logprob)")
ax.set_title("How likely each sampled token was under the model (sampled at temperature 0.8, seed 1)",
             fontsize=10)
plt.show()
print("sampled text:", repr(tok.decode(result.tokens)))
print("greedy text: ", repr(streamed))
for piece, alts in list(zip(pieces, result.top_logprobs))[:5]:
    print(f"{piece!r:12} best alternatives: {[(tok.id_to_piece(i), round(lp, 2)) for i, lp in alts]}")

# %% [markdown]
# ## 5. JSON mode
#
# `chat_completion(..., response_format={"type": "json_object"})` (or `"json_schema"` with any JSON schema) plugs
# a grammar into the sampler (`grammar.GrammarLogitsProcessor`, on the llguidance library): before each token is
# chosen, every token whose bytes cannot continue a valid document gets logit −∞, and EOS is allowed only once the
# top-level object is complete. So an answer that ends with `finish_reason == "stop"` is always valid JSON. The
# constraint guarantees *syntax*, not *sense*: the model still chooses what goes inside. Ours was never trained to
# answer in JSON (only to write tool-call arguments), so expect it to wander: an empty object, or
# tool-argument-like keys that never close before `max_tokens`. (Whitespace, which JSON allows anywhere between
# tokens, is bounded to two characters at a time: a model that does not "want" to write JSON would otherwise fill
# its context with it.) Whatever it does, every answer below is a valid JSON document or, when cut by
# `max_tokens`, a valid beginning of one:

# %%
requests = ["Bonjour !", "Add 2 and 3.", "Capital of Japan?", "Give me a JSON object with the capital of France."]
answers = {}
for content in requests:
    response = chat_completion(model, tok, [{"role": "user", "content": content}], temperature=0.0,
                               max_tokens=48, response_format={"type": "json_object"})
    choice = response["choices"][0]
    answers[content] = choice
    text = choice["message"]["content"]
    print(f"{content!r}\n  -> {text!r} (finish_reason: {choice['finish_reason']})")
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
        print("     parsed:", json.loads(text))
    else:  # cut by max_tokens: still a valid beginning of a JSON object
        assert advance(initial_state("object"), text.encode()) is not None
plain = chat_completion(model, tok, [{"role": "user", "content": requests[0]}], temperature=0.0, max_tokens=48)
print(f"\nthe same first request without JSON mode: {plain['choices'][0]['message']['content']!r}")

# %% [markdown]
# Under the hood, with a grammar small enough to read: `mistral_ref.json_mode` is a hand-written byte-level JSON
# grammar (a table-driven pushdown automaton) with its own processor, `JsonLogitsProcessor`. The same request
# through `generate` with it plugged in by hand (`logits_processors=[JsonLogitsProcessor(tok, greedy=True)]`), then
# the generated ids replayed through its JSON state machine (`json_mode.advance`), counting at every step how
# many tokens of the vocabulary the grammar still allowed (`JsonVocab.allowed(state)`). The model's answer is
# short, so below it the same count for a hand-written object: after `{` only a key's opening quote or
# whitespace, inside a number only digits and what may end a number — but inside a string almost every token
# is allowed (the tall bars).

# %%
request = [{"role": "user", "content": "Add 2 and 3."}]
(result,) = generate(model, [tok.encode_chat(request)], max_tokens=48, temperature=0.0, eos_id=tok.eos_id,
                     logits_processors=[JsonLogitsProcessor(tok, greedy=True)])
by_hand = tok.decode(result.tokens)  # the hand-written grammar allows any whitespace: it may differ from the API's
print("hand-written grammar:", repr(by_hand),
      "| API (llguidance):", repr(answers["Add 2 and 3."]["message"]["content"]))
vocab = json_vocab(tok)


def allowed_counts(ids: list[int]) -> list[int]:
    """How many vocabulary entries the grammar allows before each token of `ids` (replayed from the start)."""
    state, counts = initial_state("object"), []
    for i in ids:
        counts.append(int(vocab.allowed(state).sum()))
        state = advance(state, tok.id_to_bytes(i))
        assert state is not None  # every token kept the text a valid JSON prefix
    return counts


def label(i: int) -> str:
    piece = tok.id_to_piece(i)
    return {"<0x0A>": "\\n", "<0x09>": "\\t"}.get(piece, piece.replace("▁", "␣"))


written = tok.encode('{"city": "Paris", "population": 2102650, "capital": true}')  # a hand-written object
rows = [("of the model's answer to 'Add 2 and 3.'", result.tokens),
        ("of a hand-written object, replayed through the same grammar", written)]
fig, axes = plt.subplots(2, 1, figsize=(11, 6.4), gridspec_kw={"height_ratios": [1, 1.4]})
for ax, (title, ids) in zip(axes, rows):
    counts = allowed_counts(ids)
    ax.bar(range(len(ids)), counts, color="darkorange")
    for x, c in enumerate(counts):
        ax.text(x, c * 1.15, f"{c:,}", ha="center", fontsize=7)
    ax.axhline(tok.vocab_size, color="grey", lw=0.8, ls="--")  # the whole vocabulary
    ax.set_yscale("log")
    ax.set_ylim(0.8, tok.vocab_size * 3)
    ax.set_yticks([1, 10, 100, 1000])
    ax.set_yticklabels(["1", "10", "100", "1,000"])
    ax.set_xlim(-0.6, len(written) - 0.4)  # the same bar width in both rows
    ax.set_xticks(range(len(ids)))
    ax.set_xticklabels([label(i) for i in ids], rotation=60, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_ylabel("tokens allowed")
    ax.set_title(f"JSON mode: tokens the grammar allows (of {tok.vocab_size:,}, dashed) before each token {title}",
                 fontsize=10)
plt.show()
