"""The embedded default model: a tiny Mixtral trained by this project, shipped inside the package.

No Mistral weights can be downloaded on a fresh machine, so ``mistral_ref/assets/tiny-mixtral`` holds a real,
trained Mixtral-architecture model (8 experts, top-2, grouped-query attention, sliding window) of 4.2M
parameters with its own 3,072-piece SentencePiece tokenizer that carries the Mistral v3 control tokens at
their real ids.  It completes text in five languages, follows the V3 chat template, ends its turns with EOS
and calls tools (``add``, ``multiply``, ``convert_units``) with ``[TOOL_CALLS]`` JSON.  How it was made:
:mod:`mistral_ref.train`; its data and licences: ``assets/tiny-mixtral/DATA.md``.

The directory is an ordinary native checkpoint (params.json + consolidated.safetensors +
tokenizer.model.v3), so everything that loads a Mistral checkpoint loads it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mistral_ref.model import Transformer
    from mistral_ref.tokenizer import Tokenizer

#: The shipped checkpoint directory.
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-mixtral"


def load_embedded(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                  ) -> tuple[Transformer, Tokenizer]:
    """The embedded tiny Mixtral and its tokenizer: ``(model in eval mode, tokenizer)``.

    dtype: the parameters' dtype (the file stores bf16; fp32 by default, as its numbers were measured).
    """
    from mistral_ref.checkpoint import load_model
    from mistral_ref.tokenizer import load_tokenizer

    if not (EMBEDDED_MODEL_DIR / "params.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing from {EMBEDDED_MODEL_DIR} "
                                "(an install without package data?)")
    model = load_model(EMBEDDED_MODEL_DIR, dtype=dtype, device=device)
    return model, load_tokenizer(EMBEDDED_MODEL_DIR / "tokenizer.model.v3")
