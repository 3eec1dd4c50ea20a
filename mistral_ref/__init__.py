"""mistral-ref: a readable, exact and fast reference implementation of the Mistral model family.

Public API (re-exported lazily, so ``import mistral_ref.tokenizer`` never imports torch):

    load_model(path, dtype=None)              a native or Hugging Face checkpoint -> Transformer
    save_checkpoint / convert_checkpoint      write native or Hugging Face files; convert without loading
    CheckpointError                           what a bad checkpoint raises (names file, key, expected, found)
    ModelArgs, PRESETS, parameter_counts      model configurations; the family's presets; sizes on meta
    Transformer                               the model: forward(tokens, positions, cache) -> logits
    load_tokenizer, Tokenizer                 SentencePiece and Tekken tokenizers, chat templates
    generate, generate_stream                 the prefill/decode loop (ragged batches, streaming, stops)
    GenerationParamError                      what nonsense sampling parameters raise
    chat_completion, fim_completion           the Mistral chat-completions and fill-in-the-middle APIs
    load_embedded                             the shipped tiny Mixtral and its tokenizer
    quantize_model                            int8 / int4 weight-only quantization of a model's linear layers

Reading order of the reference: config, norm, rope, attention, moe, model, cache; the fast engine is in
mistral_ref.backends (one dispatch point: Transformer.set_backend).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelArgs": "mistral_ref.config",
    "PRESETS": "mistral_ref.family",
    "parameter_counts": "mistral_ref.family",
    "Transformer": "mistral_ref.model",
    "load_model": "mistral_ref.checkpoint",
    "save_checkpoint": "mistral_ref.checkpoint",
    "convert_checkpoint": "mistral_ref.checkpoint",
    "CheckpointError": "mistral_ref.checkpoint",
    "load_tokenizer": "mistral_ref.tokenizer",
    "Tokenizer": "mistral_ref.tokenizer",
    "generate": "mistral_ref.generation",
    "generate_stream": "mistral_ref.generation",
    "GenerationParamError": "mistral_ref.sampling",
    "load_embedded": "mistral_ref.embedded",
    "quantize_model": "mistral_ref.quantize",
    "chat_completion": "mistral_ref.api",
    "fim_completion": "mistral_ref.api",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mistral_ref' has no attribute {name!r}")
