"""Train the embedded tiny Mixtral from scratch on a CPU: ``python -m mistral_ref.train --out DIR``.

This is how ``mistral_ref/assets/tiny-mixtral`` was made, and a small, complete pre-training +
instruction-tuning loop to read top to bottom:

1. **Data** (:mod:`mistral_ref.train_data`): Django's UI strings in five languages and its English docstrings
   (a quarter of the examples drawn), mixed with synthetic V3 chat conversations (greetings, capitals,
   translation, repetition and tool calls).  Text trains on every token; conversations only on the
   assistant's tokens and its EOS.
2. **Tokenizer**: a 3,072-piece SentencePiece BPE with byte fallback, trained here, whose ids 0..9 are the
   Mistral v3 control pieces (<unk> <s> </s> [INST] [/INST] [TOOL_CALLS] [AVAILABLE_TOOLS] ...).
3. **Model**: :data:`TINY_MIXTRAL` — a real Mixtral: 8 SwiGLU experts with top-2 routing, grouped-query
   attention (4 query heads share 2 key-value heads), head_dim 48 != dim / n_heads, and a 96-key sliding
   window inside a 256-token training context.  Trained with :meth:`Transformer.compute_loss` (cross-entropy
   plus the Switch load-balancing loss), AdamW, linear warm-up then cosine decay, gradient clipping.
4. **Checkpoint**: native format — ``params.json`` + ``consolidated.safetensors`` (bf16) +
   ``tokenizer.model.v3``.

Everything is seeded: the same seed, data and thread count give the same weights.  The shipped checkpoint is
``python -m mistral_ref.train --out DIR --threads 1`` (1,400 steps of 8 x 256 tokens, 15 minutes on one busy
CPU core; ``train_log.json`` beside it holds its loss curve).  ``--minutes`` bounds the wall time as well as
``--steps``; the learning-rate schedule follows ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.model import Transformer

TINY_MIXTRAL = ModelArgs(
    dim=128, n_layers=4, head_dim=48, hidden_dim=256, n_heads=4, n_kv_heads=2, vocab_size=3072,
    norm_eps=1e-5, rope_theta=10_000.0, sliding_window=96, moe=MoeArgs(num_experts=8, num_experts_per_tok=2),
    max_seq_len=1024,
)


@dataclass
class TrainConfig:
    """Optimisation settings.  Steps and batch are counted in rows of seq_len + 1 packed tokens."""

    seq_len: int = 256
    batch_size: int = 8
    steps: int = 1400
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.02
    seed: int = 0
    eval_every: int = 100
    max_minutes: float | None = None  # stop early (keeping the schedule of `steps`) when wall time runs out


# ---- batches -----------------------------------------------------------------------------------------------
Example = tuple[list[int], list[bool]]  # token ids and, per id, whether it is a training target


def packed_rows(examples: Iterable[Example], seq_len: int, pad_id: int = 0) -> Iterator[Example]:
    """Pack whole examples (each starts with its BOS) into rows of seq_len + 1 ids, padding each row's tail.

    An example that does not fit the rest of a row starts the next one.  Examples sharing a row see each other
    (no document mask), as in most pre-training runs.  Padding is never a target.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for ex_ids, ex_mask in examples:
        if len(ex_ids) > seq_len + 1:
            raise ValueError(f"an example of {len(ex_ids)} ids does not fit a row of {seq_len + 1}")
        if len(ids) + len(ex_ids) > seq_len + 1:
            pad = seq_len + 1 - len(ids)
            yield ids + [pad_id] * pad, mask + [False] * pad
            ids, mask = [], []
        ids, mask = ids + ex_ids, mask + ex_mask
    if ids:
        pad = seq_len + 1 - len(ids)
        yield ids + [pad_id] * pad, mask + [False] * pad


def make_batch(rows: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of seq_len + 1 ids -> inputs (B, seq_len) and targets (B, seq_len).

    targets[b, t] = ids[b, t + 1] where that id is a target of its example, else -100 (prompt, padding).
    """
    ids = torch.tensor([r[0] for r in rows])  # (B, seq_len + 1)
    mask = torch.tensor([r[1] for r in rows])
    return ids[:, :-1], ids[:, 1:].masked_fill(~mask[:, 1:], -100)


def batches_of(examples: Iterable[Example], batch_size: int, seq_len: int
               ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All of a finite set of examples as packed batches (the last one may be smaller): an evaluation set."""
    rows = list(packed_rows(examples, seq_len))
    return [make_batch(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over cfg.warmup steps, then cosine decay from cfg.lr to cfg.min_lr at cfg.steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate(model: Transformer, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy (nats per target token) over fixed batches."""
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        n = int((targets != -100).sum())
        total += float(model.compute_loss(inputs, targets).lm_loss) * n
        count += n
    model.train()
    return total / max(count, 1)


# ---- the loop ----------------------------------------------------------------------------------------------
def train(args: ModelArgs, cfg: TrainConfig, examples: Iterator[Example],
          eval_sets: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
          log: Callable[[str], None] = print) -> tuple[Transformer, list[dict]]:
    """Train a fresh model of `args` on packed batches drawn from `examples`.

    returns the model (fp32, eval mode) and the history: one dict per logged step (step, lr, loss, aux, and
    the loss on each evaluation set when evaluated).
    """
    torch.manual_seed(cfg.seed)
    model = Transformer(args)
    for p in model.parameters():  # GPT-2 style init: N(0, 0.02) for matrices, norms stay at 1
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.02)
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    model.train()
    rows = packed_rows(examples, cfg.seq_len)
    history: list[dict] = []
    start = time.monotonic()
    for step in range(cfg.steps):
        lr = lr_at(step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        inputs, targets = make_batch([next(rows) for _ in range(cfg.batch_size)])
        out = model.compute_loss(inputs, targets, aux_loss_coef=cfg.aux_loss_coef)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

        minutes = (time.monotonic() - start) / 60
        last = step == cfg.steps - 1 or (cfg.max_minutes is not None and minutes >= cfg.max_minutes)
        record = {"step": step + 1, "lr": lr, "loss": out.lm_loss.item(), "aux": out.aux_loss.item(),
                  "minutes": round(minutes, 2)}
        if eval_sets and ((step + 1) % cfg.eval_every == 0 or last):
            for name, batches in eval_sets.items():
                record[f"eval_{name}"] = evaluate(model, batches)
        if (step + 1) % 10 == 0 or last or len(record) > 5:
            history.append(record)
            log(json.dumps(record))
        if last:
            break
    model.eval()
    return model, history


# ---- saving ------------------------------------------------------------------------------------------------
def save_native(model: Transformer, tokenizer_file: Path, out: Path,
                dtype: torch.dtype = torch.bfloat16) -> None:
    """Write a native checkpoint: params.json, consolidated.safetensors (in `dtype`), tokenizer.model.v3."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(model.args.to_params_json(), indent=2) + "\n")
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / "consolidated.safetensors"), metadata={"format": "pt"})
    if tokenizer_file.resolve() != (out / "tokenizer.model.v3").resolve():
        shutil.copyfile(tokenizer_file, out / "tokenizer.model.v3")


def held_out_sets(tok, held_docs: list[str], held_pairs: list[dict[str, str]], cfg: TrainConfig
                  ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The evaluation sets: held-out strings and docstrings (every token is a target), and 300 conversations
    from seed cfg.seed + 10,000 built on held-out strings (assistant tokens only)."""
    from mistral_ref import train_data as data

    chat_rng = random.Random(cfg.seed + 10_000)
    text = ((ids, [True] * len(ids)) for d in held_docs for ids in data.encode_text(tok, d, cfg.seq_len + 1))
    chat = (data.encode_conversation(tok, *data.chat_conversation(chat_rng, held_pairs)) for _ in range(300))
    return {"text": batches_of(text, cfg.batch_size, cfg.seq_len),
            "chat": batches_of(chat, cfg.batch_size, cfg.seq_len)}


# ---- the command -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    from mistral_ref import train_data as data
    from mistral_ref.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(prog="python -m mistral_ref.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--tokenizer", type=Path, help="reuse this tokenizer.model.v3, do not train one")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--minutes", type=float, default=None, help="wall-time budget")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a busy machine)")
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, max_minutes=a.minutes)

    root = data.django_root()
    docs, pairs = data.text_documents(root, held_out=False), data.translation_pairs(root, held_out=False)
    held_docs = data.text_documents(root, held_out=True)
    held_pairs = data.translation_pairs(root, held_out=True)
    tok_file = a.tokenizer or data.train_tokenizer(docs, pairs, a.out / "tokenizer.model.v3", seed=cfg.seed)
    tok = load_tokenizer(tok_file)
    if tok.vocab_size != TINY_MIXTRAL.vocab_size:
        raise ValueError(f"{tok_file}: vocabulary of {tok.vocab_size}, the model expects "
                         f"{TINY_MIXTRAL.vocab_size}")

    eval_sets = held_out_sets(tok, held_docs, held_pairs, cfg)
    stream = data.example_stream(tok, docs, pairs, seed=cfg.seed, max_len=cfg.seq_len + 1)
    print(json.dumps({"model": TINY_MIXTRAL.to_params_json(), "train": asdict(cfg),
                      "text_docs": len(docs), "held_out_docs": len(held_docs)}), flush=True)
    model, history = train(TINY_MIXTRAL, cfg, stream, eval_sets, log=lambda s: print(s, flush=True))
    save_native(model, tok_file, a.out)
    command = ["python", "-m", "mistral_ref.train", *(argv if argv is not None else sys.argv[1:])]
    (a.out / "train_log.json").write_text(json.dumps({"command": command, "threads": a.threads,
                                                      "history": history}) + "\n")
    # The held-out data itself, so the held-out loss can be measured again without Django (tests do).
    (a.out / "heldout.json").write_text(json.dumps(
        {"django": data.DJANGO_VERSION, "seed": cfg.seed, "text_docs": held_docs, "pairs": held_pairs},
        ensure_ascii=False) + "\n")
    print(f"wrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
