"""Checkpoint I/O: native (params.json + consolidated*.safetensors) and Hugging Face (config.json + model*.safetensors).

The two formats differ in three ways only: tensor names (a fixed map, below), the config file, and the row order of
the query and key projections — native checkpoints rotate interleaved pairs, HF checkpoints rotate halves, so HF's
q_proj / k_proj rows are a permutation of wq / wk (:func:`permute_to_hf`, :func:`permute_to_native`).
"""

from __future__ import annotations

import re

import torch

from mistral_ref.config import ModelArgs

# ---- names -----------------------------------------------------------------------------------------------------
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
_EXPERT = re.compile(r"feed_forward\.experts\.(\d+)\.(w[123])\.weight")
_HF_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
_NATIVE_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_TO_NATIVE_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TO_NATIVE_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}


def native_to_hf_name(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight' (KeyError if unknown)."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _NATIVE_LAYER.fullmatch(name)
    if m:
        layer, rest = m.groups()
        if rest in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[rest]}"
        e = _EXPERT.fullmatch(rest)
        if e:
            return f"model.layers.{layer}.block_sparse_moe.experts.{e[1]}.{e[2]}.weight"
    raise KeyError(f"no Hugging Face name for native tensor {name!r}")


def hf_to_native_name(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight' (KeyError if unknown)."""
    if name in _HF_TO_NATIVE_GLOBAL:
        return _HF_TO_NATIVE_GLOBAL[name]
    m = _HF_LAYER.fullmatch(name)
    if m:
        layer, rest = m.groups()
        if rest in _HF_TO_NATIVE_LAYER:
            return f"layers.{layer}.{_HF_TO_NATIVE_LAYER[rest]}"
        e = _HF_EXPERT.fullmatch(rest)
        if e:
            return f"layers.{layer}.feed_forward.experts.{e[1]}.{e[2]}.weight"
    raise KeyError(f"no native name for Hugging Face tensor {name!r}")


# ---- the q/k permutation ---------------------------------------------------------------------------------------
def permute_to_hf(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Native wq/wk rows (interleaved pairs per head) -> HF q_proj/k_proj rows (halves per head).

    w: (n_heads * head_dim, dim).  Within each head, output feature 2i+j moves to j*head_dim/2 + i.
    n_heads is n_kv_heads for wk; head_dim is the real head width (NOT dim // n_heads: Nemo differs).
    """
    dim = w.shape[1]
    return w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def permute_to_native(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`permute_to_hf`.  w: (n_heads * head_dim, dim)."""
    dim = w.shape[1]
    return w.view(n_heads, 2, head_dim // 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)


def to_hf_tensor(name: str, w: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One native tensor -> (HF name, HF tensor)."""
    if name.endswith("attention.wq.weight"):
        w = permute_to_hf(w, args.n_heads, args.head_dim)
    elif name.endswith("attention.wk.weight"):
        w = permute_to_hf(w, args.n_kv_heads, args.head_dim)
    return native_to_hf_name(name), w


def to_native_tensor(name: str, w: torch.Tensor, args: ModelArgs) -> tuple[str, torch.Tensor]:
    """One HF tensor -> (native name, native tensor)."""
    native = hf_to_native_name(name)
    if native.endswith("attention.wq.weight"):
        w = permute_to_native(w, args.n_heads, args.head_dim)
    elif native.endswith("attention.wk.weight"):
        w = permute_to_native(w, args.n_kv_heads, args.head_dim)
    return native, w
