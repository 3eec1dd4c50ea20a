"""Model hyper-parameters: one dataclass named after params.json, and the parsing of both config formats.

`ModelArgs` uses the field names of the native ``params.json`` so a reader can map a checkpoint's file to code.
Hugging Face ``config.json`` files are translated into the same dataclass by :meth:`ModelArgs.from_hf_config`.
The published models (presets), their parameter counts and trained contexts live in :mod:`mistral_ref.family`.
This module imports neither torch nor the model.

The 2024-2026 models add three sections, spelled as their ``params.json`` spells them:
* ``sliding_window`` as a per-layer list (Ministral 8B: one full layer, then three with a 32k window);
  Hugging Face writes ``sliding_window`` + ``layer_types`` (model_type "ministral");
* ``yarn`` (:class:`YarnArgs`) and ``llama_4_scaling`` (:class:`Llama4Scaling`): the long-context rotary
  scaling and query scaling of Ministral 3 / Devstral Small 2; Hugging Face writes them into ``rope_parameters``
  (model_type "ministral3");
* ``tied_embeddings``: the output projection is the embedding matrix (Ministral 3 3B); HF ``tie_word_embeddings``.
* ``mla`` (:class:`MlaArgs`) and ``fine_moe`` (:class:`FineMoeArgs`): latent attention and shared + fine-grained
  experts (Mistral Small 4, Mistral Large 3).  Hugging Face writes them as top-level keys of model_type "mistral4"
  / "deepseek_v3"; in ``params.json`` they are this project's own sections with HF's key names (we found no
  published native file of these models to follow).
Multimodal configs (native ``vision_encoder``, HF "mistral3" with a ``text_config``) load their language model;
image inputs are not supported yet (a warning says so).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A params.json / config.json that cannot describe a Mistral-family model."""


@dataclass(frozen=True)
class MoeArgs:
    """Sparse mixture of experts: each token is sent to `num_experts_per_tok` of `num_experts` SwiGLU experts."""

    num_experts: int
    num_experts_per_tok: int


@dataclass(frozen=True)
class MlaArgs:
    """Multi-head latent attention (DeepSeek-V2/V3; Mistral Small 4, Mistral Large 3): mla.py has the math.

    Names as Hugging Face's mistral4 / deepseek_v3 configs spell them.  q_lora_rank: width of the compressed
    query (None: one q_proj instead of q_a_proj -> q_a_layernorm -> q_b_proj); kv_lora_rank: width of the
    compressed key-value latent (what the latent cache stores per token, with the qk_rope_head_dim rotary key);
    qk_nope_head_dim / qk_rope_head_dim: the un-rotated and rotated parts of each query and key head;
    v_head_dim: width of each value head; mscale_all_dim: YaRN's softmax-scale correction (HF
    rope_parameters.mscale_all_dim; 0 = none): with YaRN the scale qk_head_dim ** -0.5 is multiplied by
    (0.1 * mscale_all_dim * ln(factor) + 1) ** 2.
    """

    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    mscale_all_dim: float = 0.0

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank"):
            v = getattr(self, name)
            if name == "q_lora_rank" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"mla.{name} must be a positive integer, found {v!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"mla.qk_rope_head_dim must be even (rotary pairs), found {self.qk_rope_head_dim}")
        m = self.mscale_all_dim
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
            raise ConfigError(f"mla.mscale_all_dim must be a number >= 0, found {m!r}")
        object.__setattr__(self, "mscale_all_dim", float(m))

    @property
    def qk_head_dim(self) -> int:
        """Width of one query / key head: the un-rotated part then the rotated part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class FineMoeArgs:
    """Fine-grained experts (DeepSeek-MoE; Mistral Small 4, Mistral Large 3): fine_moe.FineMoeLayer has the math.

    Every token goes through `n_shared_experts` shared experts (one SwiGLU of width n_shared_experts x
    moe_intermediate_size) plus `num_experts_per_tok` of `num_experts` routed experts of width
    moe_intermediate_size.  scoring_func: "softmax" (mistral4) or "sigmoid" (deepseek_v3, with a learned
    e_score_correction_bias that steers the choice but not the weights); experts are split into n_group
    groups, only the topk_group groups with the best (top-2 sum) scores are eligible; norm_topk_prob: divide
    the chosen k scores by their sum; routed_scaling_factor multiplies the routed mix; the first
    first_k_dense_replace layers are dense SwiGLU of width hidden_dim.  HF names, HF n_routed_experts =
    num_experts.
    """

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    n_shared_experts: int = 1
    first_k_dense_replace: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "softmax"

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"fine_moe.{name} must be a positive integer, found {v!r}")
        for name in ("n_shared_experts", "first_k_dense_replace"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"fine_moe.{name} must be an integer >= 0, found {v!r}")
        if self.num_experts % self.n_group:
            raise ConfigError(f"fine_moe.n_group={self.n_group} must divide num_experts={self.num_experts}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"fine_moe.topk_group={self.topk_group} must be <= n_group={self.n_group}")
        if self.num_experts_per_tok > self.topk_group * (self.num_experts // self.n_group):
            raise ConfigError(f"fine_moe.num_experts_per_tok={self.num_experts_per_tok} exceeds the experts of "
                              f"the topk_group={self.topk_group} eligible groups")
        if self.scoring_func not in ("softmax", "sigmoid"):
            raise ConfigError(f"fine_moe.scoring_func must be 'softmax' or 'sigmoid', found {self.scoring_func!r}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ConfigError(f"fine_moe.norm_topk_prob must be true or false, found {self.norm_topk_prob!r}")
        r = self.routed_scaling_factor
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
            raise ConfigError(f"fine_moe.routed_scaling_factor must be a positive number, found {r!r}")
        object.__setattr__(self, "routed_scaling_factor", float(r))


@dataclass(frozen=True)
class YarnArgs:
    """YaRN rotary scaling (Peng et al. 2023): a context `factor` times longer than the one trained with RoPE.

    Field names are the native ``params.json`` ``"yarn"`` section's; Hugging Face's ``rope_parameters`` names are
    in brackets.  factor [factor]: how much longer the context becomes; original_max_position_embeddings [same]:
    the context RoPE was trained with; beta [beta_fast] and alpha [beta_slow]: rotations within the original
    context above which a pair keeps its trained frequency (beta) and below which it is slowed down `factor`
    times (alpha), with a linear ramp between; apply_scale: multiply cos and sin by 0.1 * ln(factor) + 1
    (HF: mscale 1 and mscale_all_dim 0) or leave them alone (HF: mscale = mscale_all_dim = 1; Ministral 3);
    attention_factor [attention_factor]: an explicit cos/sin factor for HF configs that set another one
    (``params.json`` cannot express it).  rope.yarn_frequencies is the math.
    """

    factor: float
    original_max_position_embeddings: int
    beta: float = 32.0
    alpha: float = 1.0
    apply_scale: bool = True
    attention_factor: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("factor", "beta", "alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"yarn.{name} must be a positive number, found {v!r}")
            set_(self, name, float(v))
        if self.factor < 1:
            raise ConfigError(f"yarn.factor must be >= 1 (a longer context), found {self.factor}")
        original = self.original_max_position_embeddings
        if isinstance(original, float) and original.is_integer():
            set_(self, "original_max_position_embeddings", original := int(original))
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise ConfigError(f"yarn.original_max_position_embeddings must be a positive integer, found {original!r}")
        if self.beta <= self.alpha:
            raise ConfigError(f"yarn.beta (beta_fast) = {self.beta} must be greater than yarn.alpha (beta_slow) = "
                              f"{self.alpha}: pairs above beta rotations keep their frequency, below alpha they scale")
        if not isinstance(self.apply_scale, bool):
            raise ConfigError(f"yarn.apply_scale must be true or false, found {self.apply_scale!r}")
        af = self.attention_factor
        if af is not None:
            if isinstance(af, bool) or not isinstance(af, (int, float)) or not math.isfinite(af) or af <= 0:
                raise ConfigError(f"yarn.attention_factor must be a positive number or absent, found {af!r}")
            set_(self, "attention_factor", float(af))

    @property
    def attention_scaling(self) -> float:
        """The factor cos and sin are multiplied by (so q.k by its square): attention_factor if given, else
        0.1 * ln(factor) + 1 with apply_scale, else 1."""
        if self.attention_factor is not None:
            return self.attention_factor
        return default_yarn_scaling(self.factor) if self.apply_scale else 1.0


def default_yarn_scaling(factor: float) -> float:
    """YaRN's magnitude correction for a context `factor` times longer: 0.1 * ln(factor) + 1 (1 for factor <= 1)."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


@dataclass(frozen=True)
class Llama4Scaling:
    """Llama-4-style query scaling (native ``"llama_4_scaling"``; HF ``rope_parameters.llama_4_scaling_beta``).

    A query at position p is multiplied by 1 + beta * ln(1 + floor(p / original_max_position_embeddings)): 1
    inside the original context, growing slowly beyond it (attention.llama4_query_scale).
    """

    original_max_position_embeddings: int
    beta: float

    def __post_init__(self) -> None:
        original, beta = self.original_max_position_embeddings, self.beta
        if isinstance(original, float) and original.is_integer():
            object.__setattr__(self, "original_max_position_embeddings", original := int(original))
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise ConfigError(f"llama_4_scaling.original_max_position_embeddings must be a positive integer, "
                              f"found {original!r}")
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ConfigError(f"llama_4_scaling.beta must be a positive number, found {beta!r}")
        object.__setattr__(self, "beta", float(beta))


def normalize_sliding_window(value: Any, where: str = "sliding_window") -> int | tuple[int | None, ...] | None:
    """Bring every spelling of a sliding window found in the wild to ``int | tuple | None``.

    Absent, ``null`` and ``0`` mean no window; ``"4096"`` is 4096; a list is a per-layer pattern that is applied
    cyclically (``[4096, None]`` alternates windowed and full layers).
    """
    if value is None or value is False:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        return tuple(normalize_sliding_window(v, f"{where}[{i}]") for i, v in enumerate(value))  # type: ignore[misc]
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(f"{where}: expected an integer number of keys, found the string {value!r}") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: expected an int, a list, null or 0, found {value!r}")
    if value < 0:
        raise ConfigError(f"{where}: a window must be >= 0 keys, found {value}")
    return value or None


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of one Mistral-family model (field names as in native ``params.json``).

    dim: model width; n_layers: transformer blocks; head_dim: width of one attention head (NOT always
    dim // n_heads: Nemo has dim 5120, 32 heads, head_dim 128); hidden_dim: SwiGLU inner width;
    n_heads / n_kv_heads: query and key-value heads (grouped-query attention when n_kv_heads < n_heads);
    norm_eps: RMSNorm epsilon; vocab_size: rows of the embedding; rope_theta: rotary base;
    sliding_window: keys each query sees (query p sees p-W+1 .. p) — int, None, or a per-layer tuple (None =
    a full layer) whose length divides n_layers and which repeats (Ministral 8B: (None, 32768, 32768, 32768));
    moe: MoeArgs for Mixtral, None for dense models; max_seq_len: the trained context (metadata only —
    caches are sized from the actual request, never from this); yarn: YaRN rotary scaling or None (plain RoPE);
    llama_4_scaling: the position-dependent query scaling or None; tied_embeddings: the output projection is
    tok_embeddings.weight (no separate output.weight); tokenizer: the tokenizer version a preset uses.
    """

    dim: int
    n_layers: int
    hidden_dim: int
    n_heads: int
    vocab_size: int
    head_dim: int | None = None
    n_kv_heads: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    sliding_window: int | tuple[int | None, ...] | None = None
    moe: MoeArgs | None = None
    max_seq_len: int | None = None
    yarn: YarnArgs | None = None
    llama_4_scaling: Llama4Scaling | None = None
    tied_embeddings: bool = False
    mla: MlaArgs | None = None
    fine_moe: FineMoeArgs | None = None
    tokenizer: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: normalise in place once
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ConfigError(f"head_dim is missing and dim={self.dim} is not divisible by n_heads={self.n_heads}")
            set_(self, "head_dim", self.dim // self.n_heads)
        if self.n_kv_heads is None:
            set_(self, "n_kv_heads", self.n_heads)
        set_(self, "sliding_window", normalize_sliding_window(self.sliding_window))
        for name, cls in (("moe", MoeArgs), ("yarn", YarnArgs), ("llama_4_scaling", Llama4Scaling),
                          ("mla", MlaArgs), ("fine_moe", FineMoeArgs)):
            if isinstance(getattr(self, name), dict):
                set_(self, name, _section(cls, name, getattr(self, name)))
        for name in ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size", "head_dim", "n_kv_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, found {v!r}")
        for name in ("norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive number, found {v!r}")
            set_(self, name, float(v))
        if self.max_seq_len is not None and (
                isinstance(self.max_seq_len, bool) or not isinstance(self.max_seq_len, int) or self.max_seq_len < 1):
            raise ConfigError(f"max_seq_len must be a positive integer or absent, found {self.max_seq_len!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} (grouped-query attention)"
            )
        if self.moe is not None and not 1 <= self.moe.num_experts_per_tok <= self.moe.num_experts:
            raise ConfigError(
                f"moe.num_experts_per_tok={self.moe.num_experts_per_tok} must be in "
                f"1..num_experts={self.moe.num_experts}"
            )
        window = self.sliding_window
        if isinstance(window, tuple) and self.n_layers % len(window):
            raise ConfigError(f"sliding_window: a per-layer pattern of {len(window)} windows {list(window)} must "
                              f"divide n_layers={self.n_layers} (it repeats over the layers)")
        if not isinstance(self.tied_embeddings, bool):
            raise ConfigError(f"tied_embeddings must be true or false, found {self.tied_embeddings!r}")
        if self.fine_moe is not None and self.moe is not None:
            raise ConfigError("moe (Mixtral experts) and fine_moe (shared + fine-grained experts) exclude each other")
        if self.mla is not None and (self.n_kv_heads != self.n_heads or isinstance(self.sliding_window, tuple)
                                     or self.sliding_window is not None):
            raise ConfigError("mla (latent attention) needs n_kv_heads == n_heads and no sliding window")

    # ---- derived views -------------------------------------------------------------------------------------
    def window_for_layer(self, layer_id: int) -> int | None:
        """The sliding window (in keys) of layer `layer_id`, or None for full causal attention."""
        w = self.sliding_window
        if isinstance(w, tuple):
            return w[layer_id % len(w)]
        return w

    @property
    def is_moe(self) -> bool:
        return self.moe is not None or self.fine_moe is not None

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of a head: head_dim, or mla.qk_rope_head_dim for latent attention."""
        return self.head_dim if self.mla is None else self.mla.qk_rope_head_dim

    def is_dense_layer(self, layer_id: int) -> bool:
        """True where layer `layer_id` has a plain SwiGLU feed-forward (no experts, or fine_moe's first
        first_k_dense_replace layers)."""
        if self.fine_moe is not None:
            return layer_id < self.fine_moe.first_k_dense_replace
        return self.moe is None

    def to_params_json(self) -> dict[str, Any]:
        """The dict written as native ``params.json`` (tokenizer metadata is not part of it).

        Latent attention and fine-grained experts are written in Mistral's own spelling (the MLA widths at the
        top level, a ``moe`` section with expert_hidden_dim, num_shared_experts, ...: what Mistral Large 3's
        params.json holds and vLLM reads) whenever that spelling says exactly what the model is.  What it cannot
        say (sigmoid routing, no top-k renormalisation, a YaRN mscale_all_dim other than 1) is written as
        mistral-ref's own ``mla`` / ``fine_moe`` sections (the dataclasses' fields), which from_params_json reads
        too.
        """
        d = asdict(self)
        d.pop("tokenizer")
        if isinstance(self.sliding_window, tuple):
            d["sliding_window"] = list(self.sliding_window)
        if self.yarn is not None:
            if self.yarn.attention_factor is not None:
                raise ConfigError(
                    f"yarn.attention_factor={self.yarn.attention_factor} cannot be written to params.json, which "
                    "knows only apply_scale (true: 0.1 * ln(factor) + 1; false: 1)")
            d["yarn"].pop("attention_factor")
        for key in ("sliding_window", "moe", "max_seq_len", "yarn", "llama_4_scaling", "mla", "fine_moe"):
            if d[key] is None:
                d.pop(key)
        mistral = _mistral_latent_params(self, d.get("yarn"))
        if mistral is not None:  # latent attention / fine experts in Mistral's own spelling, as published
            d.pop("mla", None)
            d.pop("fine_moe", None)
            d.update(mistral)
        if not self.tied_embeddings:
            d.pop("tied_embeddings")  # written only where it matters, as the published files do
        return d

    def to_hf_config(self) -> dict[str, Any]:
        """The dict written as Hugging Face ``config.json``.

        MixtralForCausalLM for experts; MinistralForCausalLM ("ministral": ``sliding_window`` + ``layer_types``)
        for per-layer windows; Ministral3ForCausalLM ("ministral3": YaRN and the query scaling in
        ``rope_parameters``) for YaRN; MistralForCausalLM otherwise.  Raises ConfigError for what no HF class
        expresses: two different finite windows, per-layer windows with experts or YaRN, experts with YaRN, and
        a query scaling without YaRN or with another original context than YaRN's.  Latent attention writes
        Mistral4ForCausalLM / DeepseekV3ForCausalLM (:meth:`_to_hf_mla_config`).
        """
        if self.mla is not None:
            return self._to_hf_mla_config()
        window, moe, yarn, l4 = self.sliding_window, self.moe, self.yarn, self.llama_4_scaling
        per_layer = isinstance(window, tuple)
        if per_layer and len({w for w in window if w is not None}) > 1:
            raise ConfigError(f"Hugging Face configs cannot express a per-layer sliding window list with two "
                              f"different windows {sorted({w for w in window if w is not None})}")
        if per_layer and (moe or yarn or l4):
            raise ConfigError("Hugging Face configs cannot express per-layer sliding windows together with "
                              "experts or YaRN (only MinistralForCausalLM has layer_types)")
        if (yarn or l4) and moe:
            raise ConfigError("Hugging Face configs cannot express experts together with YaRN or llama_4_scaling")
        if l4 is not None and (yarn is None or l4.original_max_position_embeddings
                               != yarn.original_max_position_embeddings):
            raise ConfigError("Hugging Face configs express llama_4_scaling only on top of YaRN with the same "
                              "original_max_position_embeddings (rope_parameters holds one)")
        model_type = "mixtral" if moe else "ministral3" if yarn else "ministral" if per_layer else "mistral"
        cfg: dict[str, Any] = {
            "architectures": [_HF_ARCHITECTURES[model_type]],
            "model_type": model_type,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "intermediate_size": self.hidden_dim,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.norm_eps,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "sliding_window": window,
            "max_position_embeddings": self.max_seq_len or 32768,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tied_embeddings,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        if moe:
            cfg["num_local_experts"] = moe.num_experts
            cfg["num_experts_per_tok"] = moe.num_experts_per_tok
        if per_layer:  # one finite window W, and which layers use it
            cfg["sliding_window"] = next((w for w in window if w is not None), None)
            cfg["layer_types"] = ["full_attention" if self.window_for_layer(i) is None else "sliding_attention"
                                  for i in range(self.n_layers)]
        if yarn:
            del cfg["rope_theta"]
            cfg["rope_parameters"] = {
                "rope_type": "yarn", "rope_theta": self.rope_theta, "factor": yarn.factor,
                "original_max_position_embeddings": yarn.original_max_position_embeddings,
                "beta_fast": yarn.beta, "beta_slow": yarn.alpha,
                # transformers' rule (modeling_rope_utils): mscale and mscale_all_dim both non-zero give
                # scale(mscale) / scale(mscale_all_dim) = 1; otherwise 0.1 * ln(factor) + 1
                "mscale": 1.0, "mscale_all_dim": 0.0 if yarn.apply_scale else 1.0,
                "llama_4_scaling_beta": l4.beta if l4 else 0.0,  # 0: no query scaling
            }
            if yarn.attention_factor is not None:
                cfg["rope_parameters"]["attention_factor"] = yarn.attention_factor
        return cfg

    def _to_hf_mla_config(self) -> dict[str, Any]:
        """config.json of a latent-attention model: "mistral4" (softmax routing, query scaling) or "deepseek_v3"
        (sigmoid routing with a correction bias, no query scaling).  rope_interleave is true: our rotary layout."""
        mla, fm, yarn, l4 = self.mla, self.fine_moe, self.yarn, self.llama_4_scaling
        assert mla is not None
        if fm is None:
            raise ConfigError("Hugging Face configs express latent attention only with fine_moe experts "
                              "(Mistral4 / DeepseekV3 MoE layers)")
        model_type = "mistral4" if fm.scoring_func == "softmax" else "deepseek_v3"
        if l4 is not None and (model_type != "mistral4" or yarn is None
                               or l4.original_max_position_embeddings != yarn.original_max_position_embeddings):
            raise ConfigError("Hugging Face configs express llama_4_scaling with latent attention only for "
                              "softmax routing (mistral4) on top of YaRN with the same original context")
        if model_type == "mistral4" and l4 is None:
            raise ConfigError("Mistral4ForCausalLM always applies the llama-4 query scaling: llama_4_scaling "
                              "is required for softmax-routed latent attention models")
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if yarn is not None:
            rope = {"rope_type": "yarn", "rope_theta": self.rope_theta, "factor": yarn.factor,
                    "original_max_position_embeddings": yarn.original_max_position_embeddings,
                    "beta_fast": yarn.beta, "beta_slow": yarn.alpha, "attention_factor": yarn.attention_scaling,
                    "mscale": mla.mscale_all_dim, "mscale_all_dim": mla.mscale_all_dim}
            if l4 is not None:
                rope["llama_4_scaling_beta"] = l4.beta
        return {
            "architectures": [_HF_ARCHITECTURES[model_type]], "model_type": model_type,
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "intermediate_size": self.hidden_dim,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_heads,
            "rms_norm_eps": self.norm_eps, "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len or 32768, "hidden_act": "silu",
            "tie_word_embeddings": self.tied_embeddings, "bos_token_id": 1, "eos_token_id": 2,
            "q_lora_rank": mla.q_lora_rank, "kv_lora_rank": mla.kv_lora_rank,
            "qk_nope_head_dim": mla.qk_nope_head_dim, "qk_rope_head_dim": mla.qk_rope_head_dim,
            "v_head_dim": mla.v_head_dim, "rope_interleave": True, "attention_bias": False,
            "n_routed_experts": fm.num_experts, "num_experts_per_tok": fm.num_experts_per_tok,
            "moe_intermediate_size": fm.moe_intermediate_size, "n_shared_experts": fm.n_shared_experts,
            "first_k_dense_replace": fm.first_k_dense_replace, "n_group": fm.n_group, "topk_group": fm.topk_group,
            "norm_topk_prob": fm.norm_topk_prob, "routed_scaling_factor": fm.routed_scaling_factor,
            "rope_parameters": rope,
        }

    # ---- parsing ---------------------------------------------------------------------------------------------
    @classmethod
    def from_params_json(cls, path: str | Path) -> ModelArgs:
        """Read a native ``params.json`` (a file or a directory holding one).

        Real params.json files omit max_seq_len: it stays None here (or takes max_position_embeddings where the
        file has it), and the checkpoint loader fills it from the matching preset
        (:func:`mistral_ref.family.with_known_context`).  A ``vision_encoder`` section (Mistral Small 3.1+,
        Ministral 3) is skipped with a warning: the language model loads, image inputs are not supported yet.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "params.json"
        raw = _read_json(path)
        known = {"dim", "n_layers", "hidden_dim", "n_heads", "vocab_size", "head_dim", "n_kv_heads", "norm_eps",
                 "rope_theta", "sliding_window", "moe", "max_seq_len", "yarn", "llama_4_scaling", "tied_embeddings",
                 "mla", "fine_moe", *_MISTRAL_MLA_KEYS}
        # Keys that real params.json files carry and that do not change the text model.
        harmless = {"max_batch_size", "use_biases", "model_type", "torch_dtype", "dtype", "quantization", "lora",
                    "vision_encoder", "_name_or_path", "version", "max_position_embeddings"}
        _require(raw, path, ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size"))
        unknown = sorted(set(raw) - known - harmless)
        if unknown:
            warnings.warn(f"{path}: ignoring unknown keys {unknown}", stacklevel=2)
        if raw.get("vision_encoder"):
            warnings.warn(f"{path}: a multimodal model (key 'vision_encoder'): loading its language model only; "
                          "image inputs are not supported yet", stacklevel=2)
        kwargs = {k: raw[k] for k in known if k in raw and k not in _MISTRAL_MLA_KEYS}
        if raw.get("max_seq_len") is None and raw.get("max_position_embeddings") is not None:
            kwargs["max_seq_len"] = raw["max_position_embeddings"]
        if raw.get("rope_theta") is None:
            warnings.warn(
                f"{path}: rope_theta is missing; using 1e6 as mistral-inference does "
                "(Mistral-7B-v0.1 needs 1e4: pass its preset or add rope_theta)", stacklevel=2)
            kwargs["rope_theta"] = 1e6
        moe = raw.get("moe")
        if moe is not None:
            if not isinstance(moe, dict) or "num_experts" not in moe or "num_experts_per_tok" not in moe:
                raise ConfigError(f"{path}: key 'moe' must hold num_experts and num_experts_per_tok, found {moe!r}")
            kwargs["moe"] = MoeArgs(int(moe["num_experts"]), int(moe["num_experts_per_tok"]))
        if any(k in raw for k in _MISTRAL_MLA_KEYS) or _is_fine_moe_section(moe):  # Mistral's own spelling
            try:
                kwargs.pop("moe", None)
                kwargs.update(_mistral_latent_sections(raw))
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
        try:
            for name, section in (("yarn", YarnArgs), ("llama_4_scaling", Llama4Scaling), ("mla", MlaArgs),
                                  ("fine_moe", FineMoeArgs)):
                if raw.get(name) is not None:
                    kwargs[name] = _section(section, name, raw[name])
                elif name in raw:  # null (a section from Mistral's own spelling stays)
                    kwargs.pop(name)
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelArgs:
        """Read a Hugging Face ``config.json`` (file or directory) of a MistralForCausalLM, MixtralForCausalLM,
        MinistralForCausalLM (``layer_types``), Ministral3ForCausalLM (YaRN + query scaling in
        ``rope_parameters``) or Mistral3ForConditionalGeneration (its ``text_config``; the vision tower is
        skipped with a warning: image inputs are not supported yet).  Each field is read as transformers 5.23
        reads it for that model_type."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        raw = _read_json(path)
        model_type = raw.get("model_type")
        if model_type == "mistral3":  # the language model of a vision-language checkpoint
            text = raw.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{path}: model_type 'mistral3' needs a 'text_config' object, found {text!r}")
            warnings.warn(f"{path}: a multimodal Mistral3ForConditionalGeneration: loading its language model "
                          "(text_config) only; image inputs are not supported yet", stacklevel=2)
            tied = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
            raw = {**text, "tie_word_embeddings": tied}
            raw.setdefault("model_type", "mistral")
            model_type = raw["model_type"]
            where = "text_config."
        else:
            where = ""
        if model_type not in (None, *_HF_ARCHITECTURES):
            raise ConfigError(f"{path}: {where}model_type {model_type!r} is not a Mistral-family text model "
                              f"({', '.join(_HF_ARCHITECTURES)})")
        _require(raw, path, ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                             "vocab_size"))
        known = set(_HF_MLA_KEYS) if model_type in _HF_MLA_DEFAULTS else set()
        known |= {"hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "rope_theta", "rope_parameters",
                 "rope_scaling", "sliding_window", "layer_types", "max_position_embeddings", "num_local_experts",
                 "num_experts_per_tok", "model_type", "architectures", "tie_word_embeddings", "hidden_act"}
        harmless = {"bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "transformers_version",
                    "attention_dropout", "initializer_range", "use_cache", "router_aux_loss_coef",
                    "output_router_logits", "router_jitter_noise", "_name_or_path", "use_sliding_window",
                    "max_window_layers", "output_attentions", "output_hidden_states",
                    "return_dict", "quantization_config", "_attn_implementation_autoset", "chunk_size_feed_forward",
                    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class"}
        unknown = sorted(set(raw) - known - harmless)
        if unknown:
            warnings.warn(f"{path}: ignoring unknown keys {unknown}", stacklevel=2)
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (Mistral uses silu)")
        tied = raw.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise ConfigError(f"{path}: {where}tie_word_embeddings must be true or false, found {tied!r}")
        if model_type in _HF_MLA_DEFAULTS:
            return _from_hf_mla(cls, raw, model_type, path, where)
        moe = None
        if raw.get("num_local_experts"):
            moe = MoeArgs(int(raw["num_local_experts"]), int(raw.get("num_experts_per_tok", 2)))
        try:
            theta, yarn, llama_4 = _hf_rope(raw, model_type)
            return cls(
                dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"], hidden_dim=raw["intermediate_size"],
                n_heads=raw["num_attention_heads"], vocab_size=raw["vocab_size"], head_dim=raw.get("head_dim"),
                n_kv_heads=raw.get("num_key_value_heads"), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=theta, sliding_window=_hf_windows(raw, model_type), moe=moe,
                max_seq_len=raw.get("max_position_embeddings"), yarn=yarn, llama_4_scaling=llama_4,
                tied_embeddings=tied,
            )
        except ConfigError as e:
            raise ConfigError(f"{path}: {where}{e}") from None


# model_type -> the architecture to_hf_config writes (and that from_hf_config accepts)
_HF_ARCHITECTURES = {"mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                     "ministral": "MinistralForCausalLM", "ministral3": "Ministral3ForCausalLM",
                     "mistral4": "Mistral4ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}

# Latent attention + fine-grained experts: the keys transformers 5.23's Mistral4Config / DeepseekV3Config read,
# with their defaults (a config.json that omits one gets what transformers would use).
_HF_MLA_DEFAULTS: dict[str, dict[str, Any]] = {
    "mistral4": dict(kv_lora_rank=256, q_lora_rank=1024, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=128,
                     n_routed_experts=128, num_experts_per_tok=4, moe_intermediate_size=2048, n_shared_experts=1,
                     first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=True,
                     routed_scaling_factor=1.0, rope_interleave=True, attention_bias=False),
    "deepseek_v3": dict(kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
                        v_head_dim=128, n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048,
                        n_shared_experts=1, first_k_dense_replace=3, n_group=8, topk_group=4, norm_topk_prob=True,
                        routed_scaling_factor=2.5, rope_interleave=True, attention_bias=False),
}
_HF_MLA_KEYS = (*_HF_MLA_DEFAULTS["mistral4"], "num_local_experts", "qk_head_dim", "num_mtp_layers",
                "pretraining_tp", "scoring_func", "topk_method", "moe_layer_freq", "ep_size",
                "num_nextn_predict_layers", "aux_loss_alpha", "seq_aux")


def _from_hf_mla(cls: type[ModelArgs], raw: dict[str, Any], model_type: str, path: Path, where: str) -> ModelArgs:
    """ModelArgs of a Mistral4ForCausalLM / DeepseekV3ForCausalLM config.json, as transformers 5.23 reads it.

    mistral4 routes by softmax and always scales queries (llama_4_scaling_beta); deepseek_v3 routes by sigmoid
    with e_score_correction_bias and never scales queries.  head_dim = qk_nope_head_dim + qk_rope_head_dim; every
    head has its own keys and values (n_kv_heads = n_heads).  rope_interleave false (half-split rotary rows) and
    attention_bias true are refused: the published models use neither.
    """
    c = {**_HF_MLA_DEFAULTS[model_type], **{k: v for k, v in raw.items() if v is not None or k == "q_lora_rank"}}
    if "num_local_experts" in raw and "n_routed_experts" not in raw:
        c["n_routed_experts"] = raw["num_local_experts"]
    try:
        if c["rope_interleave"] is not True:
            raise ConfigError("rope_interleave=false (half-split rotary rows) is not supported; the published "
                              "Mistral Small 4 / Large 3 / DeepSeek-V3 configs use true")
        if c["attention_bias"]:
            raise ConfigError("attention_bias=true is not supported (latent attention without biases only)")
        scoring = "softmax" if model_type == "mistral4" else "sigmoid"
        if raw.get("scoring_func", scoring) != scoring:
            raise ConfigError(f"scoring_func {raw['scoring_func']!r}: transformers' {model_type} routes by {scoring}")
        theta, yarn, llama_4 = _hf_rope(raw, model_type)
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        mla = MlaArgs(kv_lora_rank=c["kv_lora_rank"], qk_nope_head_dim=c["qk_nope_head_dim"],
                      qk_rope_head_dim=c["qk_rope_head_dim"], v_head_dim=c["v_head_dim"],
                      q_lora_rank=c["q_lora_rank"],
                      mscale_all_dim=(rope.get("mscale_all_dim") or 0.0) if yarn is not None else 0.0)
        fine_moe = FineMoeArgs(
            num_experts=c["n_routed_experts"], num_experts_per_tok=c["num_experts_per_tok"],
            moe_intermediate_size=c["moe_intermediate_size"], n_shared_experts=c["n_shared_experts"],
            first_k_dense_replace=c["first_k_dense_replace"], n_group=c["n_group"], topk_group=c["topk_group"],
            norm_topk_prob=c["norm_topk_prob"], routed_scaling_factor=c["routed_scaling_factor"],
            scoring_func=scoring)
        tied = raw.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, found {tied!r}")
        return cls(dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"], hidden_dim=raw["intermediate_size"],
                   n_heads=raw["num_attention_heads"], vocab_size=raw["vocab_size"], head_dim=mla.qk_head_dim,
                   n_kv_heads=raw["num_attention_heads"], norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                   rope_theta=theta, max_seq_len=raw.get("max_position_embeddings"), yarn=yarn,
                   llama_4_scaling=llama_4, tied_embeddings=tied, mla=mla, fine_moe=fine_moe)
    except ConfigError as e:
        raise ConfigError(f"{path}: {where}{e}") from None


# Mistral's own params.json spelling of latent attention and fine-grained experts (Mistral Large 3's published file;
# vLLM's adapt_config_dict maps it to deepseek_v3 / MistralLarge3ForCausalLM with softmax scoring): the MLA widths at
# the top level, the experts in a `moe` section with expert_hidden_dim, num_shared_experts, routed_scale,
# num_expert_groups, num_expert_groups_per_tok, first_k_dense_replace, route_every_n.
_MISTRAL_MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_MISTRAL_FINE_MOE_KEYS = {"num_experts", "num_experts_per_tok", "expert_hidden_dim", "num_shared_experts",
                          "first_k_dense_replace", "routed_scale", "num_expert_groups", "num_expert_groups_per_tok",
                          "route_every_n", "expert_parallel", "expert_model_parallel"}


def _is_fine_moe_section(moe: Any) -> bool:
    """True for a params.json `moe` section of fine-grained experts (Mistral Large 3), not Mixtral's."""
    return isinstance(moe, dict) and ("expert_hidden_dim" in moe or bool(moe.get("num_shared_experts")))


def _mistral_latent_sections(raw: dict[str, Any]) -> dict[str, Any]:
    """{"mla": MlaArgs, "fine_moe": FineMoeArgs} (either may be absent) from Mistral's params.json spelling.

    Read as vLLM reads it: softmax scoring with top-k renormalisation; routed_scale is routed_scaling_factor; the
    expert groups are n_group / topk_group.  With a `yarn` section (apply_scale false, as published) the softmax
    scale gets YaRN's correction with mscale_all_dim 1, as Mistral's own config.json of Small 4 says for the same
    section.  Anything this reading does not cover (route_every_n != 1, other moe keys, apply_scale true, a
    head_dim that is not qk_nope_head_dim + qk_rope_head_dim) is a ConfigError naming the key.
    """
    out: dict[str, Any] = {}
    yarn = raw.get("yarn") or {}
    if any(k in raw for k in _MISTRAL_MLA_KEYS):
        missing = [k for k in _MISTRAL_MLA_KEYS[1:] if raw.get(k) is None]
        if missing:
            raise ConfigError(f"latent attention needs {missing} (found {[k for k in _MISTRAL_MLA_KEYS if k in raw]})")
        if isinstance(yarn, dict) and yarn.get("apply_scale"):
            raise ConfigError("yarn.apply_scale=true with latent attention is not supported (published Mistral "
                              "latent-attention files say false)")
        out["mla"] = MlaArgs(kv_lora_rank=raw["kv_lora_rank"], qk_nope_head_dim=raw["qk_nope_head_dim"],
                             qk_rope_head_dim=raw["qk_rope_head_dim"], v_head_dim=raw["v_head_dim"],
                             q_lora_rank=raw.get("q_lora_rank"), mscale_all_dim=1.0 if yarn else 0.0)
        qk = out["mla"].qk_head_dim
        if raw.get("head_dim", qk) != qk:
            raise ConfigError(f"head_dim={raw['head_dim']} must be qk_nope_head_dim + qk_rope_head_dim = {qk}")
        out["head_dim"] = qk
    moe = raw.get("moe")
    if _is_fine_moe_section(moe):
        unknown = sorted(set(moe) - _MISTRAL_FINE_MOE_KEYS)
        if unknown:
            raise ConfigError(f"key 'moe' has entries {unknown} that fine-grained experts do not read (known: "
                              f"{sorted(_MISTRAL_FINE_MOE_KEYS)})")
        if moe.get("route_every_n", 1) != 1:
            raise ConfigError(f"moe.route_every_n={moe['route_every_n']}: experts in every n-th layer only are not "
                              "supported (1: every layer after first_k_dense_replace)")
        if "expert_hidden_dim" not in moe:
            raise ConfigError("required key 'moe.expert_hidden_dim' is missing")
        out["fine_moe"] = FineMoeArgs(
            num_experts=moe["num_experts"], num_experts_per_tok=moe["num_experts_per_tok"],
            moe_intermediate_size=moe["expert_hidden_dim"], n_shared_experts=moe.get("num_shared_experts", 0),
            first_k_dense_replace=moe.get("first_k_dense_replace", 0), n_group=moe.get("num_expert_groups", 1),
            topk_group=moe.get("num_expert_groups_per_tok", 1), norm_topk_prob=True,
            routed_scaling_factor=moe.get("routed_scale", 1.0), scoring_func="softmax")
    return out


def _mistral_latent_params(args: ModelArgs, yarn: dict[str, Any] | None) -> dict[str, Any] | None:
    """The params.json keys of Mistral's spelling for args.mla / args.fine_moe (see _mistral_latent_sections), or
    None if the model has neither, or if reading those keys back would not give the same model."""
    if args.mla is None and args.fine_moe is None:
        return None
    out: dict[str, Any] = {}
    m, fm = args.mla, args.fine_moe
    if m is not None:
        out.update(q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                   qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim)
    if fm is not None:
        out["moe"] = {"num_experts": fm.num_experts, "num_experts_per_tok": fm.num_experts_per_tok,
                      "expert_hidden_dim": fm.moe_intermediate_size, "num_shared_experts": fm.n_shared_experts,
                      "first_k_dense_replace": fm.first_k_dense_replace, "routed_scale": fm.routed_scaling_factor,
                      "num_expert_groups": fm.n_group, "num_expert_groups_per_tok": fm.topk_group,
                      "route_every_n": 1}
    try:
        back = _mistral_latent_sections({**out, **({"yarn": yarn} if yarn else {}), "head_dim": args.head_dim})
    except ConfigError:
        return None
    if back.get("mla") != m or back.get("fine_moe") != fm:
        return None
    return out


def _section(cls: type, name: str, value: Any) -> Any:
    """A params.json section ("yarn", "llama_4_scaling", "moe") as its dataclass, naming the key on errors."""
    if not isinstance(value, dict):
        raise ConfigError(f"key '{name}' must be an object, found {value!r}")
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"key '{name}' has unknown entries {unknown} (expected {names})")
    required = [f.name for f in fields(cls) if f.default is MISSING]
    for key in required:
        if value.get(key) is None:
            raise ConfigError(f"required key '{name}.{key}' is missing")
    return cls(**value)


def _hf_windows(raw: dict[str, Any], model_type: str | None) -> int | tuple[int | None, ...] | None:
    """The sliding window(s) of an HF config, as transformers reads them.

    "ministral" (MinistralForCausalLM) gives each layer ``sliding_window`` if its ``layer_types`` entry is
    "sliding_attention", else full attention; without layer_types every layer slides.  The other classes use
    one window for every layer and ignore layer_types (transformers warns; so do we).  A per-layer result is
    shortened to its repeating pattern, e.g. 36 layers of full/32k/32k/32k -> (None, 32768, 32768, 32768).
    """
    window = raw.get("sliding_window")
    if raw.get("use_sliding_window") is False:
        window = None
    layer_types = raw.get("layer_types")
    if layer_types is None:
        return window
    if model_type != "ministral":
        warnings.warn(f"layer_types is ignored for model_type {model_type!r}, as transformers ignores it: every "
                      "layer uses sliding_window (interleaved windows need model_type 'ministral')", stacklevel=3)
        return window
    n = raw["num_hidden_layers"]
    if not isinstance(layer_types, list) or len(layer_types) != n or \
            not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise ConfigError(f"layer_types must list 'sliding_attention' or 'full_attention' for each of the {n} "
                          f"layers, found {layer_types!r}")
    window = normalize_sliding_window(window)
    if "sliding_attention" in layer_types and not isinstance(window, int):
        raise ConfigError(f"layer_types has sliding_attention layers but sliding_window is "
                          f"{raw.get('sliding_window')!r}")
    per_layer = tuple(window if t == "sliding_attention" else None for t in layer_types)
    for period in range(1, n + 1):  # the shortest repeating pattern
        if n % period == 0 and per_layer == per_layer[:period] * (n // period):
            return per_layer[:period]
    return per_layer  # unreachable: period n always matches


def _hf_rope(raw: dict[str, Any], model_type: str | None) -> tuple[float, YarnArgs | None, Llama4Scaling | None]:
    """(rope_theta, yarn, llama_4_scaling) of an HF config, by transformers 5.23's rules.

    ``rope_parameters`` (transformers 5) or ``rope_scaling`` (4.x) with rope_type / type "default" or "yarn".
    YaRN: factor (default max_position_embeddings / original), original_max_position_embeddings (default
    max_position_embeddings), beta_fast (32), beta_slow (1); the cos/sin factor is attention_factor if given,
    else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are non-zero, else
    0.1 * ln(factor) + 1.  The query scaling (llama_4_scaling_beta, 0 = none) is applied by Ministral3 only.
    """
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"rope_parameters must be an object, found {rope!r}")
    theta = raw.get("rope_theta")
    if theta is None:  # transformers 5 keeps it in rope_parameters (and may write "rope_theta": null)
        theta = rope.get("rope_theta")
    if theta is None:
        warnings.warn("rope_theta is missing; using 1e4 as transformers' MistralConfig does", stacklevel=3)
        theta = 1e4
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope_type {rope_type!r} is not supported (only 'default' and 'yarn')")
    beta = rope.get("llama_4_scaling_beta") or 0
    if rope_type == "default":
        if beta and model_type in ("ministral3", "mistral4"):
            raise ConfigError("rope_parameters.llama_4_scaling_beta needs rope_type 'yarn' (its "
                              "original_max_position_embeddings)")
        return float(theta), None, None
    if rope.get("truncate", True) is not True:
        raise ConfigError("rope_parameters.truncate=false (unrounded YaRN correction range) is not supported")
    context = raw.get("max_position_embeddings")
    original = rope.get("original_max_position_embeddings", context)
    if original is None:
        raise ConfigError("rope_parameters.original_max_position_embeddings is missing (and so is "
                          "max_position_embeddings)")
    factor = rope.get("factor")
    if factor is None:
        if context is None:
            raise ConfigError("rope_parameters.factor is missing (and so is max_position_embeddings)")
        factor = context / original
    yarn = YarnArgs(factor=factor, original_max_position_embeddings=original,
                    beta=rope.get("beta_fast") or 32.0, alpha=rope.get("beta_slow") or 1.0)
    scale = rope.get("attention_factor")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if scale is None:
        if mscale and mscale_all_dim:
            scale = _mscale(yarn.factor, mscale) / _mscale(yarn.factor, mscale_all_dim)
        else:
            scale = default_yarn_scaling(yarn.factor)
    if scale == 1.0:
        yarn = replace(yarn, apply_scale=False)
    elif not math.isclose(scale, default_yarn_scaling(yarn.factor), rel_tol=1e-12):
        yarn = replace(yarn, attention_factor=scale)
    llama_4 = None
    if beta:
        if model_type in ("ministral3", "mistral4"):
            llama_4 = Llama4Scaling(yarn.original_max_position_embeddings, beta)
        else:
            warnings.warn(f"rope_parameters.llama_4_scaling_beta is ignored for model_type {model_type!r}, as "
                          "transformers ignores it (the query scaling is Ministral3's)", stacklevel=3)
    return float(theta), yarn, llama_4


def _mscale(factor: float, mscale: float) -> float:
    """transformers' get_mscale: 0.1 * mscale * ln(factor) + 1 (1 for factor <= 1)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8, or an int of > 4300 digits
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def _require(raw: dict[str, Any], path: Path, keys: tuple[str, ...]) -> None:
    for key in keys:
        if raw.get(key) is None:
            raise ConfigError(f"{path}: required key {key!r} is missing")
