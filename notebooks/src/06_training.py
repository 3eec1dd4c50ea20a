# Source of notebooks/06_training.ipynb (build with: .venv/bin/python notebooks/build.py)

# %% [markdown]
# # 06 · Training a tiny Mixtral
#
# Everything so far ran models with random or given weights. Here we train one: a tiny **Mixtral** — 4 SwiGLU
# experts with top-2 routing, grouped-query attention, a sliding window — for a few hundred steps of next-token
# prediction on CPU, with the loss `Transformer.compute_loss` computes for training:
#
# `loss = cross-entropy(next token) + 0.02 × load-balancing loss`
#
# The data pipeline and the learning-rate schedule come from `mistral_ref.train` (the script that trained the
# model embedded in this package): `train_data.encode_text` cuts documents into BOS … EOS pieces, `packed_rows`
# packs them into fixed-length rows, `make_batch` shifts them into (input, target) pairs, `lr_at` gives linear
# warm-up then cosine decay, `evaluate` measures held-out loss. The loop itself is written out below, because
# it is the thing to learn.
#
# The text: Python's own reference documentation (`pydoc_data.topics`, shipped with every CPython — no
# download), tokenized with the 3,072-piece SentencePiece tokenizer of the embedded model.

# %%
import json
import math
import random
import time
from pydoc_data.topics import topics

import matplotlib.pyplot as plt
import torch

from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.family import parameter_counts
from mistral_ref.embedded import EMBEDDED_MODEL_DIR
from mistral_ref.generation import generate
from mistral_ref.model import Transformer
from mistral_ref.tokenizer import load_tokenizer
from mistral_ref.train import (
    TrainConfig,
    batches_of,
    evaluate,
    lr_at,
    make_batch,
    packed_rows,
)
from mistral_ref.train_data import encode_text

# constrained layout: labels, titles and colour bars are never clipped, whatever saves or shows the figure
plt.rcParams.update({"figure.dpi": 80, "figure.figsize": (9, 3.2), "figure.constrained_layout.use": True})
tok = load_tokenizer(EMBEDDED_MODEL_DIR / "tokenizer.model.v3")
names = sorted(topics)
held_out = names[::10]  # every 10th topic is never trained on
train_docs = [topics[n] for n in names if n not in held_out]
held_docs = [topics[n] for n in held_out]
print(f"{len(train_docs)} training topics ({sum(map(len, train_docs)) / 1e3:.0f} kB), {len(held_docs)} held out: "
      f"{', '.join(held_out)}")
print(repr(train_docs[3][:300]))

# %% [markdown]
# ## 1. Data: packed rows of 64 + 1 tokens

# %%
cfg = TrainConfig(seq_len=64, batch_size=8, steps=300, lr=3e-3, min_lr=3e-4, warmup=30, aux_loss_coef=0.02,
                  seed=0)


def examples(docs, seed):
    """An endless stream of (ids, mask) pieces from the documents, reshuffled every epoch."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(docs)))
        rng.shuffle(order)
        for i in order:
            for piece in encode_text(tok, docs[i], cfg.seq_len + 1):
                yield piece, [True] * len(piece)


rows = packed_rows(examples(train_docs, cfg.seed), cfg.seq_len)
held_pieces = [(p, [True] * len(p)) for d in held_docs for p in encode_text(tok, d, cfg.seq_len + 1)]
eval_batches = batches_of(held_pieces, cfg.batch_size, cfg.seq_len)[:12]
inputs, targets = make_batch([next(rows) for _ in range(cfg.batch_size)])
print("a batch:", tuple(inputs.shape), "inputs,", tuple(targets.shape), "targets (the inputs shifted by one)")
print("row 0 decoded:", repr(tok.decode(inputs[0].tolist())[:160]))

# %% [markdown]
# ## 2. The model
#
# A Mixtral in miniature: every architectural feature of the real one, at widths a CPU trains in seconds.

# %%
args = ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2,
                 vocab_size=tok.vocab_size, rope_theta=1e4, sliding_window=32, moe=MoeArgs(num_experts=4,
                                                                                           num_experts_per_tok=2))
counts = parameter_counts(args)
print(f"{counts['total']:,} parameters, {counts['active']:,} active per token")

torch.manual_seed(cfg.seed)
model = Transformer(args)
for p in model.parameters():  # GPT-2 style initialisation, as mistral_ref.train does
    if p.dim() > 1:
        torch.nn.init.normal_(p, std=0.02)
decay = [p for p in model.parameters() if p.dim() > 1]  # no weight decay on the norms
no_decay = [p for p in model.parameters() if p.dim() <= 1]
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def expert_load(model, batches):
    """Share of routed slots each expert receives, per layer: (n_layers, num_experts)."""
    model.eval()
    counts = torch.zeros(args.n_layers, args.moe.num_experts)
    for x, _ in batches:
        _, router_logits = model(x, return_router_logits=True)
        for layer, logits in enumerate(router_logits):
            chosen = logits.topk(args.moe.num_experts_per_tok, dim=-1).indices
            counts[layer] += torch.bincount(chosen.flatten(), minlength=args.moe.num_experts)
    model.train()
    return counts / counts.sum(-1, keepdim=True)


load_before = expert_load(model, eval_batches)
print(f"held-out loss before training: {evaluate(model, eval_batches):.2f} nats "
      f"(uniform guess over {args.vocab_size} tokens: {math.log(args.vocab_size):.2f})")

# %% [markdown]
# ## 3. The loop
#
# One step: a batch of packed rows → `compute_loss` → backward → clip the gradient norm → AdamW step with the
# scheduled learning rate. Every 50 steps, the held-out loss.

# %%
history = []
model.train()
start = time.perf_counter()
for step in range(cfg.steps):
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    inputs, targets = make_batch([next(rows) for _ in range(cfg.batch_size)])
    out = model.compute_loss(inputs, targets, aux_loss_coef=cfg.aux_loss_coef)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    record = {"step": step + 1, "lr": lr, "loss": out.lm_loss.item(), "aux": out.aux_loss.item()}
    if (step + 1) % 50 == 0:
        record["held_out"] = evaluate(model, eval_batches)
        print(f"step {step + 1:4}  loss {record['loss']:.3f}  held-out {record['held_out']:.3f}  "
              f"aux {record['aux']:.3f}  lr {lr:.1e}  ({time.perf_counter() - start:.0f} s)")
    history.append(record)
model.eval()
load_after = expert_load(model, eval_batches)

# %%
steps = [r["step"] for r in history]
smooth = [sum(r["loss"] for r in history[max(0, i - 9): i + 1]) / len(history[max(0, i - 9): i + 1])
          for i in range(len(history))]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
axes[0].plot(steps, [r["loss"] for r in history], alpha=0.3, label="training batch")
axes[0].plot(steps, smooth, label="training (10-step mean)")
axes[0].plot([r["step"] for r in history if "held_out" in r], [r["held_out"] for r in history if "held_out" in r],
             "o-", label="held-out topics")
axes[0].set_xlabel("step")
axes[0].set_ylabel("cross-entropy (nats / token)")
axes[0].legend(fontsize=8)
axes[1].plot(steps, [r["aux"] for r in history])
axes[1].axhline(args.moe.num_experts_per_tok, color="grey", ls="--", lw=0.8)
axes[1].set_xlabel("step")
axes[1].set_title("load-balancing loss (2 = perfectly balanced)", fontsize=10)
axes[2].plot(steps, [r["lr"] for r in history])
axes[2].set_xlabel("step")
axes[2].set_title("learning rate: warm-up, cosine decay", fontsize=10)
plt.show()
first, last = sum(r["loss"] for r in history[:10]) / 10, sum(r["loss"] for r in history[-10:]) / 10
print(f"training loss {first:.2f} -> {last:.2f}; held-out {history[49]['held_out']:.2f} (step 50) -> "
      f"{history[-1]['held_out']:.2f} (step {cfg.steps})")
assert last < first - 1.5 and history[-1]["held_out"] < history[49]["held_out"] - 0.3

# %% [markdown]
# ## 4. Expert load before and after
#
# At initialisation the router's probabilities are nearly flat (tiny random gate weights), yet its top-2
# choices already follow the random geometry of the embeddings, so the load is uneven from the start. Training
# makes the router confident about each token; the load-balancing term (which stayed close to its balanced
# value of 2 in the plot above) keeps it from sending everything to a few experts. The bars show the share of
# routed slots each expert receives on the held-out text.

# %%
fig, axes = plt.subplots(1, args.n_layers, figsize=(10.5, 3), sharey=True)
E = args.moe.num_experts
for layer, ax in enumerate(axes):
    ax.bar([e - 0.2 for e in range(E)], load_before[layer].tolist(), 0.4, label="before training")
    ax.bar([e + 0.2 for e in range(E)], load_after[layer].tolist(), 0.4, label="after training")
    ax.axhline(1 / E, color="k", ls="--", lw=0.8, label=f"perfect balance (1/{E})" if layer == 0 else None)
    ax.set_xticks(range(E))
    ax.set_title(f"layer {layer}", fontsize=10)
    ax.set_xlabel("expert")
axes[0].set_ylabel("share of routed slots")
fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
plt.show()
for name, load in (("before", load_before), ("after", load_after)):
    print(f"{name:6} training: largest share per layer {[round(x, 2) for x in load.max(-1).values.tolist()]}, "
          f"smallest {[round(x, 2) for x in load.min(-1).values.tolist()]} (balanced: {1 / E:.2f})")
with torch.no_grad():
    _, router_logits = model(eval_batches[0][0], return_router_logits=True)
confidence = [lg.softmax(-1).max(-1).values.mean().item() for lg in router_logits]
print("mean router probability of each token's favourite expert, per layer:", [round(c, 2) for c in confidence])
assert load_after.min() > 0.05  # no expert starved

# %% [markdown]
# ## 5. What it learned
#
# Three hundred steps on 64-token rows is far too little for language, but enough to pick up the surface of
# Python's documentation — frequent words, punctuation, the `****` underlines of its headings. Greedy decoding
# of a model this weak falls into loops ("the the the"), so we sample (temperature 0.8, seeded):

# %%
prompts = ["The for statement", "A class definition", "Exceptions are"]
results = generate(model, [[tok.bos_id, *tok.encode(p)] for p in prompts], max_tokens=32, temperature=0.8,
                   seed=0, eos_id=tok.eos_id)
for p, r in zip(prompts, results):
    print(f"{p!r} -> {tok.decode(r.tokens)!r}")

# %% [markdown]
# ## 6. The embedded model
#
# `mistral_ref.embedded.load_embedded()` returns the tiny Mixtral this project trained with `mistral_ref.train`
# on much more data and compute (Django's interface strings in five languages, its docstrings, and synthetic V3
# chat and tool-calling conversations) and ships inside the package. Its held-out data is stored next to it
# (`heldout.json`), so its held-out loss can be measured again here without Django. It has 4 million parameters:
# expect fluent-looking answers in the right format that are often wrong.

# %%
if (EMBEDDED_MODEL_DIR / "consolidated.safetensors").is_file():
    from mistral_ref.embedded import load_embedded
    from mistral_ref.train import held_out_sets

    embedded, etok = load_embedded()
    ecounts = parameter_counts(embedded.args)
    print(f"embedded model: {ecounts['total']:,} parameters ({ecounts['active']:,} active), "
          f"{embedded.args.moe.num_experts} experts, window {embedded.args.sliding_window}")
    held = json.loads((EMBEDDED_MODEL_DIR / "heldout.json").read_text(encoding="utf-8"))
    sets = held_out_sets(etok, held["text_docs"], held["pairs"], TrainConfig(seed=held["seed"]))
    for name, batches in sets.items():
        print(f"held-out {name} loss: {evaluate(embedded, batches[:20]):.3f} nats/token "
              f"(first {min(20, len(batches))} of {len(batches)} batches)")
    log_file = EMBEDDED_MODEL_DIR / "train_log.json"
    if log_file.is_file():
        log = json.loads(log_file.read_text(encoding="utf-8"))
        hist = log["history"] if isinstance(log, dict) else log
        fig, ax = plt.subplots()
        ax.plot([r["step"] for r in hist], [r["loss"] for r in hist], label="training")
        for key in ("eval_text", "eval_chat"):
            pts = [(r["step"], r[key]) for r in hist if key in r]
            ax.plot(*zip(*pts), "o-", label=f"held-out {key[5:]}")
        ax.set_xlabel("step")
        ax.set_ylabel("nats / token")
        ax.set_title("the embedded model's training run (train_log.json)")
        ax.legend()
        plt.show()
    chats = ["Hello!", "What is the capital of France?", "Translate into German: Enter a valid date."]
    prompts = [etok.encode_chat([{"role": "user", "content": c}]) for c in chats]
    for c, r in zip(chats, generate(embedded, prompts, 48, temperature=0.0, eos_id=etok.eos_id)):
        print(f"user: {c!r}\n  assistant: {etok.decode(r.tokens)!r} ({r.finish_reason})")
    text = "This field is"
    (r,) = generate(embedded, [[etok.bos_id, *etok.encode(text)]], 16, temperature=0.0, eos_id=etok.eos_id)
    print(f"text completion: {text!r} -> {etok.decode(r.tokens)!r}")
else:
    print(f"The embedded model's weights are not in {EMBEDDED_MODEL_DIR} (an install without package data?): "
          "skipping this section.")
