"""Exceptions raised by the tokenizer package.

Both derive from ``ValueError`` so callers that already catch ``ValueError`` keep working.
"""

from __future__ import annotations


class TokenizerError(ValueError):
    """A tokenizer file cannot be used, or a token id / special-token name is not in the vocabulary."""


class ChatTemplateError(ValueError):
    """A chat request that the template of this tokenizer version cannot encode.

    The message names the offending message index and says what to change.
    """
