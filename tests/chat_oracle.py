"""Test helpers for the chat-template tests: tekken files built the way mistral-common's own tests build them,
and mistral-common (the token-level oracle) run on a request. Torch-free.

The base files come from the installed mistral-common wheel (located with importlib; never copied into the
repository); the v7/v11/v13/v15 variants are written to a temporary directory from the Nemo file.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mistral_ref.tokenizer import LEGACY_SPECIAL_TOKENS, SAFE_PROMPT, mistral_common_data_dir, write_tekken_file

DATA = mistral_common_data_dir()
NEMO = "tekken_240718.json"

# Special tokens of the tekken files built for v7/v11/v13 (layout of recent Mistral releases: the 20 legacy
# names, fillers, then [ARGS] [CALL_ID] [THINK] [/THINK] at 32..35).
MODERN_SPECIALS = [
    *LEGACY_SPECIAL_TOKENS,
    *[f"<SPECIAL_{i}>" for i in range(20, 32)],
    "[ARGS]",
    "[CALL_ID]",
    "[THINK]",
    "[/THINK]",
]
# v15 files as mistral-common's own tests build them: [ARGS] [CALL_ID] at 32, 33, [THINK] [/THINK] at 35, 36,
# [MODEL_SETTINGS] [/MODEL_SETTINGS] at 37, 38, and a model_settings_builder.
V15_SPECIALS = [
    *LEGACY_SPECIAL_TOKENS,
    *[f"<SPECIAL_{i}>" for i in range(20, 32)],
    "[ARGS]",
    "[CALL_ID]",
    "<SPECIAL_34>",
    "[THINK]",
    "[/THINK]",
    "[MODEL_SETTINGS]",
    "[/MODEL_SETTINGS]",
]
EFFORT_NONE_HIGH = {"type": "enum", "accepts_none": True, "default": "none", "values": ["none", "high"]}
JSON_SCHEMA_SETTING = {"type": "json_schema", "accepts_none": False, "default": None}
#: reasoning_effort none / high (default none) and the response format's schema
V15_BUILDER = {"reasoning_effort": EFFORT_NONE_HIGH, "json_schema": JSON_SCHEMA_SETTING}

_NEMO_JSON: dict[str, Any] = {}


def build_tekken(
    directory: Path,
    version: str,
    specials: Sequence[str],
    builder: Mapping[str, Any] | None = None,
    name: str | None = None,
) -> Path:
    """A ``tekken_<name>.json`` in ``directory``: the Nemo vocabulary with this version, specials and builder."""
    assert DATA is not None
    if not _NEMO_JSON:
        _NEMO_JSON.update(json.loads((DATA / NEMO).read_text(encoding="utf-8")))
    return write_tekken_file(_NEMO_JSON, directory / f"tekken_{name or version}.json", version, specials, builder)


def common_form(messages: Any) -> Any:
    """The messages with Mistral-API thinking chunks (``thinking`` a list of text chunks) in mistral-common's form
    (``thinking`` a string), which is all mistral-common takes; we take both and join the texts."""
    if not isinstance(messages, list):
        return messages
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            content = [
                {**c, "thinking": "".join(t["text"] for t in c["thinking"])}
                if isinstance(c, dict) and c.get("type") == "thinking" and isinstance(c.get("thinking"), list)
                else c
                for c in content
            ]
            m = {**m, "content": content}
        out.append(m)
    return out


def oracle_encode(mt: Any, messages: Any, tools: Any, safe_prompt: bool, cfm: bool, **settings: Any) -> list[int]:
    """mistral-common's tokens for a request (its refusals raise)."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    msgs = ([{"role": "system", "content": SAFE_PROMPT}] if safe_prompt else []) + common_form(messages)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        req = ChatCompletionRequest.from_openai(
            json.loads(json.dumps(msgs)), tools=tools, continue_final_message=cfm, **settings
        )
        return mt.encode_chat_completion(req).tokens


_ORACLES: dict[Path, Any] = {}


def oracle_tokenizer(path: Path) -> Any:
    """mistral-common's MistralTokenizer for ``path`` (test validation mode), loaded once per session."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    if path not in _ORACLES:
        _ORACLES[path] = MistralTokenizer.from_file(str(path), mode=ValidationMode.test)
    return _ORACLES[path]
