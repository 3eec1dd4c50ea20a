"""llama.cpp as a peer in benchmarks/bench.py: the same random weights, exported by mistral_ref's own GGUF writer.

llama.cpp comes from llama-cpp-python (the `bench` extra; `make bench` builds it from source, llama.cpp included,
for this CPU), driven through its C API (llama_decode on one sequence, batch 1, n_threads = the bench's threads),
not through its high-level Llama class, so that both sides time the same work:

* decode: greedy, `new` tokens after the same random `prompt`-token prompt as bench.py's decode rows; one
  llama_decode for the prompt, then one per token; tokens/s = 1 / mean seconds between the ends of consecutive
  passes, the argmax included (as bench.py's hook times mistral_ref's generate());
* prefill T: llama_decode of the same T random tokens into a cleared KV cache (n_batch = the context, so it is one
  call; llama.cpp splits it into micro-batches of n_ubatch=512 itself), logits of the last token only;
* greedy agreement: llama.cpp's tokens against mistral_ref's tokens of the same runs (leading tokens equal / new);
* Q8_0 / Q4_0: the F32 file quantized by llama.cpp's own quantizer (llama_model_quantize: its default recipe,
  which keeps norms in F32 and, for Q4_0, the output matrix in Q6_K), beside mistral_ref's int8 / int4
  (`mistral_ref.quantize_model`) of the same weights: int4 with groups of 32 (a bf16 scale and zero a group: 5
  bits a weight) and of 64 (4.5 bits a weight, the size of Q4_0's blocks of 32 with one fp16 scale);
* quality of the quantized rows: each side's logits at every position of the prompt, decoded one token at a time
  as generation runs (mistral_ref's decode step, llama.cpp's llama_decode), against mistral_ref's fp32 logits of
  the same prompt (`mistral_ref.parity.logits_agreement`: top-1 agreement, mean KL(fp32 || side) in nats).

Each comparison alternates mistral_ref and llama.cpp round by round (bench.alternate), medians [min-max] over the
rounds.  mistral_ref's side is loaded from the very GGUF file llama.cpp reads (load_model), so both multiply the
same numbers.  llama.cpp's KV cache is F32 in the fp32 rows (same precision as ours) and its default F16 otherwise.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench import StepClock, alternate, fmt, ratios, summary

from mistral_ref.backends.linear import join_projections
from mistral_ref.backends.moe import stack_all_experts
from mistral_ref.cache import KVCache
from mistral_ref.checkpoint import load_model, save_gguf
from mistral_ref.embedded import EMBEDDED_MODEL_DIR
from mistral_ref.generation import generate
from mistral_ref.model import Transformer
from mistral_ref.quantize import QuantizationError

#: GGUF type of each dtype row, and llama.cpp's quantized types beside mistral_ref's schemes.
GGUF_TYPES = {"fp32": "F32", "bf16": "BF16"}
#: mistral_ref scheme (row label: scheme, group size) -> llama.cpp type; "int4 g64" is the same size as Q4_0.
QUANTIZED = {"int8": ("int8", 32, "Q8_0"), "int4": ("int4", 32, "Q4_0"), "int4 g64": ("int4", 64, "Q4_0")}
#: The tokenizer written into the GGUF files (llama.cpp needs one to load a model; the bench feeds token ids,
#: so which one does not matter): the embedded model's SentencePiece vocabulary, padded with unused tokens.
TOKENIZER = EMBEDDED_MODEL_DIR / "tokenizer.model.v3"
TOKENIZER_SIZE = 3072


def unavailable() -> str | None:
    """None if llama_cpp imports, else why not (one line)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or OSError/RuntimeError from loading its shared library
        return f"{type(e).__name__}: {e}"
    return None


_LOG_CALLBACK = None


def _quiet(llama_cpp) -> None:
    """Keep llama.cpp's log to errors (its loader prints hundreds of lines per model)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        def log(level: int, text: bytes, _user) -> None:
            if level == 4:  # GGML_LOG_LEVEL_ERROR
                print(text.decode(errors="replace"), end="", flush=True)

        _LOG_CALLBACK = llama_cpp.llama_log_callback(log)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()


class LlamaCpp:
    """One GGUF file loaded by llama.cpp with one context: a single sequence at batch 1."""

    def __init__(self, path: Path, n_ctx: int, threads: int, kv_f32: bool = False, extra_bufts: bool = True):
        import llama_cpp as L

        _quiet(L)
        self.L = L
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = extra_bufts  # llama.cpp's CPU-specific weight layouts (repacked blocks, AMX)
        self.model = L.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        if kv_f32:
            cp.type_k = cp.type_v = L.GGML_TYPE_F32
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.memory = L.llama_get_memory(self.ctx)

    def forward(self, tokens: list[int]) -> np.ndarray:
        """llama_decode of `tokens` after what the cache holds; the logits of the last one, (n_vocab,)."""
        L = self.L
        ids = (L.llama_token * len(tokens))(*tokens)
        if L.llama_decode(self.ctx, L.llama_batch_get_one(ids, len(tokens))) != 0:
            raise RuntimeError(f"llama_decode failed on {len(tokens)} tokens")
        return np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))

    def prefill(self, tokens: list[int]) -> np.ndarray:
        self.L.llama_memory_clear(self.memory, True)
        return self.forward(tokens)

    def greedy(self, prompt: list[int], new: int) -> tuple[list[int], float, float]:
        """(tokens, seconds to the end of the prompt's pass, seconds per later pass) of a greedy decode."""
        self.L.llama_memory_clear(self.memory, True)
        t0 = time.perf_counter()
        out = [int(self.forward(prompt).argmax())]
        first = time.perf_counter()
        for _ in range(new - 1):
            out.append(int(self.forward([out[-1]]).argmax()))
        return out, first - t0, (time.perf_counter() - first) / max(new - 1, 1)

    def close(self) -> None:
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


_PROBE = """
import sys
sys.path[:0] = sys.argv[3:]
from peer_llamacpp import LlamaCpp
m = LlamaCpp(sys.argv[1], 64, int(sys.argv[2]))
m.forward(list(range(1, 9)))
m.forward([9])
m.close()
"""
_extra_bufts: dict[tuple[str, int], str | None] = {}


def extra_bufts_fail(path: Path, threads: int) -> str | None:
    """Why llama.cpp's extra buffer types (its repacked and AMX weight layouts, on by default) cannot be used for
    this file on this CPU, or None: a prompt and a decode step in a child process, which a crash cannot take down
    with the bench.  (On an AMX Xeon, llama-cpp-python 0.3.36 built with GGML_NATIVE died with SIGSEGV in its first
    llama_decode of Q8_0 / Q4_0 files; without those layouts it runs.)  One probe per file and thread count."""
    key = (str(path), threads)
    if key not in _extra_bufts:
        here = str(Path(__file__).resolve().parent)
        r = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(threads), here, *sys.path],
                           capture_output=True, text=True, timeout=300)
        if r.returncode < 0:
            _extra_bufts[key] = f"killed by {signal.Signals(-r.returncode).name}"
        elif r.returncode > 0:
            _extra_bufts[key] = f"exit status {r.returncode}: {(r.stderr.strip().splitlines() or [''])[-1][:200]}"
        else:
            _extra_bufts[key] = None
    return _extra_bufts[key]


def open_llamacpp(path: Path, n_ctx: int, threads: int, label: str, kv_f32: bool = False) -> LlamaCpp:
    """LlamaCpp with its default extra buffer types where a probe runs them, without them (saying so) where not."""
    why = extra_bufts_fail(path, threads)
    if why:
        print(f"  llama.cpp {label}: its extra buffer types (repacked / AMX weight layouts) "
              f"{'crashed' if why.startswith('killed') else 'failed'} in a probe ({why}); this row runs llama.cpp "
              "without them", flush=True)
    return LlamaCpp(path, n_ctx, threads, kv_f32=kv_f32, extra_bufts=why is None)


def quantize_gguf(src: Path, dst: Path, qtype: str, threads: int) -> Path:
    """`src` (F32 GGUF) quantized to `qtype` ("Q8_0" | "Q4_0") by llama.cpp's llama_model_quantize."""
    import llama_cpp as L

    _quiet(L)
    params = L.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = {"Q8_0": L.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": L.LLAMA_FTYPE_MOSTLY_Q4_0}[qtype]
    if L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {src} -> {qtype} failed")
    return dst


def write_gguf(model: Transformer, directory: Path, dtypes: list[str]) -> dict[str, Path] | str:
    """`model`'s weights (fp32) as one GGUF per dtype row, by mistral_ref's writer; or why not (a line)."""
    if model.args.vocab_size < TOKENIZER_SIZE:
        return (f"the vocabulary ({model.args.vocab_size}) is smaller than the {TOKENIZER_SIZE} tokens of the "
                "tokenizer the GGUF must carry")
    directory.mkdir(parents=True, exist_ok=True)
    return {d: save_gguf(model, directory / f"{d}.gguf", GGUF_TYPES[d], tokenizer=TOKENIZER, progress=False)
            for d in dtypes if d in GGUF_TYPES}


def agreement(ours: list[int], theirs: list[int]) -> int:
    """How many leading tokens are equal."""
    n = 0
    while n < min(len(ours), len(theirs)) and ours[n] == theirs[n]:
        n += 1
    return n


def compare_decode(ours: Transformer, theirs: LlamaCpp, prompt_len: int, new: int, runs: int) -> dict:
    """Greedy decode, batch 1, alternating mistral_ref's generate() and llama.cpp's llama_decode loop."""
    prompt = torch.randint(0, ours.args.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    plist = prompt.tolist()
    tokens: dict[str, list[int]] = {}

    def ours_fn():
        tokens["ours"] = generate(ours, plist, new, temperature=0.0)[0].tokens

    def theirs_fn():
        tokens["llama_cpp"], first, step = theirs.greedy(plist[0], new)
        return first, step

    clock = StepClock(ours)
    try:
        t = alternate({"ours": lambda: clock.run(ours_fn), "llama_cpp": theirs_fn}, runs, measure=lambda fn: fn())
    finally:
        clock.handle.remove()
    rate = {k: [1 / step for _, step in v] for k, v in t.items()}
    return {"ours": summary(rate["ours"]), "llama_cpp": summary(rate["llama_cpp"]),
            "ratio": ratios(rate["ours"], rate["llama_cpp"]),
            "ttft_ours_s": summary([f for f, _ in t["ours"]]), "ttft_llama_cpp_s": summary([f for f, _ in
                                                                                            t["llama_cpp"]]),
            "agreement": agreement(tokens["ours"], tokens["llama_cpp"]), "new": new,
            "tokens": tokens, "raw": rate}


def stepwise_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """mistral_ref's logits (T, vocab) fp32 at each of `tokens`, one decode step a token into a KV cache (the
    path generation takes, the C kernels' decode products included)."""
    cache = KVCache(model.args, 1, len(tokens), dtype=model.dtype)
    with torch.inference_mode():
        return torch.cat([model(torch.tensor([[t]]), torch.tensor([[i]]), cache)[0] for i, t in enumerate(tokens)])


def llamacpp_logits(theirs: LlamaCpp, tokens: list[int]) -> torch.Tensor:
    """llama.cpp's logits (T, vocab) at each of `tokens`, one llama_decode a token after a cleared cache."""
    theirs.L.llama_memory_clear(theirs.memory, True)
    return torch.stack([torch.from_numpy(theirs.forward([t]).copy()) for t in tokens]).float()


def quality(reference: torch.Tensor, ours: torch.Tensor, theirs: torch.Tensor) -> dict:
    """Top-1 agreement and mean / max KL(reference || side) of each side's logits (T, vocab)."""
    from mistral_ref.parity import logits_agreement

    out = {}
    for side, logits in (("ours", ours), ("llama_cpp", theirs)):
        a = logits_agreement(logits, reference)  # (KL(b || a): b = the fp32 reference)
        out[side] = {"top1": a.top1, "kl_mean": a.kl_mean, "kl_max": a.kl_max}
    return out


def compare_prefill(ours: Transformer, theirs: LlamaCpp, T: int, runs: int, warmup: bool = True) -> dict:
    """One pass over the same T random tokens as bench.py's prefill rows, into a fresh cache; last logits."""
    tokens = torch.randint(0, ours.args.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
    positions, last, tlist = torch.arange(T)[None], torch.tensor([T - 1]), tokens[0].tolist()

    @torch.inference_mode()
    def ours_fn():
        return ours(tokens, positions, KVCache(ours.args, 1, T + 1, dtype=ours.dtype), logits_at=last)

    t = alternate({"ours": ours_fn, "llama_cpp": lambda: theirs.prefill(tlist)}, runs, warmup=warmup)
    rate = {k: [T / x for x in v] for k, v in t.items()}
    return {"ours": summary(rate["ours"]), "llama_cpp": summary(rate["llama_cpp"]),
            "ratio": ratios(rate["ours"], rate["llama_cpp"]), "raw": rate}


def step_profile(model: Transformer, prompt_len: int, new: int) -> dict:
    """Where a decode step's time goes: one greedy generate() (a prompt_len-token prompt, `new` tokens) under
    torch.profiler, after the timed rounds.  Returns the profiled seconds per decode step (the profiler adds a
    few microseconds an operator), the seconds per step in the C kernels' operators (torch.ops.mistral_ref.*, their
    own time: the products of backends/cpu_gemv.c and the code that calls them) and their calls per step.  Each
    forward pass is a profiler range, so the operators the prompt's pass calls (a short prompt's products, the last
    position's vocabulary product) are left out."""
    from torch.profiler import ProfilerActivity, profile, record_function

    passes: list = []

    def enter(module, args):
        passes.append(record_function(f"mistral_ref.forward.{len(passes)}"))
        passes[-1].__enter__()

    def leave(module, args, out):
        passes[-1].__exit__(None, None, None)

    def pass_of(event) -> int:  # the forward pass an event ran in (0: the prompt's), -1 outside them
        while event is not None and not event.name.startswith("mistral_ref.forward."):
            event = event.cpu_parent
        return -1 if event is None else int(event.name.rsplit(".", 1)[1])

    clock = StepClock(model)
    hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            _, step = clock.run(lambda: generate(model, [[1] * prompt_len], new, temperature=0.0))
    finally:
        clock.handle.remove()
        for hook in hooks:
            hook.remove()
    kernels = [e for e in prof.events() if e.name.startswith("mistral_ref::") and pass_of(e) > 0]
    steps = max(new - 1, 1)
    return {"step_s": step, "products_s": sum(e.self_cpu_time_total for e in kernels) / 1e6 / steps,
            "calls": len(kernels) / steps}


def compare_compiled(ours: Transformer, theirs: LlamaCpp, prompt_len: int, new: int, runs: int, mode: str) -> dict:
    """compare_decode with mistral_ref's decode step compiled (compile_decode(mode=mode)), compiled before the
    timed rounds (its seconds reported apart), then one profiled run (step_profile); eager again afterwards."""
    t0 = time.perf_counter()
    ours.compile_decode(mode=mode)
    _, what = ours.compiled_decode.warm_up(1, prompt_len + new)
    seconds = time.perf_counter() - t0
    try:
        d = compare_decode(ours, theirs, prompt_len, new, runs)
        d["profile"] = step_profile(ours, prompt_len, new)
    finally:
        ours.compile_decode(False)
    d.update(compile_s=seconds, compile_what=what, mode=mode)
    return d


def _print_compiled(name: str, label: str, d: dict, new: int) -> None:
    print(f"  llama.cpp decode {name} {label} b1, mistral_ref compiled ({d['mode']}; {d['compile_s']:.0f} s, "
          f"{d['compile_what']}): {fmt(d['ours'])} vs {fmt(d['llama_cpp'])} tok/s, ratio {fmt(d['ratio'], 2)}, "
          f"greedy agreement {d['agreement']}/{new}", flush=True)
    prof = d.get("profile")
    if prof:
        print(f"    profiled step {prof['step_s'] * 1e3:.1f} ms: C-kernel operators {prof['products_s'] * 1e3:.1f} ms "
              f"({prof['products_s'] / prof['step_s']:.0%}) in {prof['calls']:.0f} calls, the rest "
              f"{(prof['step_s'] - prof['products_s']) * 1e3:.1f} ms", flush=True)


def bench_model(name: str, files: dict[str, Path] | str, dtypes: list[str], threads: int, runs: int,
                prompt_len: int, new: int, prefill_lens: list[int], long_runs: int,
                compile_mode: str | None = None, long_context: int | None = None) -> dict:
    """Every fp32/bf16 row of one model against llama.cpp (the files from write_gguf), printing as it goes;
    compile_mode: also decode with mistral_ref's compiled step ("regional" or "full"); long_context: also decode
    after a prompt of that many tokens (eager, and compiled with compile_mode), where attention over the cache
    weighs beside the weights."""
    if isinstance(files, str):
        print(f"  llama.cpp {name}: skipped: {files}")
        return {"skipped": files}
    n_ctx = max([*prefill_lens, prompt_len + new, (long_context or 0) + new]) + 16
    out: dict = {}
    for dname in dtypes:
        if dname not in files:
            continue
        ours = load_model(files[dname], dtype="float32" if dname == "fp32" else "bfloat16")
        stack_all_experts(ours)  # as the CLI lays the experts out,
        join_projections(ours)  # and wq, wk, wv
        theirs = open_llamacpp(files[dname], n_ctx, threads, f"{name} {dname}", kv_f32=dname == "fp32")
        try:
            entry = out[dname] = {}
            d = entry["decode_b1"] = compare_decode(ours, theirs, prompt_len, new, runs)
            print(f"  llama.cpp decode {name} {dname} b1: {fmt(d['ours'])} vs {fmt(d['llama_cpp'])} tok/s, ratio "
                  f"{fmt(d['ratio'], 2)}, greedy agreement {d['agreement']}/{new}", flush=True)
            if compile_mode:
                d = entry["decode_b1_compiled"] = compare_compiled(ours, theirs, prompt_len, new, runs, compile_mode)
                _print_compiled(name, dname, d, new)
            if long_context:
                label = f"{dname}, {long_context}-token prompt"
                d = entry[f"decode_b1_ctx{long_context}"] = compare_decode(ours, theirs, long_context, new, runs)
                print(f"  llama.cpp decode {name} {label} b1: {fmt(d['ours'])} vs {fmt(d['llama_cpp'])} tok/s, "
                      f"ratio {fmt(d['ratio'], 2)}, greedy agreement {d['agreement']}/{new}", flush=True)
                if compile_mode:
                    d = entry[f"decode_b1_ctx{long_context}_compiled"] = compare_compiled(
                        ours, theirs, long_context, new, runs, compile_mode)
                    _print_compiled(name, label, d, new)
            for i, T in enumerate(prefill_lens):
                long = T > 1024 and i > 0
                pf = entry[f"prefill_{T}"] = compare_prefill(ours, theirs, T, long_runs if long else runs,
                                                             warmup=not long)
                print(f"  llama.cpp prefill {name} {dname} {T}: {fmt(pf['ours'], 0)} vs {fmt(pf['llama_cpp'], 0)} "
                      f"tok/s, ratio {fmt(pf['ratio'], 2)}", flush=True)
        finally:
            theirs.close()
            del ours
    return out


def bench_quantized(name: str, files: dict[str, Path] | str, threads: int, runs: int, prompt_len: int,
                    new: int, reference: list[int] | None = None, compile_mode: str | None = None) -> dict:
    """mistral_ref int8 / int4 (quantize_model, group 32, computing in bf16) against llama.cpp Q8_0 / Q4_0 of the
    same F32 file: decode batch 1, alternating; each side's greedy agreement with `reference` (the fp32 tokens)
    printed."""
    import mistral_ref

    if isinstance(files, str) or "fp32" not in files:
        return {"skipped": files if isinstance(files, str) else "no F32 file (run with fp32 in --dtypes)"}
    quantize_model = getattr(mistral_ref, "quantize_model", None)
    if quantize_model is None:
        line = "mistral_ref.quantize_model is missing (issue 21's quantization is not in this tree)"
        print(f"  llama.cpp Q8_0/Q4_0 {name}: skipped: {line}")
        return {"skipped": line}
    out: dict = {}
    src = files["fp32"]
    fp32 = load_model(src, dtype="float32")
    probe = torch.randint(0, fp32.args.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.inference_mode():
        fp32_logits = fp32(torch.tensor([probe]))[0].float()  # (T, vocab)
    del fp32
    made: dict[str, Path] = {}  # each llama.cpp type quantized once, here, from this F32 file
    for label, (scheme, group, qtype) in QUANTIZED.items():
        if qtype not in made:
            made[qtype] = quantize_gguf(src, src.with_name(f"{qtype}.gguf"), qtype, threads)
        path = made[qtype]
        # quantized models compute in bf16: the int8 / int4 kernels take bf16 rows (fp32 products dequantize)
        try:
            ours = quantize_model(load_model(src, dtype="bfloat16"), scheme, group_size=group)
            stack_all_experts(ours)  # as the CLI lays the experts out
            join_projections(ours)  # (quantized projections: left as they are)
        except QuantizationError as e:  # e.g. Small 4's 80-wide experts: no int4 group of 32-256 divides them
            out[label] = {"skipped": str(e), "qtype": qtype}
            print(f"  llama.cpp decode {name} {label} vs {qtype} b1: skipped: {e}", flush=True)
            continue
        theirs = open_llamacpp(path, prompt_len + new + 16, threads, f"{name} {qtype}")
        try:
            q = quality(fp32_logits, stepwise_logits(ours, probe), llamacpp_logits(theirs, probe))
            d = out[label] = compare_decode(ours, theirs, prompt_len, new, runs)
            d["quality"] = q
            if compile_mode and label in ("int8", "int4"):
                c = out[f"{label} compiled"] = compare_compiled(ours, theirs, prompt_len, new, runs, compile_mode)
                c["qtype"] = qtype
                _print_compiled(name, f"{label} vs {qtype}", c, new)
        finally:
            theirs.close()
            del ours
        d["qtype"] = qtype
        if reference is not None:
            d["agreement_ours_fp32"] = agreement(reference, d["tokens"]["ours"])
            d["agreement_llama_cpp_fp32"] = agreement(reference, d["tokens"]["llama_cpp"])
        print(f"  llama.cpp decode {name} {label} vs {qtype} b1: {fmt(d['ours'])} vs {fmt(d['llama_cpp'])} tok/s, "
              f"ratio {fmt(d['ratio'], 2)}, greedy agreement {d['agreement']}/{new}; {quality_line(q)}", flush=True)
    return out


def quality_line(q: dict) -> str:
    """top-1 / mean KL against the fp32 logits, both sides (bench_quantized's quality)."""
    o, t = q["ours"], q["llama_cpp"]
    return (f"vs fp32 logits: top-1 {o['top1']:.3f} / {t['top1']:.3f}, "
            f"mean KL {o['kl_mean']:.2e} / {t['kl_mean']:.2e} nats (mistral_ref / llama.cpp)")


def print_tables(results: dict[str, dict], new: int, prompt_len: int) -> None:
    """The llama.cpp tables: decode rows (fp32, bf16, int8 vs Q8_0, int4 vs Q4_0), then prefill rows."""
    rows = [(name, key, d) for name, r in results.items() for key, d in r.items() if isinstance(d, dict)]
    print(f"\n## llama.cpp: decode tokens/s, greedy, {new} new tokens after a {prompt_len}-token prompt, batch 1")
    print("agreement = leading greedy tokens equal to mistral_ref's in the same run; quantized rows also give each "
          "side's agreement with the fp32 tokens")
    print("| model | mistral_ref | llama.cpp | mistral_ref tok/s | llama.cpp tok/s | ratio | agreement |")
    print("|---|---|---|---|---|---|---|")
    for name, key, d in rows:
        if "skipped" in d:  # a quantized row whose shapes the scheme does not take
            print(f"| {name} | {key} | {d.get('qtype', '')} | skipped: {d['skipped']} | | | |")
            continue
        decs = [(key, d.get("decode_b1", d if "qtype" in d else None))]
        if "decode_b1_compiled" in d:
            decs.append((f"{key} compiled", d["decode_b1_compiled"]))
        for k in d:  # after a long prompt (--long-context)
            if k.startswith("decode_b1_ctx"):
                tokens = k.removeprefix("decode_b1_ctx").removesuffix("_compiled")
                decs.append((f"{key}, {tokens}-token prompt{' compiled' if k.endswith('_compiled') else ''}",
                             d[k]))
        for label, dec in decs:
            if dec is None:
                continue
            theirs = d.get("qtype", GGUF_TYPES.get(key, key))
            if "mode" in dec:
                label = f"{label} ({dec['mode']}, {dec['compile_s']:.0f} s: {dec['compile_what']})"
            extra = (f" (fp32: {d['agreement_ours_fp32']} / {d['agreement_llama_cpp_fp32']})"
                     if "agreement_ours_fp32" in d else "")
            if "quality" in d and dec is d:
                extra += f"; {quality_line(d['quality'])}"
            print(f"| {name} | {label} | {theirs} | {fmt(dec['ours'])} | {fmt(dec['llama_cpp'])} | "
                  f"{fmt(dec['ratio'], 2)}x | {dec['agreement']}/{new}{extra} |")
    print("\n## llama.cpp: prefill tokens/s, one pass into a fresh cache")
    print("| model | dtype | tokens | mistral_ref | llama.cpp | ratio |")
    print("|---|---|---|---|---|---|")
    for name, key, d in rows:
        for k, pf in d.items():
            if k.startswith("prefill_"):
                print(f"| {name} | {key} | {k[8:]} | {fmt(pf['ours'], 0)} | {fmt(pf['llama_cpp'], 0)} | "
                      f"{fmt(pf['ratio'], 2)}x |")
    agree = [d["decode_b1"]["agreement"] == new for _, key, d in rows if key == "fp32"]
    if agree:
        print(f"\nfp32 greedy tokens identical to llama.cpp's in every model: {all(agree)}")
