"""The tokenizer interface shared by the SentencePiece and Tekken implementations."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .chat import encode_chat
from .errors import TokenizerError
from .settings import ModelSettingsSpec
from .templates import render_fim, template_for
from .toolcalls import parse_assistant

SpecialPolicy = Literal["ignore", "keep", "raise"]
"""What ``decode`` does with special (control) tokens: drop them, print their names, or raise."""

_POLICIES = ("ignore", "keep", "raise")


def check_policy(special: str) -> str:
    """Return ``special`` if it is a valid special-token policy, else raise ``TokenizerError``."""
    if special not in _POLICIES:
        raise TokenizerError(f"special must be one of {_POLICIES}, got {special!r}")
    return special


class StreamDecoder(ABC):
    """Incremental detokenizer: feed ids one at a time, get text deltas back.

    The concatenation of every ``feed`` result and the final ``flush`` equals
    ``tokenizer.decode(all_ids, special)``. Bytes of an incomplete UTF-8 character are held back until
    the character completes (or until ``flush``). Each ``feed`` costs O(1) amortised.
    """

    @abstractmethod
    def feed(self, token_id: int) -> str:
        """Add one token id and return the newly decodable text (possibly ``""``)."""

    def feed_many(self, token_ids: Iterable[int]) -> str:
        """Feed several ids; return the concatenated deltas."""
        return "".join(self.feed(t) for t in token_ids)

    @abstractmethod
    def flush(self) -> str:
        """Return the held-back tail (incomplete UTF-8 becomes U+FFFD) and reset to a fresh stream."""


class Tokenizer(ABC):
    """A Mistral tokenizer: text <-> ids, special tokens, streaming decode, chat templates.

    Attributes:
        kind: ``"sentencepiece"`` or ``"tekken"``.
        version: instruct version, one of :data:`~mistral_ref.tokenizer.VERSIONS`; selects the chat template (its row in
            :data:`~mistral_ref.tokenizer.templates.TEMPLATES`).
        path: the file the tokenizer was loaded from (``None`` if built in memory).
        model_settings: the settings a v15 model takes (its tekken.json's ``model_settings_builder``); ``None``
            for every other file.
    """

    kind: str
    version: str
    path: Path | None
    model_settings: ModelSettingsSpec | None = None

    # ---- vocabulary ---------------------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (special ids included); valid ids are ``0 .. vocab_size - 1``."""

    @property
    @abstractmethod
    def special_tokens(self) -> Mapping[str, int]:
        """Name -> id of every special (control) token, e.g. ``{"<s>": 1, "[INST]": 3, ...}``."""

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special (control) tokens."""
        ids = getattr(self, "_special_id_set", None)
        if ids is None:
            ids = frozenset(self.special_tokens.values())
            self._special_id_set = ids
        return ids

    def is_special(self, token_id: int) -> bool:
        """True if ``token_id`` is a special (control) token; these never come out of ``encode``."""
        return token_id in self.special_ids

    def has_special(self, name: str) -> bool:
        """True if the vocabulary defines the special token ``name`` (e.g. ``"[ARGS]"``)."""
        return name in self.special_tokens

    def special_id(self, name: str) -> int:
        """Id of the special token ``name`` (e.g. ``"[INST]"``); ``TokenizerError`` if undefined."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise TokenizerError(
                f"{self.kind} tokenizer {self.version} has no special token {name!r}"
            ) from None

    @property
    def bos_id(self) -> int:
        """Id of ``<s>``."""
        return self.special_id("<s>")

    @property
    def eos_id(self) -> int:
        """Id of ``</s>``."""
        return self.special_id("</s>")

    @property
    @abstractmethod
    def pad_id(self) -> int | None:
        """Id of ``<pad>``, or ``None`` when the vocabulary has none (all SentencePiece files)."""

    @property
    @abstractmethod
    def unk_id(self) -> int:
        """Id of ``<unk>``."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """Display form of one token (SentencePiece: the raw piece such as ``"▁Hello"`` or ``"<0x0A>"``)."""

    @abstractmethod
    def id_to_bytes(self, token_id: int) -> bytes:
        """Raw bytes one token contributes to the decoded text (``b""`` for special tokens)."""

    def token_bytes_table(self) -> list[bytes]:
        """``id_to_bytes`` of every id, indexed by id (for constrained decoding: build masks once)."""
        return [self.id_to_bytes(i) for i in range(self.vocab_size)]

    def check_ids(self, ids: Sequence[int]) -> None:
        """Raise ``TokenizerError`` if any id is outside ``0 .. vocab_size - 1``."""
        if not ids:
            return
        n = self.vocab_size
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise TokenizerError(f"token id {bad} is out of range for a vocabulary of {n}")

    # ---- text ---------------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode ``text`` as ordinary tokens (never control tokens), optionally adding BOS/EOS."""

    @abstractmethod
    def decode(self, ids: Sequence[int], special: SpecialPolicy = "ignore") -> str:
        """Decode ids to text; ``special`` says whether control tokens are dropped, kept or rejected."""

    @abstractmethod
    def stream_decoder(self, special: SpecialPolicy = "ignore") -> StreamDecoder:
        """A fresh :class:`StreamDecoder` for this vocabulary."""

    # ---- chat ---------------------------------------------------------------------------------------
    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        safe_prompt: bool = False,
        continue_final_message: bool = False,
        reasoning_effort: str | None = None,
        response_format: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """Encode a chat-completions request with the template of ``self.version``.

        Args:
            messages: OpenAI / Mistral-API style dicts (roles system, user, assistant, tool); content is a string
                or a list of chunks: ``{"type": "text", "text": ...}`` and, where the version writes thinking
                (v13: assistant and system, v15: assistant), ``{"type": "thinking", "thinking": ..., "closed":
                bool}``.
            tools: ``[{"type": "function", "function": {name, description, parameters}}]`` or ``None``.
            safe_prompt: prepend Mistral's safety system prompt as a first system message.
            continue_final_message: the last message is an assistant prefix to continue (no EOS).
            reasoning_effort: ``"none"`` ... ``"max"``, written in v15's model settings (refused before v15).
            response_format: ``{"type": "text" | "json_object" | "json_schema", ...}``; v15 models whose file
                takes a ``json_schema`` setting get its schema in the model settings.

        Returns:
            Token ids, starting with exactly one BOS.

        Raises:
            ChatTemplateError: the request is invalid for this version (the message says what to change).
        """
        return encode_chat(
            self,
            messages,
            tools=tools,
            safe_prompt=safe_prompt,
            continue_final_message=continue_final_message,
            reasoning_effort=reasoning_effort,
            response_format=response_format,
        )

    def encode_fim(self, prompt: str, suffix: str | None = None) -> list[int]:
        """Encode a fill-in-the-middle request: ``<s>[SUFFIX]suffix[PREFIX]prompt`` (v2 and newer).

        The model then writes the text that goes between ``prompt`` and ``suffix``; without a suffix it simply
        continues the prompt. Token-identical to mistral-common's ``encode_fim``.

        Raises:
            ChatTemplateError: the version has no fill-in-the-middle (v1), or an argument is not a string.
        """
        return render_fim(self, template_for(self.version), prompt, suffix)

    def parse_assistant(self, ids: Sequence[int], rng: random.Random | None = None) -> dict[str, Any]:
        """Turn generated ids into ``{"content": ..., "tool_calls": [...]}`` for this version.

        ``content`` is the text (``None`` when blank and there are tool calls), or, when the model thought
        (``[THINK]…[/THINK]``), a list of Mistral-API content chunks: ``{"type": "thinking", "thinking": [{"type":
        "text", "text": ...}], "closed": bool}`` and ``{"type": "text", "text": ...}``, in order.
        Malformed tool-call syntax becomes plain content; this never raises on model output.
        ``rng`` makes the generated tool-call ids reproducible.
        """
        return parse_assistant(self, ids, rng=rng)

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path is not None else ""
        return (
            f"<{type(self).__name__} kind={self.kind} version={self.version} vocab={self.vocab_size}{where}>"
        )
