"""mistral-ref: a readable, exact and fast reference implementation of the Mistral model family.

The public API is re-exported lazily, so ``import mistral_ref.tokenizer`` never imports torch.
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
    "chat_completion": "mistral_ref.api",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mistral_ref' has no attribute {name!r}")
