"""Model hyper-parameters: one dataclass named after params.json, and the parsing of both config formats.

`ModelArgs` uses the field names of the native ``params.json`` so a reader can map a checkpoint's file to code.
Hugging Face ``config.json`` files are translated into the same dataclass by :meth:`ModelArgs.from_hf_config`.
The published models (presets), their parameter counts and trained contexts live in :mod:`mistral_ref.family`.
This module imports neither torch nor the model.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A params.json / config.json that cannot describe a Mistral-family model."""


@dataclass(frozen=True)
class MoeArgs:
    """Sparse mixture of experts: each token is sent to `num_experts_per_tok` of `num_experts` SwiGLU experts."""

    num_experts: int
    num_experts_per_tok: int


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
    sliding_window: keys each query sees (query p sees p-W+1 .. p) — int, per-layer tuple or None;
    moe: MoeArgs for Mixtral, None for dense models; max_seq_len: the trained context (metadata only —
    caches are sized from the actual request, never from this); tokenizer: the tokenizer version a preset uses.
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
        if isinstance(self.moe, dict):
            set_(self, "moe", MoeArgs(**self.moe))
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

    # ---- derived views -------------------------------------------------------------------------------------
    def window_for_layer(self, layer_id: int) -> int | None:
        """The sliding window (in keys) of layer `layer_id`, or None for full causal attention."""
        w = self.sliding_window
        if isinstance(w, tuple):
            return w[layer_id % len(w)]
        return w

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def to_params_json(self) -> dict[str, Any]:
        """The dict written as native ``params.json`` (tokenizer metadata is not part of it)."""
        d = asdict(self)
        d.pop("tokenizer")
        if isinstance(self.sliding_window, tuple):
            d["sliding_window"] = list(self.sliding_window)
        for key in ("sliding_window", "moe", "max_seq_len"):
            if d[key] is None:
                d.pop(key)
        return d

    def to_hf_config(self) -> dict[str, Any]:
        """The dict written as Hugging Face ``config.json`` (MistralForCausalLM or MixtralForCausalLM)."""
        window = self.sliding_window
        if isinstance(window, tuple):
            raise ConfigError("Hugging Face Mistral/Mixtral configs cannot express a per-layer sliding window list")
        moe = self.moe
        cfg: dict[str, Any] = {
            "architectures": ["MixtralForCausalLM" if moe else "MistralForCausalLM"],
            "model_type": "mixtral" if moe else "mistral",
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
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
        if moe:
            cfg["num_local_experts"] = moe.num_experts
            cfg["num_experts_per_tok"] = moe.num_experts_per_tok
        return cfg

    # ---- parsing ---------------------------------------------------------------------------------------------
    @classmethod
    def from_params_json(cls, path: str | Path) -> ModelArgs:
        """Read a native ``params.json`` (a file or a directory holding one).

        Real params.json files omit max_seq_len: it stays None here, and the checkpoint loader fills it from the
        matching preset (:func:`mistral_ref.family.with_known_context`).
        """
        path = Path(path)
        if path.is_dir():
            path = path / "params.json"
        raw = _read_json(path)
        known = {"dim", "n_layers", "hidden_dim", "n_heads", "vocab_size", "head_dim", "n_kv_heads", "norm_eps",
                 "rope_theta", "sliding_window", "moe", "max_seq_len"}
        # Keys that real params.json files carry and that do not change the text model.
        harmless = {"max_batch_size", "use_biases", "model_type", "torch_dtype", "dtype", "quantization", "lora",
                    "vision_encoder", "_name_or_path", "version", "max_position_embeddings"}
        _require(raw, path, ("dim", "n_layers", "hidden_dim", "n_heads", "vocab_size"))
        unknown = sorted(set(raw) - known - harmless)
        if unknown:
            warnings.warn(f"{path}: ignoring unknown keys {unknown}", stacklevel=2)
        kwargs = {k: raw[k] for k in known if k in raw}
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
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_hf_config(cls, path: str | Path) -> ModelArgs:
        """Read a Hugging Face ``config.json`` of a MistralForCausalLM / MixtralForCausalLM (file or directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        raw = _read_json(path)
        model_type = raw.get("model_type")
        if model_type not in (None, "mistral", "mixtral"):
            raise ConfigError(f"{path}: model_type {model_type!r} is not a Mistral or Mixtral text model")
        _require(raw, path, ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                             "vocab_size"))
        if raw.get("tie_word_embeddings"):
            raise ConfigError(f"{path}: tie_word_embeddings=true is not used by any Mistral-family model")
        known = {"hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size", "rope_theta", "rope_parameters",
                 "sliding_window", "max_position_embeddings", "num_local_experts", "num_experts_per_tok",
                 "model_type", "architectures", "tie_word_embeddings", "hidden_act"}
        harmless = {"bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "transformers_version",
                    "attention_dropout", "initializer_range", "use_cache", "router_aux_loss_coef",
                    "output_router_logits", "router_jitter_noise", "_name_or_path", "use_sliding_window",
                    "max_window_layers", "layer_types", "rope_scaling", "output_attentions", "output_hidden_states",
                    "return_dict", "quantization_config", "_attn_implementation_autoset", "chunk_size_feed_forward",
                    "is_encoder_decoder", "id2label", "label2id", "problem_type", "tokenizer_class"}
        unknown = sorted(set(raw) - known - harmless)
        if unknown:
            warnings.warn(f"{path}: ignoring unknown keys {unknown}", stacklevel=2)
        if raw.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported (Mistral uses silu)")
        theta = raw.get("rope_theta")
        if theta is None and isinstance(raw.get("rope_parameters"), dict):
            theta = raw["rope_parameters"].get("rope_theta")
            rope_type = raw["rope_parameters"].get("rope_type", "default")
            if rope_type != "default":
                raise ConfigError(f"{path}: rope_type {rope_type!r} is not supported (only 'default')")
        if theta is None:
            warnings.warn(f"{path}: rope_theta is missing; using 1e4 as transformers' MistralConfig does",
                          stacklevel=2)
            theta = 1e4
        moe = None
        if raw.get("num_local_experts"):
            moe = MoeArgs(int(raw["num_local_experts"]), int(raw.get("num_experts_per_tok", 2)))
        window = raw.get("sliding_window")
        if raw.get("use_sliding_window") is False:
            window = None
        try:
            return cls(
                dim=raw["hidden_size"], n_layers=raw["num_hidden_layers"], hidden_dim=raw["intermediate_size"],
                n_heads=raw["num_attention_heads"], vocab_size=raw["vocab_size"], head_dim=raw.get("head_dim"),
                n_kv_heads=raw.get("num_key_value_heads"), norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta), sliding_window=window, moe=moe,
                max_seq_len=raw.get("max_position_embeddings"),
            )
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


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
