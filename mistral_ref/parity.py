"""Parity on real weights: run mistral-ref and another implementation on the same token ids and compare them
layer by layer (the library behind `mistral-ref parity` and the pytest plugin).

    report = run_parity("Mistral-7B-v0.3", "transformers", tokens, layers=True, generate=8)
    print(report.table()); report.passed; json.dumps(report.to_dict())

The other side is transformers (it loads the checkpoint's Hugging Face files, or a GGUF file itself; a native-only
directory is first converted to HF files in a temporary directory), or mistral-ref on another checkpoint: a
native and an HF directory of the same model, a GGUF against its source — two loaders, one computation, no
transformers needed.

What is recorded, for one row of T tokens (forward hooks on the modules of each side):

  embeddings              the embedding rows                          (T, dim)
  layers.N.attention      block N's attention output, after wo        (T, dim)
  layers.N.feed_forward   block N's feed-forward / MoE output         (T, dim)
  layers.N.residual       the residual stream after block N           (T, dim)
  layers.N.router         MoE only: the experts each token chose      (T, k), compared as sets
  norm                    the final RMSNorm                           (T, dim)
  logits                                                              (T, vocab)

and the errors of side a (mistral-ref on CHECKPOINT) against side b (the other):
max_abs = max|a - b|; max_rel = max|a - b| / max|b| (the parity measure of this project); nmse = sum (a - b)^2 /
sum b^2; cosine = <a, b> / (|a| |b|); for the logits also top-1 agreement, top-5 overlap and KL(b || a).  The
first *jump* is the first record whose max_rel exceeds the tolerance and 10x every max_rel before it: where a
wrong layer (or a quantization) first shows.  The run passes when the logits' max_rel is within the tolerance
(DEFAULT_TOLERANCE by dtype, or the caller's).

Memory: one implementation at a time.  A side loads (safetensors memory-mapped where no conversion is needed),
runs the probe with hooks that copy each record to a small CPU tensor (T x dim fp32 values: 0.6 MB per record,
55 MB in all for a 35-token probe of a 7B model), optionally greedy-decodes N tokens, and is freed before the
other side loads: a 7B model in bf16 needs one copy of its 14.5 GB at a time.  The peak resident memory of each
side is measured (Linux: VmHWM, reset before each side; elsewhere the process's peak so far).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mistral_ref.cache import KVCache
from mistral_ref.checkpoint import (
    CheckpointError,
    checkpoint_index,
    dominant_dtype,
    find_checkpoint,
    load_model,
    parse_dtype,
    read_model_args,
)
from mistral_ref.checkpoint.gguf import gguf_dtype, gguf_index, gguf_model_args, is_gguf_file, open_gguf
from mistral_ref.config import ModelArgs

#: Logits tolerance (max_rel) by dtype.  fp32: this project's oracle tolerance.  bf16 / fp16: two correct
#: implementations differ by rounding (bf16 keeps 8 significant bits, fp16 11), and the difference grows with
#: depth: mistral-ref vs transformers in bf16 measured 2.1e-2 on a 10-layer 0.6B random model and 2.5e-2 on the
#: embedded model (README, "Check parity on your own weights"); 0.1 leaves room for 32-56 layers and still
#: fails a wrong layer, whose error is of order 1.
DEFAULT_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-1, torch.float16: 2e-2}
JUMP_FACTOR = 10.0  # a record "jumps" when its error exceeds the tolerance and this many times every one before
DEFAULT_PROMPT = "The mistral is a strong, cold wind that blows from the north down the Rhône valley to the"
TRANSFORMERS = "transformers"

Log = Callable[[str], None]


def _quiet(message: str) -> None:
    pass


# ---- memory ------------------------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-resident-memory counter of this process (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since the last reset_peak_rss (Linux VmHWM), else since it
    started (getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---- what a checkpoint is, before loading it ---------------------------------------------------------------
def checkpoint_args(path: str | Path) -> tuple[ModelArgs, torch.dtype, str]:
    """(ModelArgs, the dtype it loads in by default, format) of a checkpoint directory, .safetensors or .gguf
    file, from headers and metadata only."""
    path = Path(path)
    if is_gguf_file(path):
        reader = open_gguf(path)
        args = gguf_model_args(reader, path)
        return args, gguf_dtype(gguf_index(reader, args, path)), "gguf"
    files = find_checkpoint(path)
    args = read_model_args(files)
    return args, dominant_dtype(checkpoint_index(files, args).values()), files.format


def tokenizer_dir(path: str | Path) -> Path:
    """Where a checkpoint's tokenizer file lives: the directory itself, or a file's directory."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def _load_tokenizer_or_none(path: str | Path) -> Any:
    from mistral_ref.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(tokenizer_dir(path))
    except TokenizerError:
        return None


def probe_tokens(checkpoint: str | Path, *, prompt: str | None = None, chat: str | Path | None = None,
                 tokens: str | Sequence[int] | None = None, n_random: int = 16) -> tuple[list[int], str]:
    """The probe's token ids and how they were made.

    tokens: ids as a list or a string "1 2 3" / "1,2,3"; prompt: text, encoded with BOS by the checkpoint's
    tokenizer; chat: a JSON file holding a list of messages or {"messages": [...], "tools": [...]}, encoded
    with the tokenizer's chat template.  With none given: DEFAULT_PROMPT if the checkpoint has a tokenizer,
    else `n_random` fixed pseudo-random ids (seed 0).
    """
    if tokens is not None:
        if isinstance(tokens, str):
            try:
                ids = [int(t) for t in tokens.replace(",", " ").split()]
            except ValueError:
                raise ValueError(f"--tokens: expected integers separated by spaces or commas, got {tokens!r}") \
                    from None
        else:
            ids = [int(t) for t in tokens]
        if not ids:
            raise ValueError("--tokens: no token ids given")
        return ids, f"{len(ids)} given token ids"
    tok = _load_tokenizer_or_none(checkpoint)
    if tok is None:
        if prompt is not None or chat is not None:
            raise CheckpointError(f"{tokenizer_dir(checkpoint)}: no tokenizer file (tekken.json, tokenizer.model.vN "
                                  "or tokenizer.model) to encode the probe with; pass --tokens instead")
        args = checkpoint_args(checkpoint)[0]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, args.vocab_size, (n_random,), generator=g).tolist()
        return ids, f"{n_random} pseudo-random token ids (no tokenizer next to {checkpoint}; seed 0)"
    if chat is not None:
        try:
            request = json.loads(Path(chat).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{chat}: expected a JSON file with a list of messages: {e}") from None
        messages, tools = (request, None) if isinstance(request, list) else \
            (request.get("messages"), request.get("tools")) if isinstance(request, dict) else (None, None)
        if not isinstance(messages, list):
            raise ValueError(f"{chat}: expected a list of messages or an object with 'messages'")
        return tok.encode_chat(messages, tools=tools), f"chat request {chat} ({tok.path.name} {tok.version})"
    text = DEFAULT_PROMPT if prompt is None else prompt
    return tok.encode(text, bos=True), f"prompt {text!r} ({tok.path.name})"


def _vocabulary(path: Path) -> tuple[str, str | None, list[Any]] | None:
    """(where, kind, entries) of the vocabulary stored with a checkpoint: its tokenizer file ("sentencepiece":
    the pieces; "tekken": the tokens' bytes), else a GGUF's tokenizer.ggml.tokens (SentencePiece pieces when its
    tokenizer.ggml.model is "llama", else of a kind not compared); None when there is none."""
    tok = _load_tokenizer_or_none(path)
    if tok is not None:
        entries = [tok.id_to_piece(i) for i in range(tok.vocab_size)] if tok.kind == "sentencepiece" \
            else tok.token_bytes_table()
        return str(tok.path), tok.kind, entries
    if is_gguf_file(path):
        reader = open_gguf(path)
        if "tokenizer.ggml.tokens" in reader.fields:
            model = reader.fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in reader.fields \
                else None
            tokens = reader.fields["tokenizer.ggml.tokens"].contents()
            return f"{path} (tokenizer.ggml.tokens)", "sentencepiece" if model == "llama" else None, tokens
    return None


def check_compatible(a: str | Path, b: str | Path, tokens: Sequence[int]) -> ModelArgs:
    """Refuse to compare two checkpoints that cannot agree: different shapes or vocabulary sizes, tokenizers
    that differ (kind, size or any token), or probe ids outside the vocabulary.  Returns a's ModelArgs.

    Raises CheckpointError naming both files and the field that differs.
    """
    a, b = Path(a), Path(b)
    args_a, args_b = checkpoint_args(a)[0], checkpoint_args(b)[0]
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "moe"):
        va, vb = getattr(args_a, name), getattr(args_b, name)
        if va != vb:
            what = "vocabulary" if name == "vocab_size" else "shape"
            raise CheckpointError(f"{a}: {name} = {va}, but {b}: {name} = {vb}: the two sides do not share a "
                                  f"{what}, so they cannot be compared token for token")
    vocab_a, vocab_b = _vocabulary(a), _vocabulary(b)
    if vocab_a is not None and vocab_b is not None:
        (where_a, kind_a, entries_a), (where_b, kind_b, entries_b) = vocab_a, vocab_b
        if kind_a and kind_b and kind_a != kind_b:
            raise CheckpointError(f"{where_a} is a {kind_a} tokenizer, {where_b} a {kind_b} one: the tokenizers "
                                  "differ")
        if len(entries_a) != len(entries_b):
            raise CheckpointError(f"{where_a}: {len(entries_a)} tokens, but {where_b}: {len(entries_b)} tokens: "
                                  "the tokenizers differ (vocabulary size)")
        diff = next((i for i, (x, y) in enumerate(zip(entries_a, entries_b)) if x != y), None) \
            if kind_a == kind_b else None
        if diff is not None:
            raise CheckpointError(f"{where_a} and {where_b}: token {diff} is {entries_a[diff]!r} in one and "
                                  f"{entries_b[diff]!r} in the other: the tokenizers differ")
    check_tokens(tokens, args_a.vocab_size, a)
    return args_a


def check_tokens(tokens: Sequence[int], vocab_size: int, where: str | Path) -> None:
    """Raise CheckpointError if a probe id is outside 0 .. vocab_size - 1."""
    bad = [(i, t) for i, t in enumerate(tokens) if not 0 <= t < vocab_size]
    if bad:
        i, t = bad[0]
        raise CheckpointError(f"{where}: token id {t} (position {i} of the probe) is outside the vocabulary "
                              f"(vocab_size {vocab_size})")


def check_transformers_reads_gguf(path: str | Path, args: ModelArgs, positions: int) -> None:
    """Refuse a GGUF comparison that transformers' GGUF loader would get wrong: it builds Llama/Mistral models
    only (llama.cpp's MoE layout is not read) and ignores {arch}.attention.sliding_window."""
    if args.moe:
        raise CheckpointError(f"{path}: a MoE GGUF (ffn_*_exps): transformers' GGUF loader does not read llama.cpp's "
                              "experts; compare with the Hugging Face checkpoint instead (--against HF_DIR)")
    window = args.window_for_layer(0)
    if window is not None and positions > window:
        raise CheckpointError(f"{path}: attention.sliding_window is {window}, which transformers' GGUF loader "
                              f"ignores, and the probe spans {positions} positions: use at most {window} (prompt + "
                              "--generate), or compare with the Hugging Face checkpoint (--against HF_DIR)")


# ---- one side: load, record, decode, free ------------------------------------------------------------------
@dataclass
class Trace:
    """What one side produced for the probe (activations on the CPU, one row)."""

    name: str  # "mistral-ref" or "transformers"
    source: str  # the checkpoint it ran
    format: str  # native / hf / gguf
    dtype: str
    activations: dict[str, torch.Tensor] = field(default_factory=dict)  # record -> (T, dim) fp32, in order
    experts: dict[int, torch.Tensor] = field(default_factory=dict)  # MoE layer -> (T, k) chosen experts, sorted
    logits: torch.Tensor | None = None  # (T, vocab) fp32
    generated: list[int] = field(default_factory=list)  # greedy tokens
    margins: list[float] = field(default_factory=list)  # top-1 minus top-2 logit at each greedy step
    load_s: float = 0.0
    forward_s: float = 0.0
    generate_s: float = 0.0
    peak_rss: int = 0


class _Recorder:
    """Forward hooks that copy module outputs into a Trace, and say which layer is running."""

    def __init__(self, trace: Trace, n_layers: int, log: Log):
        self.trace, self.n_layers, self.log, self.handles = trace, n_layers, log, []
        self.t0 = time.perf_counter()

    def record(self, module: torch.nn.Module, name: str) -> None:
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            self.trace.activations[name] = out.detach()[0].to("cpu", torch.float32, copy=True)  # (T, dim)
        self.handles.append(module.register_forward_hook(hook))

    def experts(self, module: torch.nn.Module, layer: int, pick: Callable[[Any], torch.Tensor]) -> None:
        def hook(_module, _inputs, output):
            self.trace.experts[layer] = pick(output).detach().to("cpu").sort(dim=-1).values  # (T, k)
        self.handles.append(module.register_forward_hook(hook))

    def progress(self, module: torch.nn.Module, layer: int) -> None:
        def hook(_module, _inputs):
            self.log(f"{self.trace.name}: layer {layer + 1}/{self.n_layers} "
                     f"({time.perf_counter() - self.t0:.1f} s)")
        self.handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _greedy(step: Callable[[list[int], int], torch.Tensor], tokens: list[int], n: int, trace: Trace) -> None:
    """n greedy tokens: step(new ids, position of the first) -> next-token logits (vocab,) of the last id."""
    logits = step(tokens, 0)
    for i in range(n):
        top2 = torch.topk(logits.float(), 2)
        trace.generated.append(int(top2.indices[0]))
        trace.margins.append(float(top2.values[0] - top2.values[1]))
        if i + 1 < n:
            logits = step([trace.generated[-1]], len(tokens) + i)


def _finish(trace: Trace, tokens: list[int], generate: int, forward: Callable, step: Callable,
            recorder: _Recorder, log: Log) -> None:
    """Run the probe (with hooks), then the greedy decode (without), timing each."""
    t0 = time.perf_counter()
    with torch.no_grad():
        trace.logits = forward(torch.tensor([tokens])).detach()[0].to("cpu", torch.float32)
    recorder.remove()
    trace.forward_s = time.perf_counter() - t0
    if generate:
        log(f"{trace.name}: greedy decoding {generate} tokens")
        t0 = time.perf_counter()
        with torch.no_grad():
            _greedy(step, tokens, generate, trace)
        trace.generate_s = time.perf_counter() - t0


def run_mistral_ref(checkpoint: str | Path, tokens: Sequence[int], dtype: torch.dtype, *, layers: bool = True,
                    generate: int = 0, name: str = "mistral-ref", backend: str | None = None,
                    log: Log = _quiet) -> Trace:
    """Load `checkpoint` with mistral-ref, run the probe with hooks, greedy-decode `generate` tokens, free it."""
    tokens = list(tokens)
    reset_peak_rss()
    log(f"{name}: loading {checkpoint} ({str(dtype).removeprefix('torch.')})")
    t0 = time.perf_counter()
    model = load_model(checkpoint, dtype=dtype)
    if backend is not None:
        model.set_backend(backend)
    trace = Trace(name, str(checkpoint), model.checkpoint_files.format, str(dtype).removeprefix("torch."))
    trace.load_s = time.perf_counter() - t0
    check_tokens(tokens, model.args.vocab_size, checkpoint)
    rec = _Recorder(trace, model.args.n_layers, log)
    if layers:
        rec.record(model.tok_embeddings, "embeddings")
        for i, layer in enumerate(model.layers):
            rec.record(layer.attention, f"layers.{i}.attention")
            rec.record(layer.feed_forward, f"layers.{i}.feed_forward")
            rec.record(layer, f"layers.{i}.residual")
            if model.args.moe:  # the layer returns (out, router logits (T, E)): its top-k are the choices
                k = model.args.moe.num_experts_per_tok
                rec.experts(layer.feed_forward, i, lambda out, k=k: torch.topk(out[1], k, dim=-1).indices)
        rec.record(model.norm, "norm")
    for i, layer in enumerate(model.layers):
        rec.progress(layer, i)
    cache = KVCache(model.args, 1, len(tokens) + generate, model.dtype, model.device) if generate else None

    def step(ids: list[int], start: int) -> torch.Tensor:
        positions = torch.arange(start, start + len(ids))[None]
        return model(torch.tensor([ids]), positions, cache)[0, -1]

    _finish(trace, tokens, generate, model, step, rec, log)
    trace.peak_rss = peak_rss_bytes()
    return trace  # the model is freed with this frame (run_parity collects before the other side loads)


# ---- comparing two traces ----------------------------------------------------------------------------------
@dataclass
class RecordError:
    """The errors of side a against side b for one record."""

    name: str
    kind: str  # embeddings / attention / feed_forward / residual / norm / logits
    layer: int | None
    max_abs: float
    max_rel: float
    nmse: float
    cosine: float


def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> RecordError:
    """max_abs, max_rel (max|a-b| / max|b|), nmse and cosine of a against b (same shape), in float64."""
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ: {list(a.shape)} and {list(b.shape)}")
    a, b = a.double().flatten(), b.double().flatten()
    diff = (a - b).abs()
    b_max, b_sq = float(b.abs().max()), float(b.pow(2).sum())
    norm = float(a.norm() * b.norm())
    parts = name.split(".")
    layer = int(parts[1]) if parts[0] == "layers" else None
    kind = parts[2] if layer is not None else name
    return RecordError(
        name, kind, layer, float(diff.max()),
        float(diff.max()) / b_max if b_max else (float("inf") if float(diff.max()) > 0 else 0.0),
        float(diff.pow(2).sum()) / b_sq if b_sq else 0.0,
        float(a @ b) / norm if norm else float(torch.equal(a, b)))


@dataclass
class LogitsAgreement:
    """How the next-token distributions of the two sides agree, over the probe's positions."""

    top1: float  # fraction of positions whose argmax agrees
    top5: float  # mean overlap of the two top-5 sets (1.0 = same five tokens)
    kl_mean: float  # mean over positions of KL(softmax(b) || softmax(a)), nats
    kl_max: float


def logits_agreement(a: torch.Tensor, b: torch.Tensor) -> LogitsAgreement:
    """a, b: (T, vocab) logits of the two sides."""
    a, b = a.double(), b.double()
    top1 = float((a.argmax(-1) == b.argmax(-1)).double().mean())
    k = min(5, a.shape[-1])
    ta, tb = a.topk(k, dim=-1).indices, b.topk(k, dim=-1).indices  # (T, k)
    overlap = (ta[:, :, None] == tb[:, None, :]).any(-1).double().sum(-1) / k  # (T,)
    kl = F.kl_div(F.log_softmax(a, -1), F.log_softmax(b, -1), log_target=True, reduction="none").sum(-1)  # (T,)
    return LogitsAgreement(top1, float(overlap.mean()), float(kl.mean()), float(kl.max()))


@dataclass
class RouterAgreement:
    """Whether the two sides sent each token of the probe to the same experts (as sets) in one MoE layer."""

    layer: int
    agree: int  # tokens whose chosen experts agree
    tokens: int
    first_difference: int | None  # the first position whose experts differ


def first_jump(records: Sequence[RecordError], tolerance: float, factor: float = JUMP_FACTOR) -> str | None:
    """The first record whose max_rel exceeds `tolerance` and `factor` times every max_rel before it."""
    worst = 0.0
    for r in records:
        if r.max_rel > tolerance and r.max_rel > factor * worst:
            return r.name
        worst = max(worst, r.max_rel)
    return None


@dataclass
class Side:
    """One side of the report: what ran, on what, and what it cost."""

    name: str
    checkpoint: str
    format: str
    dtype: str
    load_s: float
    forward_s: float
    generate_s: float
    peak_rss_bytes: int


@dataclass
class Greedy:
    """The greedy continuations of the two sides."""

    steps: int
    a_tokens: list[int]
    b_tokens: list[int]
    first_divergence: int | None  # the first step where they differ (0-based), None if identical
    a_margin: float | None  # at that step: each side's top-1 minus top-2 logit (small = a near tie)
    b_margin: float | None


@dataclass
class ParityReport:
    """Everything `mistral-ref parity` prints, as data (to_dict() is its JSON)."""

    a: Side
    b: Side
    tokens: list[int]
    probe: str
    dtype: str
    tolerance: float
    records: list[RecordError]  # in model order, logits last
    routers: list[RouterAgreement]
    logits: LogitsAgreement
    first_jump: str | None
    first_over_tolerance: str | None
    greedy: Greedy | None
    passed: bool
    version: int = 1

    @property
    def logits_error(self) -> RecordError:
        return self.records[-1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, layers: bool = True) -> str:
        """The terminal report: sides, per-record errors (if `layers`), logits agreement, greedy, verdict."""
        a, b = self.a, self.b
        lines = [f"a: {a.name} on {a.checkpoint} ({a.format}, {a.dtype})",
                 f"b: {b.name} on {b.checkpoint} ({b.format}, {b.dtype})",
                 f"probe: {len(self.tokens)} tokens, {self.probe}", ""]
        shown = self.records if layers else self.records[-1:]
        routers = {r.layer: r for r in self.routers}
        lines.append(f"{'record':<24}{'max_abs':>11}{'max_rel':>11}{'nmse':>11}{'cosine':>12}")
        for r in shown:
            mark = "  <- first jump" if r.name == self.first_jump else ""
            lines.append(f"{r.name:<24}{r.max_abs:>11.2e}{r.max_rel:>11.2e}{r.nmse:>11.2e}{r.cosine:>12.8f}{mark}")
            if r.kind == "feed_forward" and r.layer in routers:
                ra = routers[r.layer]
                where = "" if ra.first_difference is None else f" (first difference at position {ra.first_difference})"
                lines.append(f"{f'layers.{r.layer}.router':<24} experts agree on {ra.agree}/{ra.tokens} "
                             f"tokens{where}")
        lg = self.logits
        lines += ["", f"logits: top-1 agreement {lg.top1:.1%}, top-5 overlap {lg.top5:.1%}, "
                      f"KL(b||a) mean {lg.kl_mean:.2e} max {lg.kl_max:.2e} nats"]
        if layers:
            if self.first_jump:
                r = next(r for r in self.records if r.name == self.first_jump)
                why = ""
                if r.kind == "feed_forward" and r.layer in routers and routers[r.layer].agree < routers[r.layer].tokens:
                    ra = routers[r.layer]
                    why = (f"; its router chose other experts for {ra.tokens - ra.agree} token(s): a near tie "
                           "flipped, or a wrong router")
                lines.append(f"first error jump: {r.name} (max_rel {r.max_rel:.2e}){why}")
            else:
                lines.append(f"first error jump: none (no record jumps {JUMP_FACTOR:g}x above {self.tolerance:g})")
        if self.greedy is not None:
            g = self.greedy
            if g.first_divergence is None:
                lines.append(f"greedy: the {g.steps} tokens are identical")
            else:
                s = g.first_divergence
                lines.append(f"greedy: first divergence at step {s}: {a.name} {g.a_tokens[s]}, {b.name} "
                             f"{g.b_tokens[s]} (top-2 margins {g.a_margin:.3g} / {g.b_margin:.3g})")
        lines += ["", f"{'side':<17}{'load':>9}{'forward':>9}{'generate':>10}{'peak RSS':>12}"]
        for s in (a, b):
            lines.append(f"{s.name:<17}{s.load_s:>8.1f}s{s.forward_s:>8.2f}s{s.generate_s:>9.2f}s"
                         f"{s.peak_rss_bytes / 2**30:>8.2f} GiB")
        err = self.logits_error.max_rel
        verdict = "PASS" if self.passed else "FAIL"
        lines += ["", f"{verdict}: logits max_rel {err:.2e} {'<=' if self.passed else '>'} tolerance "
                      f"{self.tolerance:g} ({self.dtype})"]
        return "\n".join(lines)


def build_report(a: Trace, b: Trace, tokens: Sequence[int], probe: str, dtype: torch.dtype,
                 tolerance: float | None = None) -> ParityReport:
    """Compare two traces (a: mistral-ref, b: the other side) into a ParityReport."""
    tolerance = DEFAULT_TOLERANCE.get(dtype, 1e-2) if tolerance is None else tolerance
    records = [compare(name, act, b.activations[name]) for name, act in a.activations.items()
               if name in b.activations]
    records.append(compare("logits", a.logits, b.logits))
    routers = []
    for layer, ea in a.experts.items():
        if layer in b.experts:
            same = (ea == b.experts[layer]).all(-1)  # (T,)
            bad = (~same).nonzero()
            routers.append(RouterAgreement(layer, int(same.sum()), len(same), int(bad[0]) if len(bad) else None))
    greedy = None
    if a.generated or b.generated:
        div = next((i for i, (x, y) in enumerate(zip(a.generated, b.generated)) if x != y), None)
        greedy = Greedy(len(a.generated), a.generated, b.generated, div,
                        a.margins[div] if div is not None else None, b.margins[div] if div is not None else None)
    over = next((r.name for r in records if r.max_rel > tolerance), None)
    return ParityReport(
        Side(a.name, a.source, a.format, a.dtype, a.load_s, a.forward_s, a.generate_s, a.peak_rss),
        Side(b.name, b.source, b.format, b.dtype, b.load_s, b.forward_s, b.generate_s, b.peak_rss),
        list(tokens), probe, str(dtype).removeprefix("torch."), tolerance, records, routers,
        logits_agreement(a.logits, b.logits), first_jump(records, tolerance), over, greedy,
        passed=records[-1].max_rel <= tolerance)


def other_side(name: str) -> Callable[..., Trace]:
    """The runner of an oracle side, e.g. "transformers": found through the entry-point group
    ``mistral_ref.parity_sides`` (the `parity_oracles` package that ships with mistral-ref registers it), so this
    library never imports an oracle itself."""
    found = [ep for ep in entry_points(group="mistral_ref.parity_sides") if ep.name == name]
    if not found:
        raise ValueError(f"no parity side called {name!r} is installed (the parity_oracles package of mistral-ref "
                         "registers 'transformers'; reinstall mistral-ref)")
    return found[0].load()


def run_parity(checkpoint: str | Path, against: str | Path = TRANSFORMERS, tokens: Sequence[int] | None = None, *,
               probe: str = "", dtype: torch.dtype | str | None = None, layers: bool = True, generate: int = 0,
               tolerance: float | None = None, backend: str | None = None, log: Log = _quiet) -> ParityReport:
    """Run mistral-ref on `checkpoint` and `against` (TRANSFORMERS, or another checkpoint that mistral-ref
    loads) on the same token ids, one at a time, and compare them.

    tokens: the probe (default: probe_tokens(checkpoint)); dtype: of both sides (default: the checkpoint's own,
    float32 for a quantized GGUF); layers: record every layer (else only the logits); generate: greedy tokens
    to decode on each side; tolerance: the logits' max_rel that passes (default DEFAULT_TOLERANCE[dtype]);
    backend: mistral-ref's backend (default: the model's default); log: receives progress lines.
    Raises CheckpointError before loading anything if the two sides cannot be compared.
    """
    if tokens is None:
        tokens, probe = probe_tokens(checkpoint)
    tokens = list(tokens)
    args, own_dtype, fmt = checkpoint_args(checkpoint)
    dtype = parse_dtype(dtype) or own_dtype
    if against != TRANSFORMERS:
        check_compatible(checkpoint, against, tokens)
    else:
        check_tokens(tokens, args.vocab_size, checkpoint)
        if fmt == "gguf":
            check_transformers_reads_gguf(checkpoint, args, len(tokens) + generate)
    a = run_mistral_ref(checkpoint, tokens, dtype, layers=layers, generate=generate, backend=backend, log=log)
    gc.collect()  # the model of side a is unreachable now: free it before side b loads
    log(f"mistral-ref: done, peak resident memory {a.peak_rss / 2**30:.2f} GiB; freed")
    if against == TRANSFORMERS:
        b = other_side(TRANSFORMERS)(checkpoint, tokens, dtype, layers=layers, generate=generate, log=log)
    else:
        b = run_mistral_ref(against, tokens, dtype, layers=layers, generate=generate, name="mistral-ref (b)",
                            backend=backend, log=log)
    gc.collect()
    log(f"{b.name}: done, peak resident memory {b.peak_rss / 2**30:.2f} GiB; freed")
    return build_report(a, b, tokens, probe, dtype, tolerance)


# ---- the plot ------------------------------------------------------------------------------------------------
def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Plot max_rel by record (attention, feed-forward, residual stream; norm and logits) from a report's
    to_dict() (or its JSON, loaded), log scale, with the tolerance and the first jump marked.  Needs matplotlib
    (the `bench` or `notebooks` extra).  Returns the path written."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = report["records"]
    x = {r["name"]: i for i, r in enumerate(records)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * len(records)), 3.6))
    nonzero = [r["max_rel"] for r in records if r["max_rel"] > 0]
    floor = min(nonzero) / 10 if nonzero else 1e-12  # exact zeros are drawn here, labelled "exact"
    for kind, style in (("attention", "o-"), ("feed_forward", "s-"), ("residual", "^-")):
        rows = [r for r in records if r["kind"] == kind]
        if rows:
            ax.semilogy([r["layer"] for r in rows], [max(r["max_rel"], floor) for r in rows], style, ms=3,
                        label=kind.replace("_", "-"))
    n_layers = 1 + max((r["layer"] for r in records if r["layer"] is not None), default=-1)
    for name, pos in (("embeddings", -1), ("norm", n_layers), ("logits", n_layers + 1)):
        if name in x:
            ax.semilogy([pos], [max(records[x[name]]["max_rel"], floor)], "kD", ms=4)
            exact = " (exact)" if records[x[name]]["max_rel"] == 0 else ""
            ax.annotate(name + exact, (pos, max(records[x[name]]["max_rel"], floor)), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(report["tolerance"], color="grey", ls="--", lw=0.8, label=f"tolerance {report['tolerance']:g}")
    jump = report.get("first_jump")
    if jump is not None:
        r = records[x[jump]]
        pos = r["layer"] if r["layer"] is not None else (-1 if jump == "embeddings" else n_layers + 1)
        ax.axvline(pos, color="red", lw=0.8, alpha=0.6, label=f"first jump: {jump}")
    ax.set_xlabel("layer")
    ax.set_ylabel("max|a − b| / max|b|")
    ax.set_title(f"{report['a']['name']} vs {report['b']['name']} ({report['dtype']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(report: ParityReport, path: str | Path) -> Path:
    """Write report.to_dict() as JSON (atomically: temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
