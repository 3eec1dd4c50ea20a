"""Mistral Small 4 as llama.cpp's "mistral4" GGUF architecture: what save_gguf writes, and load_gguf reads, for
latent attention with fine-grained experts (mla.py, fine_moe.py).

llama.cpp runs "mistral4" with its DeepSeek-V2 graph, MLA absorbed: the cache holds each token's normed latent
and its rotary key (a single key / value head), queries are multiplied into latent space by attn_k_b, the
attention output leaves it through attn_v_b.  So the metadata describes the cache, not the heads:

| key (mistral4.)                         | value                                               |
|-----------------------------------------|-----------------------------------------------------|
| attention.head_count_kv                 | 1 (MLA absorbed is multi-query attention)           |
| attention.key_length / value_length     | kv_lora_rank + qk_rope_head_dim / kv_lora_rank      |
| attention.key_length_mla / value_length_mla | qk_nope + qk_rope / v_head_dim (per head)       |
| attention.q_lora_rank / kv_lora_rank    | the low-rank widths                                 |
| rope.dimension_count                    | qk_rope_head_dim (RoPE type NORM: adjacent pairs)   |
| expert_count / expert_used_count        | num_experts / num_experts_per_tok                   |
| expert_shared_count                     | n_shared_experts                                    |
| expert_feed_forward_length              | moe_intermediate_size                               |
| expert_weights_norm / expert_weights_scale | norm_topk_prob / routed_scaling_factor           |
| expert_gating_func                      | 1 softmax, 2 sigmoid (scoring_func)                 |
| leading_dense_block_count               | first_k_dense_replace (their width: feed_forward_length) |
| rope.scaling.type / factor / original_context_length | YaRN                                   |
| rope.scaling.yarn_log_multiplier        | 0.1 x mscale_all_dim                                |
| attention.temperature_scale / temperature_length | llama_4_scaling's beta / original length   |

Tensors (row-major shapes; GGUF lists them reversed): blk.N.attn_q_a, attn_q_a_norm, attn_q_b (or attn_q
without q_lora_rank), attn_kv_a_mqa, attn_kv_a_norm, attn_output as the native rows (llama.cpp splits q_b's
rows per head nope first, then rope, and kv_a's latent first, then the rotary key, as mla.py does; NORM RoPE
rotates the interleaved pairs mla.py rotates, so nothing is permuted); kv_b_proj (H * (n + v), c) split per
head: attn_k_b (H, c, n) = its key rows transposed, attn_v_b (H, v, c) = its value rows (attn_kv_b is not
written: llama.cpp reads it only for files without the _mla lengths); the router ffn_gate_inp (E, dim), its
score-correction bias (sigmoid routing) exp_probs_b.bias; the experts stacked as ffn_{gate,up,down}_exps
(w1, w3, w2), the shared expert ffn_{gate,up,down}_shexp, the leading dense layers ffn_{gate,up,down}.

What llama.cpp cannot express is refused with the field that says so (:func:`check_mistral4`): its q_a / kv_a
norms use norm_eps where mla.py keeps 1e-6, its YaRN has fixed ramps (beta 32, alpha 1) and leaves cos / sin
unscaled only when mscale_all_dim says so, and it routes without expert groups.

Reading (load_gguf): the same keys and tensors back into ModelArgs and native tensors (mistral4_fields,
mistral4_index), and llama.cpp's own converter's files, whose experts come fused (ffn_gate_up_exps: gate rows, then
up rows) and which carry no attention.temperature_* keys (then no query scaling: what llama.cpp computes with
them).  head_dim reads as qk_nope + qk_rope.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import torch

from mistral_ref.checkpoint.dtypes import float32_decimal
from mistral_ref.checkpoint.errors import CheckpointError, listing
from mistral_ref.config import FineMoeArgs, Llama4Scaling, MlaArgs, ModelArgs, YarnArgs

ARCH = "mistral4"
MLA_NORM_EPS = 1e-6  # mla.py's q_a_layernorm / kv_a_layernorm eps (HF's RMSNorm default)

_GLOBAL = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
_LAYER = {  # native (after layers.N.) -> blk.N.<gguf>
    "attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "attention.q_proj.weight": "attn_q.weight", "attention.q_a_proj.weight": "attn_q_a.weight",
    "attention.q_a_layernorm.weight": "attn_q_a_norm.weight", "attention.q_b_proj.weight": "attn_q_b.weight",
    "attention.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "attention.kv_a_layernorm.weight": "attn_kv_a_norm.weight", "attention.wo.weight": "attn_output.weight",
    "feed_forward.gate.weight": "ffn_gate_inp.weight",
    "feed_forward.gate.e_score_correction_bias": "exp_probs_b.bias",
    "feed_forward.shared_experts.w1.weight": "ffn_gate_shexp.weight",
    "feed_forward.shared_experts.w3.weight": "ffn_up_shexp.weight",
    "feed_forward.shared_experts.w2.weight": "ffn_down_shexp.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w3.weight": "ffn_up.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
}
_EXPERTS = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
# stacks read: each expert's tensors in it, along its rows (llama.cpp's converter fuses gate and up)
_STACKS = {**{g: (w,) for w, g in _EXPERTS.items()}, "ffn_gate_up_exps.weight": ("w1", "w3")}
_NATIVE = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])\.weight")

#: A tensor to write: its GGUF name, its row-major shape and how to make it from the model's state dict.
Planned = tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]


def check_mistral4(args: ModelArgs, path: object) -> None:
    """Raise CheckpointError (naming `path` and the field) where llama.cpp's mistral4 would compute another
    function than this model."""
    mla, moe, yarn = args.mla, args.fine_moe, args.yarn
    if mla is None or moe is None:
        raise CheckpointError(f"{path}: llama.cpp's mistral4 architecture is latent attention with fine-grained "
                              "experts (ModelArgs.mla and .fine_moe); this model has "
                              f"{'no latent attention' if mla is None else 'no fine-grained experts'}")
    if abs(args.norm_eps - MLA_NORM_EPS) > 1e-12:
        raise CheckpointError(f"{path}: norm_eps is {args.norm_eps}; llama.cpp normalises q_a and kv_a with it, "
                              f"where this model (HF mistral4) uses {MLA_NORM_EPS}")
    if moe.n_group > 1 and moe.topk_group < moe.n_group:
        raise CheckpointError(f"{path}: fine_moe routes within {moe.topk_group} of {moe.n_group} expert groups; "
                              "llama.cpp's mistral4 routes over all experts")
    if yarn is not None:
        if (yarn.beta, yarn.alpha) != (32.0, 1.0):
            raise CheckpointError(f"{path}: yarn beta / alpha are {yarn.beta} / {yarn.alpha}; llama.cpp's mistral4 "
                                  "reads no ramp and uses 32 / 1")
        # llama.cpp scales cos / sin by mscale(1) / mscale(mscale_all_dim) (its mscale is 1 for mistral4) and the
        # softmax by mscale(mscale_all_dim) ** 2: this model's scale when cos / sin stay unscaled, which its YaRN
        # does where apply_scale is off and no attention_factor is given, and mscale_all_dim is 1
        if yarn.attention_factor is not None or yarn.apply_scale or mla.mscale_all_dim != 1.0:
            raise CheckpointError(
                f"{path}: yarn (apply_scale {yarn.apply_scale}, attention_factor {yarn.attention_factor}) with "
                f"mla.mscale_all_dim {mla.mscale_all_dim}: llama.cpp's mistral4 leaves cos / sin unscaled and "
                "scales the softmax by mscale_all_dim's factor, which equals this model only for apply_scale off, "
                "no attention_factor and mscale_all_dim 1 (Mistral Small 4's)")
    if mla.q_lora_rank is not None and args.n_layers in (26, 27):
        raise CheckpointError(f"{path}: {args.n_layers} layers with q_lora_rank {mla.q_lora_rank}: llama.cpp takes a "
                              "26- or 27-layer DeepSeek-V2 model for the Lite one and skips q_lora_rank")


def mistral4_metadata(args: ModelArgs) -> tuple[dict[str, int], dict[str, float], dict[str, str | bool]]:
    """The mistral4.* keys (without the prefix): uint32 values, float32 values, and the others (string, bool)."""
    mla, moe, yarn = args.mla, args.fine_moe, args.yarn
    assert mla is not None and moe is not None
    ints = {"context_length": args.max_seq_len or 32768, "embedding_length": args.dim,
            "block_count": args.n_layers, "feed_forward_length": args.hidden_dim,
            "attention.head_count": args.n_heads, "attention.head_count_kv": 1,
            "attention.key_length": mla.kv_lora_rank + mla.qk_rope_head_dim,
            "attention.value_length": mla.kv_lora_rank, "attention.key_length_mla": mla.qk_head_dim,
            "attention.value_length_mla": mla.v_head_dim, "attention.kv_lora_rank": mla.kv_lora_rank,
            "rope.dimension_count": mla.qk_rope_head_dim, "leading_dense_block_count": moe.first_k_dense_replace,
            "expert_count": moe.num_experts, "expert_used_count": moe.num_experts_per_tok,
            "expert_shared_count": moe.n_shared_experts, "expert_feed_forward_length": moe.moe_intermediate_size,
            "expert_gating_func": 1 if moe.scoring_func == "softmax" else 2, "vocab_size": args.vocab_size}
    ints["attention.q_lora_rank"] = mla.q_lora_rank or 0  # 0: queries by attn_q (llama.cpp requires the key)
    floats = {"attention.layer_norm_rms_epsilon": args.norm_eps, "rope.freq_base": args.rope_theta,
              "expert_weights_scale": moe.routed_scaling_factor}
    others: dict[str, str | bool] = {"expert_weights_norm": bool(moe.norm_topk_prob)}
    if yarn is not None:
        others["rope.scaling.type"] = "yarn"
        floats["rope.scaling.factor"] = yarn.factor
        ints["rope.scaling.original_context_length"] = yarn.original_max_position_embeddings
        floats["rope.scaling.yarn_log_multiplier"] = 0.1 * mla.mscale_all_dim
    if args.llama_4_scaling is not None:
        floats["attention.temperature_scale"] = args.llama_4_scaling.beta
        ints["attention.temperature_length"] = args.llama_4_scaling.original_max_position_embeddings
    return ints, floats, others


def mistral4_plan(state: dict[str, torch.Tensor], args: ModelArgs) -> list[Planned]:
    """Every tensor of the file, in llama.cpp's order of layers: (name, row-major shape, producer)."""
    mla = args.mla
    assert mla is not None
    H, n, v, c = args.n_heads, mla.qk_nope_head_dim, mla.v_head_dim, mla.kv_lora_rank
    plan: list[Planned] = []
    experts: dict[tuple[int, str], dict[int, str]] = {}
    for name in state:
        if name in _GLOBAL:
            plan.append((_GLOBAL[name], tuple(state[name].shape), lambda name=name: state[name]))
            continue
        m = _NATIVE.fullmatch(name)
        rest = m[2] if m else ""
        e = _EXPERT.fullmatch(rest)
        if m and e:
            experts.setdefault((int(m[1]), e[2]), {})[int(e[1])] = name
        elif m and rest == "attention.kv_b_proj.weight":  # per head (H, n + v, c): key rows, then value rows
            plan.append((f"blk.{m[1]}.attn_k_b.weight", (H, c, n),
                         lambda name=name: state[name].reshape(H, n + v, c)[:, :n].transpose(1, 2)))
            plan.append((f"blk.{m[1]}.attn_v_b.weight", (H, v, c),
                         lambda name=name: state[name].reshape(H, n + v, c)[:, n:]))
        elif m and rest in _LAYER:
            plan.append((f"blk.{m[1]}.{_LAYER[rest]}", tuple(state[name].shape), lambda name=name: state[name]))
        else:
            raise CheckpointError(f"no mistral4 GGUF name for tensor {name!r}")
    for (layer, w), by_index in experts.items():
        names = [by_index[i] for i in sorted(by_index)]
        plan.append((f"blk.{layer}.{_EXPERTS[w]}", (len(names), *state[names[0]].shape),
                     lambda names=names: torch.stack([state[k] for k in names])))

    def order(item: Planned) -> tuple[int, str]:
        m = re.match(r"blk\.(\d+)\.", item[0])
        return (int(m[1]) if m else -1, item[0])

    return sorted(plan, key=order)


# ---- reading ----------------------------------------------------------------------------------------------------
def mistral4_fields(get: Callable[..., Any], path: object) -> dict[str, Any]:
    """The ModelArgs fields particular to a "mistral4" file (get(key, default) reads mistral4.<key>): head
    sizes, latent attention, experts, YaRN and the query scaling, as llama.cpp computes with them.  Raises
    CheckpointError naming the key for what this model cannot compute."""
    n_heads, kv_lora, rope = int(get("attention.head_count")), int(get("attention.kv_lora_rank")), \
        int(get("rope.dimension_count"))
    qk, v = int(get("attention.key_length_mla", 0)), int(get("attention.value_length_mla", 0))
    if not qk or not v:
        raise CheckpointError(f"{path}: {ARCH}.attention.key_length_mla / value_length_mla are missing: a file "
                              "that keeps kv_b whole (llama.cpp's older DeepSeek layout), which is not read here")
    for key, want in (("attention.head_count_kv", 1), ("attention.key_length", kv_lora + rope),
                      ("attention.value_length", kv_lora)):
        if int(get(key, want)) != want:
            raise CheckpointError(f"{path}: {ARCH}.{key} is {get(key)}, expected {want} (latent attention's cache: "
                                  "one head of the latent and the rotary key)")
    gating = int(get("expert_gating_func", 1))
    if gating not in (1, 2):
        raise CheckpointError(f"{path}: {ARCH}.expert_gating_func is {gating}: softmax (1) or sigmoid (2) routing")
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "yarn"):
        raise CheckpointError(f"{path}: {ARCH}.rope.scaling.type is {scaling!r}: only YaRN is read")
    log_mul = float(get("rope.scaling.yarn_log_multiplier", 0.0))
    yarn = YarnArgs(factor=float32_decimal(get("rope.scaling.factor")),
                    original_max_position_embeddings=int(get("rope.scaling.original_context_length")),
                    apply_scale=False) if scaling == "yarn" else None
    temperature = float(get("attention.temperature_scale", 0.0))
    scale = float(get("expert_weights_scale", 0.0))
    q_lora = int(get("attention.q_lora_rank", 0))
    return dict(
        n_kv_heads=n_heads, head_dim=qk, hidden_dim=int(get("feed_forward_length")),
        mla=MlaArgs(kv_lora_rank=kv_lora, qk_nope_head_dim=qk - rope, qk_rope_head_dim=rope, v_head_dim=v,
                    q_lora_rank=q_lora or None, mscale_all_dim=float32_decimal(log_mul / 0.1)),
        fine_moe=FineMoeArgs(
            num_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
            moe_intermediate_size=int(get("expert_feed_forward_length")),
            n_shared_experts=int(get("expert_shared_count")),
            first_k_dense_replace=int(get("leading_dense_block_count", 0)),
            norm_topk_prob=bool(get("expert_weights_norm", False)),
            routed_scaling_factor=float32_decimal(scale) if scale else 1.0,
            scoring_func="softmax" if gating == 1 else "sigmoid"),
        yarn=yarn,
        llama_4_scaling=Llama4Scaling(int(get("attention.temperature_length")), float32_decimal(temperature))
        if temperature else None)


#: where one native tensor comes from: the file's tensors (each with an expert index into a stack, or None) and
#: how to make the native tensor of them once read (from one tensor: it, or a slice of its rows, which applies to a
#: quantized tensor's rows of blocks too: gguf.py's quantize=)
Source = tuple[list[tuple[Any, int | None]], Callable[[list[torch.Tensor]], torch.Tensor]]


def mistral4_index(tensors: list[Any], args: ModelArgs, expected: dict[str, tuple[int, ...]], path: object,
                   strict: bool = True) -> dict[str, Source]:
    """{native name: Source} for every tensor of Transformer(args) in a "mistral4" file, after checking names
    and shapes: the inverse of mistral4_plan, and llama.cpp's converter's fused experts (ffn_gate_up_exps, gate
    rows first).  Raises CheckpointError naming the file and tensor."""
    mla, moe = args.mla, args.fine_moe
    assert mla is not None and moe is not None
    H, n, v, c = args.n_heads, mla.qk_nope_head_dim, mla.v_head_dim, mla.kv_lora_rank
    E = moe.num_experts
    native_of = {g: k for k, g in _GLOBAL.items()}
    layer_of = {g: k for k, g in _LAYER.items()}
    by_name = {t.name: t for t in tensors}
    index: dict[str, Source] = {}
    problems, unexpected = [], []

    def shape(t: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(t.shape.tolist()))

    def take(native: str, t: Any, want: tuple[int, ...], parts: list[tuple[Any, int | None]],
             combine: Callable[[list[torch.Tensor]], torch.Tensor]) -> None:
        if shape(t) != want:
            problems.append(f"{path}: tensor {t.name!r} has shape {list(shape(t))}, expected {list(want)} from "
                            "the metadata")
        else:
            index[native] = (parts, combine)

    def first(ts: list[torch.Tensor]) -> torch.Tensor:
        return ts[0]

    for t in tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", t.name)
        layer, part = (int(m[1]), m[2]) if m else (-1, "")
        if t.name in native_of:
            native = native_of[t.name]
            if native in expected:
                take(native, t, expected[native], [(t, None)], first)
                continue
        elif part in layer_of and f"layers.{layer}.{layer_of[part]}" in expected:
            native = f"layers.{layer}.{layer_of[part]}"
            take(native, t, expected[native], [(t, None)], first)
            continue
        elif part == "attn_k_b.weight" and f"layers.{layer}.attention.kv_b_proj.weight" in expected:
            v_b = by_name.get(f"blk.{layer}.attn_v_b.weight")
            if v_b is None:
                problems.append(f"{path}: tensor 'blk.{layer}.attn_k_b.weight' without its attn_v_b")
            elif shape(v_b) != (H, v, c):
                problems.append(f"{path}: tensor {v_b.name!r} has shape {list(shape(v_b))}, expected {[H, v, c]}")
            else:
                take(f"layers.{layer}.attention.kv_b_proj.weight", t, (H, c, n), [(t, None), (v_b, None)],
                     lambda ts: torch.cat([ts[0].transpose(1, 2), ts[1]], dim=1).reshape(H * (n + v), c))
            continue
        elif part == "attn_v_b.weight" and f"layers.{layer}.attention.kv_b_proj.weight" in expected:
            continue  # with its attn_k_b
        elif part in _STACKS and f"layers.{layer}.feed_forward.experts.0.w1.weight" in expected:
            ws = _STACKS[part]  # the experts' tensors this stack holds, one after the other along the rows
            rows, cols = expected[f"layers.{layer}.feed_forward.experts.0.{ws[0]}.weight"]
            want = (E, len(ws) * rows, cols)
            if shape(t) != want:
                problems.append(f"{path}: tensor {t.name!r} has shape {list(shape(t))}, expected {list(want)} "
                                "(experts x rows x columns) from the metadata")
                continue
            for e in range(E):
                for i, w in enumerate(ws):
                    index[f"layers.{layer}.feed_forward.experts.{e}.{w}.weight"] = (
                        [(t, e)], lambda ts, i=i, rows=rows: ts[0][i * rows:(i + 1) * rows])
            continue
        unexpected.append(t.name)
    if "output.weight" not in index and "tok_embeddings.weight" in index:
        index["output.weight"] = index["tok_embeddings.weight"]  # tied, as llama.cpp falls back
    missing = [k for k in expected if k not in index]
    if missing:
        problems.insert(0, f"{path}: missing {len(missing)} tensor(s) that the metadata describes (native names): "
                           f"{listing(missing)}")
    if unexpected:
        message = f"{path}: {len(unexpected)} tensor(s) that this {ARCH} model does not have: {listing(unexpected)}"
        if strict:
            problems.append(message)
        else:
            logging.getLogger(__name__).warning("%s (ignored: strict=False)", message)
    if problems:
        raise CheckpointError("\n".join(problems))
    return index
