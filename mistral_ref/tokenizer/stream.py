"""Incremental (streaming) detokenizers, one per tokenizer kind.

Both keep O(1) state: a handful of pending bytes of an unfinished UTF-8 character, plus (SentencePiece)
whether the sequence has produced its first visible piece yet. ``decode`` of the tokenizers with
``special="keep"`` is built on these classes, so streaming and one-shot decoding cannot disagree.
"""

from __future__ import annotations

import codecs
from typing import TYPE_CHECKING

from .base import StreamDecoder, check_policy
from .errors import TokenizerError

if TYPE_CHECKING:  # pragma: no cover
    from .sentencepiece import SentencePieceTokenizer
    from .tekken import TekkenTokenizer

# Piece kinds of a SentencePiece vocabulary (see SentencePieceTokenizer._kinds).
NORMAL, CONTROL, BYTE, UNKNOWN = 0, 1, 2, 3

UNK_SURFACE = " \u2047 "  # what SentencePiece prints for <unk>: " ⁇ "


def _utf8_length(lead: int) -> int:
    """Length of a well-formed UTF-8 sequence starting with ``lead``; 0 if it cannot start one."""
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def _second_byte_ok(lead: int, second: int) -> bool:
    """Whether ``second`` may follow ``lead`` in well-formed UTF-8 (no overlongs, surrogates, > U+10FFFF)."""
    if lead == 0xE0:
        return 0xA0 <= second <= 0xBF
    if lead == 0xED:
        return 0x80 <= second <= 0x9F
    if lead == 0xF0:
        return 0x90 <= second <= 0xBF
    if lead == 0xF4:
        return 0x80 <= second <= 0x8F
    return 0x80 <= second <= 0xBF


def _could_complete(pending: bytearray | bytes) -> bool:
    """True if ``pending`` (shorter than its lead byte announces) is a prefix of a well-formed character."""
    if len(pending) >= 2 and not _second_byte_ok(pending[0], pending[1]):
        return False
    return all(0x80 <= b <= 0xBF for b in pending[2:])


def sentencepiece_bytes_to_text(buf: bytearray, final: bool) -> str:
    """Decode and consume the decodable head of ``buf`` with SentencePiece's byte-fallback rules.

    SentencePiece turns every byte that is not part of a well-formed character into its own U+FFFD
    (``<0xE2><0x82>`` -> two replacement characters), unlike Python's ``errors="replace"``, which
    replaces maximal invalid subsequences. With ``final=False`` an unfinished but still valid
    character stays in ``buf``.
    """
    out: list[str] = []
    i, n = 0, len(buf)
    while i < n:
        lead = buf[i]
        if lead < 0x80:
            out.append(chr(lead))
            i += 1
            continue
        need = _utf8_length(lead)
        if need == 0:
            out.append("\ufffd")
            i += 1
            continue
        if i + need > n:
            if not final and _could_complete(buf[i:]):
                break
            out.append("\ufffd")
            i += 1
            continue
        try:
            out.append(bytes(buf[i : i + need]).decode("utf-8"))
            i += need
        except UnicodeDecodeError:
            out.append("\ufffd")
            i += 1
    del buf[:i]
    return "".join(out)


class SentencePieceStreamDecoder(StreamDecoder):
    """Streaming decoder reproducing ``SentencePieceProcessor.decode``.

    Rules (verified against sentencepiece by property tests):
    * ``▁`` prints as a space; the *first visible piece* of the sequence loses one leading ``▁``
      (the dummy prefix SentencePiece adds when encoding). Control tokens are invisible and do not
      count as the first piece; a byte piece or ``<unk>`` does count (and keeps its bytes).
    * consecutive byte pieces ``<0xNN>`` are joined and decoded as UTF-8, one U+FFFD per stray byte;
      any other piece (control tokens included) ends the byte run.
    * ``<unk>`` prints as ``" ⁇ "``.
    """

    def __init__(self, tok: SentencePieceTokenizer, special: str = "ignore") -> None:
        self._special = check_policy(special)
        self._kinds = tok._kinds
        self._surface = tok._surface
        self._byte = tok._byte_value
        self._pieces = tok._pieces
        self._at_start = True
        self._buf = bytearray()

    def feed(self, token_id: int) -> str:
        """Add one id; return the text it completes."""
        try:
            if token_id < 0:
                raise IndexError
            kind = self._kinds[token_id]
        except (IndexError, TypeError):
            raise TokenizerError(
                f"token id {token_id!r} is out of range for a vocabulary of {len(self._kinds)}"
            ) from None
        if kind == BYTE:
            self._at_start = False
            self._buf.append(self._byte[token_id])
            return sentencepiece_bytes_to_text(self._buf, final=False)
        out = sentencepiece_bytes_to_text(self._buf, final=True) if self._buf else ""
        if kind == NORMAL:
            text = self._surface[token_id]
            if self._at_start:
                self._at_start = False
                if text.startswith(" "):
                    text = text[1:]
            return out + text
        if kind == UNKNOWN:
            self._at_start = False
            return out + UNK_SURFACE
        if self._special == "raise":
            raise TokenizerError(f"decode(special='raise') met the special token {self._pieces[token_id]!r}")
        if self._special == "keep":
            return out + self._pieces[token_id]
        return out

    def flush(self) -> str:
        """Emit pending bytes (as U+FFFD if incomplete) and start a new sequence."""
        out = sentencepiece_bytes_to_text(self._buf, final=True) if self._buf else ""
        self._at_start = True
        return out


class TekkenStreamDecoder(StreamDecoder):
    """Streaming decoder reproducing mistral-common's Tekken decode.

    Ordinary tokens are raw bytes decoded as UTF-8 with ``errors="replace"`` (Python's incremental
    decoder gives exactly the one-shot result). A special token ends the current run of ordinary
    tokens: its unfinished bytes are flushed as U+FFFD, as mistral-common decodes each run separately.
    """

    def __init__(self, tok: TekkenTokenizer, special: str = "ignore") -> None:
        self._special = check_policy(special)
        self._bytes = tok._token_bytes
        self._names = tok._special_names
        self._num_special = tok.num_special_tokens
        self._dec = codecs.getincrementaldecoder("utf-8")("replace")

    def feed(self, token_id: int) -> str:
        """Add one id; return the text it completes."""
        if token_id >= self._num_special:
            try:
                return self._dec.decode(self._bytes[token_id])
            except (IndexError, TypeError):
                raise TokenizerError(
                    f"token id {token_id!r} is out of range for a vocabulary of {len(self._bytes)}"
                ) from None
        if token_id < 0:
            raise TokenizerError(
                f"token id {token_id} is out of range for a vocabulary of {len(self._bytes)}"
            )
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        if self._special == "raise":
            raise TokenizerError(f"decode(special='raise') met the special token {self._names[token_id]!r}")
        if self._special == "keep":
            return out + self._names[token_id]
        return out

    def flush(self) -> str:
        """Emit pending bytes (as U+FFFD if incomplete) and start a new sequence."""
        out = self._dec.decode(b"", final=True)
        self._dec.reset()
        return out
