"""The embedded default model: a tiny Mixtral trained by this project, shipped inside the package, and its tools.

No Mistral weights can be downloaded on a fresh machine, so ``mistral_ref/assets/tiny-mixtral`` holds a real,
trained Mixtral-architecture model (8 experts, top-2, grouped-query attention, sliding window) of 4.2M
parameters with its own 3,072-piece SentencePiece tokenizer that carries the Mistral v3 control tokens at
their real ids.  It completes text in five languages, follows the V3 chat template, ends its turns with EOS
and calls the tools defined here (``add``, ``multiply``, ``convert_units``) with ``[TOOL_CALLS]`` JSON.  How it
was made: :mod:`mistral_ref.train`; its data and licences: ``assets/tiny-mixtral/DATA.md``.

The directory is an ordinary native checkpoint (params.json + consolidated.safetensors +
tokenizer.model.v3), so everything that loads a Mistral checkpoint loads it too.  Importing this module does not
import torch (the training data imports the tool definitions).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from mistral_ref.model import Transformer
    from mistral_ref.tokenizer import Tokenizer

#: The shipped checkpoint directory.
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-mixtral"

#: The dtype the embedded model runs in, however it is loaded (by `load_embedded`, or by its path in the CLI):
#: the file stores bf16 weights, and every number measured on the model (README, tests) was computed in fp32.
EMBEDDED_DTYPE = "float32"


def load_embedded(dtype: torch.dtype | str = EMBEDDED_DTYPE, device: torch.device | str = "cpu"
                  ) -> tuple[Transformer, Tokenizer]:
    """The embedded tiny Mixtral and its tokenizer: ``(model in eval mode, tokenizer)``.

    dtype: the parameters' dtype (default float32, as its numbers were measured; the file stores bf16).
    """
    from mistral_ref.checkpoint import load_model
    from mistral_ref.tokenizer import load_tokenizer

    if not (EMBEDDED_MODEL_DIR / "params.json").is_file():
        raise FileNotFoundError(f"the embedded model is missing from {EMBEDDED_MODEL_DIR} "
                                "(an install without package data?)")
    model = load_model(EMBEDDED_MODEL_DIR, dtype=dtype, device=device)
    return model, load_tokenizer(EMBEDDED_MODEL_DIR / "tokenizer.model.v3")


def is_embedded_model_dir(path: str | Path) -> bool:
    """True when `path` is the shipped checkpoint directory (or a file in it)."""
    path = Path(path).resolve()
    return EMBEDDED_MODEL_DIR in (path, path.parent)


# ---- the tools it was trained to call ---------------------------------------------------------------------------
def _tool(name: str, description: str, params: dict[str, str]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {p: {"type": t} for p, t in params.items()},
                       "required": list(params)}}}


#: The function definitions (chat-completions `tools` entries) that the training conversations offer.
TOOLS: dict[str, dict[str, Any]] = {
    "add": _tool("add", "Add two numbers.", {"a": "number", "b": "number"}),
    "multiply": _tool("multiply", "Multiply two numbers.", {"a": "number", "b": "number"}),
    "convert_units": _tool("convert_units", "Convert a value between units.",
                           {"value": "number", "from_unit": "string", "to_unit": "string"}),
}

_UNITS = {("km", "mi"): 0.621371, ("mi", "km"): 1.609344, ("kg", "lb"): 2.204623, ("lb", "kg"): 0.453592,
          ("m", "ft"): 3.280840, ("ft", "m"): 0.304800}


def run_tool(name: str, arguments: dict[str, Any]) -> str:
    """Execute one of the tools above and format the result as the training conversations do ("42", "3.5")."""
    if name == "add":
        value = float(arguments["a"]) + float(arguments["b"])
    elif name == "multiply":
        value = float(arguments["a"]) * float(arguments["b"])
    elif name == "convert_units":
        f, t, v = arguments["from_unit"], arguments["to_unit"], float(arguments["value"])
        if (f, t) == ("C", "F"):
            value = v * 9 / 5 + 32
        elif (f, t) == ("F", "C"):
            value = (v - 32) * 5 / 9
        elif (f, t) in _UNITS:
            value = v * _UNITS[f, t]
        else:
            return f"error: cannot convert {f} to {t}"
    else:
        return f"error: unknown tool {name}"
    value = round(value, 2)
    return str(int(value)) if value.is_integer() else f"{value:.2f}".rstrip("0").rstrip(".")
