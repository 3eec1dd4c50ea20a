"""Native <-> Hugging Face: the tensor names and the q/k row order.  Read this file to learn the conversion.

The two formats hold the same numbers.  They differ in three ways only:

1. tensor names: a fixed map (below), e.g. layers.3.attention.wq.weight <-> model.layers.3.self_attn.q_proj.weight.
   Our parameters carry the native names, except in latent attention and fine-grained experts (Mistral Small 4,
   Large 3), whose modules keep HF's names and whose native files use Mistral's (:func:`to_mistral_name`);
2. the config file: params.json vs config.json (config.py reads both into one ModelArgs);
3. the row order of the query and key projections.  RoPE rotates pairs of features inside every head.  Native
   checkpoints pair neighbours (features 2i and 2i+1, "interleaved"); Hugging Face pairs the two halves of the
   head (features i and i + head_dim/2).  So HF's q_proj / k_proj rows are wq / wk's rows reordered head by head
   (:func:`permute_qk`).  wv is not rotated and every other tensor is identical in both formats.
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from mistral_ref.config import ModelArgs

# ---- names -------------------------------------------------------------------------------------------------
_GLOBAL_NAMES = {  # native -> HF
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {  # native suffix of layers.N. -> HF suffix of model.layers.N.
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.gate.weight": "block_sparse_moe.gate.weight",
}
# Latent attention and fine-grained experts (Mistral Small 4, Mistral Large 3): the modules carry HF mistral4 /
# deepseek_v3's own names, so the attention names map one to one; the routed experts are named per expert here.
# In files, transformers 5.23 writes DeepseekV3's experts per expert (the hub layout) but Mistral4's fused, one
# experts.gate_up_proj and one experts.down_proj per layer (hf_fuses_experts; checkpoint.save writes them so,
# checkpoint.files reads both).  Mistral's own consolidated files spell these tensors differently again: see
# "Mistral's native names" below.
# Their rotary rows need NO permutation in either format: both published configs say rope_interleave true, i.e.
# HF's rotary rows (the last qk_rope_head_dim rows of each q head, the last ones of kv_a_proj_with_mqa) are the
# interleaved pairs that rope.apply_rotary_emb uses, and Mistral's files hold the same rows (vLLM and sglang load
# them with is_neox_style=False rotary and no permutation).  rope_interleave false is refused by config.py.
_MLA_ATTENTION = ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
                  "kv_b_proj")  # o_proj is attention.wo, as in every Mistral model
_LATENT_LAYER_NAMES = {  # native suffix -> HF suffix, for models with args.mla / args.fine_moe
    **{f"attention.{n}.weight": f"self_attn.{n}.weight" for n in _MLA_ATTENTION},
    "feed_forward.gate.weight": "mlp.gate.weight",
    "feed_forward.gate.e_score_correction_bias": "mlp.gate.e_score_correction_bias",
    "feed_forward.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "feed_forward.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "feed_forward.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
_FINE_EXPERT_HF = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_HF_FINE_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_HF_TO_NATIVE_LATENT = {v: k for k, v in _LATENT_LAYER_NAMES.items()}
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])\.weight")
_HF_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_NATIVE_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_TO_NATIVE_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TO_NATIVE_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}


# ---- Mistral's native names for latent attention + fine-grained experts --------------------------------------
# Our model's parameters keep HF's names for these layers (mla.py, fine_moe.py); Mistral's consolidated*.safetensors
# of Mistral Small 4 / Mistral Large 3 name them as below.  Sources: vLLM's MistralLarge3ForCausalLM weight mapping
# (it loads both models from params.json), transformers' convert_mistral4_weight_to_hf.py (the same names), and
# sglang's copy of vLLM's mapping, which adds attention.wq for q_proj (no query compression) and router_biases for
# a sigmoid router's correction bias (neither published model has them).  None of the three permutes any row of
# these tensors.  Per layer N, our suffix of layers.N. -> Mistral's suffix of layers.N.:
_MISTRAL_MLA_NAMES = {  # with args.mla
    "attention.q_proj.weight": "attention.wq.weight",  # no query compression (q_lora_rank None)
    "attention.q_a_proj.weight": "attention.wq_a.weight",
    "attention.q_a_layernorm.weight": "attention.q_a_norm.weight",
    "attention.q_b_proj.weight": "attention.wq_b.weight",
    "attention.kv_a_proj_with_mqa.weight": "attention.wkv_a_with_mqa.weight",
    "attention.kv_a_layernorm.weight": "attention.kv_a_norm.weight",
    "attention.kv_b_proj.weight": "attention.wkv_b.weight",
}
_MISTRAL_FINE_MOE_NAMES = {  # with args.fine_moe: the experts sit directly under layers.N., not feed_forward
    "feed_forward.gate.weight": "gate.weight",
    "feed_forward.gate.e_score_correction_bias": "router_biases",
    **{f"feed_forward.shared_experts.{w}.weight": f"shared_experts.{w}.weight" for w in ("w1", "w2", "w3")},
}  # and feed_forward.experts.E.wK -> experts.E.wK.  Unchanged: attention.wo, attention_norm, ffn_norm, the dense
#    layers' feed_forward.w1/w2/w3, and the global tensors.
_MISTRAL_EXPERT = re.compile(r"experts\.(\d+)\.(w[123])\.weight")


def _mistral_names(args: ModelArgs) -> dict[str, str]:
    """Our suffix of layers.N. -> Mistral's, for the latent parts `args` has."""
    return {**(_MISTRAL_MLA_NAMES if args.mla is not None else {}),
            **(_MISTRAL_FINE_MOE_NAMES if args.fine_moe is not None else {})}


_QUANTIZED_SUFFIX = re.compile(r"(.*\.weight)(\.qweight|\.scales|\.scales_and_zeros)")


def _split_quantized(name: str) -> tuple[str, str]:
    """'x.weight.qweight' -> ('x.weight', '.qweight'); other names -> (name, '')."""
    m = _QUANTIZED_SUFFIX.fullmatch(name)
    return (m[1], m[2]) if m else (name, "")


def to_mistral_name(name: str, args: ModelArgs) -> str:
    """Our parameter name -> its name in Mistral's native files (the same except for latent attention and
    fine-grained experts): 'layers.3.attention.kv_b_proj.weight' -> 'layers.3.attention.wkv_b.weight',
    'layers.3.feed_forward.experts.5.w1.weight' -> 'layers.3.experts.5.w1.weight'."""
    base, suffix = _split_quantized(name)
    if suffix:  # a quantized weight's codes / scales (quantize.py) follow their weight's name
        return to_mistral_name(base, args) + suffix
    m = _NATIVE_LAYER.fullmatch(name)
    if m is None:
        return name
    layer, rest = m.groups()
    names = _mistral_names(args)
    if rest in names:
        return f"layers.{layer}.{names[rest]}"
    if args.fine_moe is not None and _EXPERT.fullmatch(rest):
        return f"layers.{layer}.{rest.removeprefix('feed_forward.')}"
    return name


def from_mistral_name(key: str, args: ModelArgs) -> str:
    """Inverse of :func:`to_mistral_name`: a tensor name of a native file -> our parameter name.

    Names that are not Mistral's spelling come back unchanged: that includes the HF-style names
    (layers.N.attention.q_a_proj.weight, layers.N.feed_forward.experts.E.w1.weight) that mistral-ref's
    save_checkpoint wrote for these models before it wrote Mistral's, so such files keep loading."""
    base, suffix = _split_quantized(key)
    if suffix:
        return from_mistral_name(base, args) + suffix
    m = _NATIVE_LAYER.fullmatch(key)
    if m is None:
        return key
    layer, rest = m.groups()
    ours = {v: k for k, v in _mistral_names(args).items()}
    if rest in ours:
        return f"layers.{layer}.{ours[rest]}"
    if args.fine_moe is not None and _MISTRAL_EXPERT.fullmatch(rest):
        return f"layers.{layer}.feed_forward.{rest}"
    return key


# ---- FP8 checkpoints: recognised and refused ---------------------------------------------------------------
# Mistral's FP8 releases (params.json "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR" or
# "NO_SCALES"}) store each quantized weight `<module>.weight` as float8_e4m3fn next to a per-tensor scale
# `<module>.qscale_weight` (bf16 weight = fp8 weight x qscale_weight; HF calls it weight_scale_inv, vLLM
# weight_scale) and, with static activation scales ("TENSOR"), `<module>.qscale_act` (HF activation_scale, vLLM
# input_scale); vLLM also maps `attention.{q,k,v}_fake_quantizer.qscale_act` (fp8 attention scales).  HF FP8 files
# carry `weight_scale_inv`.  None of this is dequantized here: checkpoint.files refuses such files by name.
_FP8_NAME = re.compile(r".*(\.qscale_weight|\.qscale_act|\.weight_scale_inv|_fake_quantizer\..*)")


def is_fp8_scale(name: str) -> bool:
    """True for a tensor that only FP8-quantized checkpoints carry (a weight or activation scale)."""
    return _FP8_NAME.fullmatch(name) is not None


def hf_fuses_experts(args: ModelArgs) -> bool:
    """True where transformers 5.23 saves a layer's routed experts as two fused tensors (Mistral4ForCausalLM: the
    softmax-routed fine-grained models, config model_type "mistral4"), so HF files we write do the same:
      model.layers.L.mlp.experts.gate_up_proj (E, 2 * hidden, dim) = per expert [w1 rows; w3 rows]
      model.layers.L.mlp.experts.down_proj    (E, dim, hidden)     = per expert w2
    DeepseekV3ForCausalLM (sigmoid routing) and Mixtral save one tensor per expert."""
    return args.fine_moe is not None and args.fine_moe.scoring_func == "softmax"


def native_to_hf_name(name: str, args: ModelArgs | None = None) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight' (KeyError if unknown).

    args: needed only for fine-grained experts (args.fine_moe), whose router is mlp.gate where Mixtral's is
    block_sparse_moe.gate."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _NATIVE_LAYER.fullmatch(name)
    if m:
        layer, rest = m.groups()
        latent = args is not None and (args.fine_moe is not None or args.mla is not None)
        if latent and rest in _LATENT_LAYER_NAMES:
            return f"model.layers.{layer}.{_LATENT_LAYER_NAMES[rest]}"
        e = _EXPERT.fullmatch(rest)
        if e and args is not None and args.fine_moe is not None:
            return f"model.layers.{layer}.mlp.experts.{e[1]}.{_FINE_EXPERT_HF[e[2]]}.weight"
        if rest in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
        e = _EXPERT.fullmatch(rest)
        if e:
            return f"model.layers.{layer}.block_sparse_moe.experts.{e[1]}.{e[2]}.weight"
    raise KeyError(f"no Hugging Face name for native tensor {name!r}")


def hf_to_native_name(name: str, args: ModelArgs | None = None) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight' (KeyError if unknown).

    args: needed only for latent attention without query compression (args.mla with q_lora_rank None), whose
    q_proj is attention.q_proj (its rows are not permuted as wq's are)."""
    if name in _HF_TO_NATIVE_GLOBAL:
        return _HF_TO_NATIVE_GLOBAL[name]
    m = _HF_LAYER.fullmatch(name)
    if m:
        layer, rest = m.groups()
        if args is not None and args.mla is not None and rest == "self_attn.q_proj.weight":
            return f"layers.{layer}.attention.q_proj.weight"
        if rest in _HF_TO_NATIVE_LAYER:
            return f"layers.{layer}.{_HF_TO_NATIVE_LAYER[rest]}"
        if rest in _HF_TO_NATIVE_LATENT:
            return f"layers.{layer}.{_HF_TO_NATIVE_LATENT[rest]}"
        e = _HF_FINE_EXPERT.fullmatch(rest)
        if e:
            w = {v: k for k, v in _FINE_EXPERT_HF.items()}[e[2]]
            return f"layers.{layer}.feed_forward.experts.{e[1]}.{w}.weight"
        e = _HF_EXPERT.fullmatch(rest)
        if e:
            return f"layers.{layer}.feed_forward.experts.{e[1]}.{e[2]}.weight"
    raise KeyError(f"no native name for Hugging Face tensor {name!r}")


# ---- multimodal checkpoints: the language model's tensors and the vision tower's --------------------------------
# Mistral Small 3.1+, Ministral 3, Devstral Small 2 ship a Pixtral vision tower: natively as vision_encoder.*,
# vision_language_adapter.*, patch_merger.*, pre_mm_projector_norm.*; in HF files (Mistral3ForConditionalGeneration)
# as vision_tower.* and multi_modal_projector.*, with the language model under language_model.model.* /
# language_model.lm_head.* (hub files) or model.language_model.* (transformers 5).  Only the language model loads.
_VISION = re.compile(r"(model\.)?(vision_tower|multi_modal_projector)\..+"
                     r"|(vision_encoder|vision_language_adapter|patch_merger|pre_mm_projector_norm)\..+")
_HF_LANGUAGE_MODEL_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                               ("model.language_model.", "model."))


def is_vision_tensor(name: str) -> bool:
    """True for a tensor of a multimodal checkpoint's vision tower or projector (either format)."""
    return _VISION.fullmatch(name) is not None


def language_model_name(hf_name: str) -> str:
    """The text model's HF name of a tensor of an HF multimodal checkpoint; other names are returned unchanged.

    'language_model.model.layers.0.mlp.up_proj.weight' and 'model.language_model.layers.0.mlp.up_proj.weight'
    -> 'model.layers.0.mlp.up_proj.weight'; 'language_model.lm_head.weight' -> 'lm_head.weight'.
    """
    for prefix, replacement in _HF_LANGUAGE_MODEL_PREFIXES:
        if hf_name.startswith(prefix):
            return replacement + hf_name[len(prefix):]
    return hf_name


def natural_key(name: str) -> list[int | str]:
    """Sort key that puts layers.2 before layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---- the q/k row order -------------------------------------------------------------------------------------
def is_qk(native_name: str) -> bool:
    """True for wq and wk: the two tensors whose rows the formats order differently."""
    return native_name.endswith(("attention.wq.weight", "attention.wk.weight"))


def permute_qk(w: torch.Tensor, head_dim: int, to: Literal["hf", "native"],
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Reorder the rows of a query or key projection, head by head, into the other format's RoPE layout.

    w: (n_heads * head_dim, dim), whole heads (n_heads is n_kv_heads for wk; head_dim is the real head width,
    NOT dim // n_heads: Nemo differs).  Inside one head, feature (pair i, component j) lives at

        native row 2i + j              (head_dim = 8: rows hold pairs 0 0 1 1 2 2 3 3)
        HF     row j * head_dim/2 + i  (head_dim = 8: rows hold pairs 0 1 2 3 0 1 2 3)

    to="hf" reorders native rows into HF order, to="native" the reverse.  Returns a new tensor, or writes the
    result (cast to out's dtype) into `out`, a (n_heads * head_dim, dim) tensor, and returns it.
    This is the one place the q/k order changes: loading, saving and converting all call it.
    """
    half, dim = head_dim // 2, w.shape[1]
    pairs = (half, 2) if to == "hf" else (2, half)  # how w's rows split inside a head: (i, j) or (j, i)
    rows = w.view(-1, *pairs, dim).transpose(1, 2)  # (n_heads, *reversed(pairs), dim): the other order
    if out is None:
        return rows.reshape(w.shape)
    out.view(-1, *pairs[::-1], dim).copy_(rows)
    return out


def permute_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Native wq/wk rows (interleaved pairs per head) -> HF q_proj/k_proj rows (halves per head).

    w: (n_heads * head_dim, dim).  Within each head, output feature 2i+j moves to j*head_dim/2 + i.
    :func:`permute_qk` with to="hf".
    """
    _check_heads(w, n_heads, head_dim)
    return permute_qk(w, head_dim, "hf")


def permute_to_native(w: torch.Tensor, n_heads: int, head_dim: int, out: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Inverse of :func:`permute_to_hf`: :func:`permute_qk` with to="native".  w: (n_heads * head_dim, dim)."""
    _check_heads(w, n_heads, head_dim)
    return permute_qk(w, head_dim, "native", out)


def _check_heads(w: torch.Tensor, n_heads: int, head_dim: int) -> None:
    if w.shape[0] != n_heads * head_dim:
        raise ValueError(f"expected {n_heads} heads x {head_dim} = {n_heads * head_dim} rows, got {w.shape[0]}")


def to_hf_tensor(name: str, w: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One native tensor -> (HF name, HF tensor)."""
    return native_to_hf_name(name, args), permute_qk(w, args.head_dim, "hf") if is_qk(name) else w


def to_native_tensor(name: str, w: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One HF tensor -> (native name, native tensor)."""
    native = hf_to_native_name(name, args)
    return native, permute_qk(w, args.head_dim, "native") if is_qk(native) else w
