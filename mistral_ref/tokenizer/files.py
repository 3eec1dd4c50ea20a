"""Finding and loading tokenizer files: single files, checkpoint directories, the mistral-common wheel."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import Tokenizer
from .errors import TokenizerError
from .sentencepiece import SentencePieceTokenizer, version_from_filename
from .tekken import TekkenTokenizer

#: Files the mistral-common wheel ships in ``mistral_common/data/`` (name -> kind/version).
MISTRAL_COMMON_FILES = {
    "tokenizer.model.v1": "sentencepiece v1 (Mistral-7B v0.1/v0.2, Mixtral-8x7B)",
    "mistral_instruct_tokenizer_240216.model.v2": "sentencepiece v2 (first tool-calling vocabulary)",
    "mistral_instruct_tokenizer_240323.model.v3": "sentencepiece v3 (Mistral-7B v0.3, Mixtral-8x22B)",
    "mistral_instruct_tokenizer_241114.model.v7": "sentencepiece v7 (Mistral Large 2411)",
    "tekken_240718.json": "tekken v3 (Mistral Nemo)",
    "tekken_240911.json": "tekken v3 with image config (Pixtral 12B)",
}


def _is_tekken(path: Path) -> bool:
    return path.suffix == ".json" and "tekken" in path.name


def _is_sentencepiece(path: Path) -> bool:
    return path.name.endswith(".model") or version_from_filename(path) is not None


def find_tokenizer_file(directory: str | Path) -> Path:
    """The tokenizer file of a checkpoint directory.

    Preference: ``tekken.json`` (or another ``*tekken*.json``), then the highest-versioned
    ``*.model.vN`` file, then a plain ``tokenizer.model`` (HF layout; its version is inferred from
    its control pieces).
    """
    d = Path(directory)
    if not d.is_dir():
        raise TokenizerError(f"{d} is not a directory")
    tekken = sorted(p for p in d.iterdir() if p.is_file() and _is_tekken(p))
    if tekken:
        named = [p for p in tekken if p.name == "tekken.json"]
        return named[0] if named else tekken[-1]
    versioned = [p for p in d.iterdir() if p.is_file() and version_from_filename(p) is not None]
    if versioned:
        return max(versioned, key=lambda p: (int(version_from_filename(p)[1:]), p.name))  # type: ignore[index]
    plain = d / "tokenizer.model"
    if plain.is_file():
        return plain
    raise TokenizerError(
        f"no tokenizer in {d}: expected tekken.json, tokenizer.model.vN or tokenizer.model "
        "(native Mistral checkpoints ship one of these next to params.json)"
    )


def load_tokenizer(path: str | Path, version: str | None = None) -> Tokenizer:
    """Load a tokenizer from a file or a checkpoint directory.

    Args:
        path: ``tekken*.json``, ``*.model.vN`` / ``tokenizer.model``, or a directory holding one.
        version: override the instruct version (SentencePiece only; tekken files carry theirs).

    Returns:
        A :class:`~mistral_ref.tokenizer.Tokenizer` (``.kind``, ``.version`` tell what it is).
    """
    p = Path(path)
    if p.is_dir():
        p = find_tokenizer_file(p)
    if not p.is_file():
        raise TokenizerError(f"tokenizer file {p} does not exist")
    if _is_tekken(p):
        tok = TekkenTokenizer.from_file(p)
        if version is not None and version != tok.version:
            raise TokenizerError(
                f"{p} is a tekken {tok.version} file; its version cannot be changed to {version}"
            )
        return tok
    if _is_sentencepiece(p):
        return SentencePieceTokenizer(p, version=version)
    if p.suffix == ".json":
        raise TokenizerError(f"{p}: tekken files must have 'tekken' in their name and end in .json")
    raise TokenizerError(f"{p}: unrecognised tokenizer file (expected tekken*.json or *.model[.vN])")


def mistral_common_data_dir() -> Path | None:
    """``mistral_common/data`` of the installed mistral-common wheel, found without importing it."""
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "data"
        if d.is_dir():
            return d
    return None


def write_tekken_file(
    source: str | Path | Mapping[str, Any],
    destination: str | Path,
    version: str,
    special_tokens: Sequence[str] | None = None,
    model_settings_builder: Mapping[str, Any] | None = None,
) -> Path:
    """Copy a ``tekken.json`` with another ``config.version`` and, optionally, an explicit special list.

    Useful to build v7/v11/v13/v15 test files from the Nemo file (tekken_240718.json): v11 and newer files
    must list their special tokens (``[ARGS]``, ``[CALL_ID]``, ``[THINK]``, ``[MODEL_SETTINGS]`` ...).
    ``special_tokens`` are names in id order; ranks are their positions. ``model_settings_builder`` (v15) says
    which model settings the model takes (:mod:`.settings`). ``source`` may also be the already parsed json
    (not modified).
    """
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
    data["config"] = {**data["config"], "version": version}
    if special_tokens is not None:
        data["special_tokens"] = [
            {"rank": i, "token_str": name, "is_control": True} for i, name in enumerate(special_tokens)
        ]
    if model_settings_builder is not None:
        data["model_settings_builder"] = dict(model_settings_builder)
    dest = Path(destination)
    dest.write_text(json.dumps(data), encoding="utf-8")  # dumps + one write: 4x faster than json.dump
    return dest


#: The file in which Mistral checkpoints ship the system prompt their model was trained with.
SYSTEM_PROMPT_FILE = "SYSTEM_PROMPT.txt"


def find_system_prompt(tokenizer_or_dir: Tokenizer | str | Path) -> str | None:
    """The text of the ``SYSTEM_PROMPT.txt`` next to a tokenizer file (or in a checkpoint directory), if any.

    Reasoning models (Magistral) ship the system prompt they reason best with there;
    :func:`~.chat.system_prompt_message` turns it into a system message.
    """
    if isinstance(tokenizer_or_dir, Tokenizer):
        if tokenizer_or_dir.path is None:
            return None
        directory = tokenizer_or_dir.path.parent
    else:
        directory = Path(tokenizer_or_dir)
    path = directory / SYSTEM_PROMPT_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None
