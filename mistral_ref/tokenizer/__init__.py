"""Mistral tokenizers and chat templates, token-identical to mistral-common.

* :func:`load_tokenizer` reads ``tokenizer.model.v1/v2/v3/v7`` (SentencePiece) or ``tekken.json``
  (Tekken, any version) or a checkpoint directory holding one.
* :class:`Tokenizer` encodes/decodes text, names special tokens, streams text out of generated ids,
  encodes chat requests (:meth:`Tokenizer.encode_chat`) and fill-in-the-middle requests
  (:meth:`Tokenizer.encode_fim`), and parses tool calls and thinking back (:meth:`Tokenizer.parse_assistant`).
* :data:`TEMPLATES` is the chat template of every version as a table (one :class:`ChatTemplate` row each).

Modules, each importing only those above it: ``errors``; ``settings`` (v15's model settings); ``templates`` (the
table and the encoder); ``chat`` (requests) and ``toolcalls`` (parsing calls and thinking back); ``base`` (the
interface); ``sentencepiece`` and ``tekken`` (each with its stream decoder); ``files`` (loading).

Only ``sentencepiece`` and ``tiktoken`` are needed: this package never imports torch.
"""

from __future__ import annotations

from .base import SpecialPolicy, StreamDecoder, Tokenizer
from .chat import SAFE_PROMPT, encode_chat, system_prompt_message
from .errors import ChatTemplateError, TokenizerError
from .files import (
    find_system_prompt,
    find_tokenizer_file,
    load_tokenizer,
    mistral_common_data_dir,
    write_tekken_file,
)
from .sentencepiece import SentencePieceTokenizer
from .settings import REASONING_EFFORTS, ModelSettingsSpec
from .tekken import LEGACY_SPECIAL_TOKENS, TekkenTokenizer
from .templates import TEMPLATES, VERSIONS, ChatTemplate
from .toolcalls import parse_assistant, thinking_chunk

__all__ = [
    "REASONING_EFFORTS",
    "VERSIONS",
    "SAFE_PROMPT",
    "LEGACY_SPECIAL_TOKENS",
    "TEMPLATES",
    "ChatTemplate",
    "ChatTemplateError",
    "ModelSettingsSpec",
    "SentencePieceTokenizer",
    "SpecialPolicy",
    "StreamDecoder",
    "TekkenTokenizer",
    "Tokenizer",
    "TokenizerError",
    "encode_chat",
    "find_system_prompt",
    "find_tokenizer_file",
    "load_tokenizer",
    "mistral_common_data_dir",
    "parse_assistant",
    "system_prompt_message",
    "thinking_chunk",
    "write_tekken_file",
]
