"""SentencePiece tokenizers (instruct versions v1, v2, v3, v7) on top of the ``sentencepiece`` library.

Encoding is SentencePiece's own BPE, exactly as mistral-common calls it. Decoding with
``special="ignore"`` is SentencePiece's own decoder; ``"keep"`` and streaming use
:class:`SentencePieceStreamDecoder` (end of this module), which reproduces it piece by piece, so streaming and
one-shot decoding cannot disagree.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

from .base import SpecialPolicy, StreamDecoder, Tokenizer, check_policy
from .errors import TokenizerError

SPACE = "\u2581"  # "▁", SentencePiece's visible stand-in for a space
SENTENCEPIECE_VERSIONS = ("v1", "v2", "v3", "v7")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SUFFIX = re.compile(r"\.model\.(v\d+)(m\d+)?$")


def version_from_filename(path: str | Path) -> str | None:
    """``tokenizer.model.v3`` -> ``"v3"``, ``..._241114.model.v7m1`` -> ``"v7"``; ``None`` if unversioned."""
    m = _SUFFIX.search(Path(path).name)
    return m.group(1) if m else None


# ---------------------------------------------------------------------------------------------------
# SentencePiece's decoding rules, shared by decode(special="keep") and streaming (SentencePieceStreamDecoder)
# ---------------------------------------------------------------------------------------------------
# Piece kinds of a SentencePiece vocabulary (SentencePieceTokenizer._kinds).
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


class SentencePieceTokenizer(Tokenizer):
    """A ``tokenizer.model.vN`` file.

    Args:
        path: the SentencePiece model file.
        version: instruct version; default from the file name suffix (``.model.v3``), else inferred
            from the control pieces (``[INST]`` absent -> v1, ``[SYSTEM_PROMPT]`` -> v7, ``[IMG]`` -> v3,
            otherwise v2).
    """

    kind = "sentencepiece"

    def __init__(self, path: str | Path, version: str | None = None) -> None:
        self.path = Path(path)
        try:
            sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{self.path}: not a readable SentencePiece model ({e})") from e
        self._sp = sp
        n = sp.get_piece_size()
        self._pieces: list[str] = [sp.id_to_piece(i) for i in range(n)]
        kinds = bytearray(n)
        surface: list[str] = [""] * n
        byte_value = [0] * n
        specials: dict[str, int] = {}
        for i, piece in enumerate(self._pieces):
            if sp.is_control(i):
                kinds[i] = CONTROL
                specials[piece] = i
            elif sp.is_unknown(i):
                kinds[i] = UNKNOWN
                surface[i] = UNK_SURFACE
            elif sp.is_byte(i):
                m = _BYTE_PIECE.match(piece)
                if m is None:
                    raise TokenizerError(f"{self.path}: byte piece {i} is named {piece!r}, not <0xNN>")
                kinds[i] = BYTE
                byte_value[i] = int(m.group(1), 16)
            else:
                kinds[i] = NORMAL
                surface[i] = piece.replace(SPACE, " ")
        self._kinds = bytes(kinds)
        self._surface = surface
        self._byte_value = byte_value
        self._specials = specials
        self._control_ids = frozenset(specials.values())
        self._unk = sp.unk_id()

        inferred = self._infer_version()
        self.version = version or version_from_filename(self.path) or inferred
        if self.version not in SENTENCEPIECE_VERSIONS:
            raise TokenizerError(
                f"{self.path}: SentencePiece tokenizers exist for versions {SENTENCEPIECE_VERSIONS}, "
                f"not {self.version!r}"
            )

    def _infer_version(self) -> str:
        s = self._specials
        if "[INST]" not in s:
            return "v1"
        if "[SYSTEM_PROMPT]" in s:
            return "v7"
        if "[IMG]" in s or "[PREFIX]" in s:
            return "v3"
        return "v2"

    # ---- vocabulary ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of pieces (32000 for v1, 32768 for v2/v3/v7)."""
        return len(self._pieces)

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """The control pieces (``<s>``, ``</s>``, ``[INST]``, ..., ``[control_N]``)."""
        return self._specials

    @property
    def pad_id(self) -> int | None:
        """``None``: Mistral's SentencePiece files define no pad piece."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else None

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>`` (0). It is not a control token: SentencePiece prints it as ``" ⁇ "``."""
        return self._unk

    def id_to_piece(self, token_id: int) -> str:
        """The raw piece, e.g. ``"▁Hello"``, ``"<0x0A>"`` or ``"[INST]"``."""
        self.check_ids([token_id])
        return self._pieces[token_id]

    def id_to_bytes(self, token_id: int) -> bytes:
        """Bytes the token adds to the decoded text, with ``▁`` mapped to a space.

        Byte-fallback pieces give their single byte (``<0xE2>`` -> ``b"\\xe2"``), control pieces ``b""``,
        ``<unk>`` the UTF-8 of ``" ⁇ "``. Leading space: at the very start of a decoded sequence
        SentencePiece drops one leading space of the first visible piece (the dummy prefix added by
        ``encode``); ``id_to_bytes`` does not, so ``b"".join(id_to_bytes(t) for t in ids)`` equals
        ``decode(ids).encode()`` except for that one space when the first visible piece starts with ``▁``.
        """
        self.check_ids([token_id])
        kind = self._kinds[token_id]
        if kind == BYTE:
            return bytes((self._byte_value[token_id],))
        if kind == CONTROL:
            return b""
        return self._surface[token_id].encode("utf-8")

    # ---- text ---------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """SentencePiece encoding (with its dummy-prefix space); control pieces never come out of text.

        ``decode(encode(s)) == s`` for every string without U+2581 ("▁", which SentencePiece itself uses
        for spaces and so decodes as " ") and without lone surrogates (encoded as U+FFFD).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        try:
            return self._sp.encode(text, add_bos=bos, add_eos=eos)
        except RuntimeError:
            # Lone surrogates cannot be handed to SentencePiece: replace them by U+FFFD, as tiktoken does.
            clean = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            if clean == text:
                raise
            return self._sp.encode(clean, add_bos=bos, add_eos=eos)

    def decode(self, ids: Sequence[int], special: SpecialPolicy = "ignore") -> str:
        """Decode ids.

        ``"ignore"`` equals ``SentencePieceProcessor.decode`` (and mistral-common). ``"keep"`` inserts the
        control piece names (``<s>``, ``[INST]``) into the text at their positions; removing those names
        gives the ``"ignore"`` text. ``"raise"`` raises ``TokenizerError`` if any control token occurs.
        """
        check_policy(special)
        if not isinstance(ids, list):
            ids = list(ids)
        if special == "keep":
            dec = SentencePieceStreamDecoder(self, special)
            return dec.feed_many(ids) + dec.flush()
        if special == "raise" and not self._control_ids.isdisjoint(ids):
            first = next(t for t in ids if t in self._control_ids)
            raise TokenizerError(f"decode(special='raise') met the special token {self._pieces[first]!r}")
        try:
            return self._sp.decode(ids)
        except (IndexError, TypeError):  # sentencepiece checks ranges itself; report which id was bad
            self.check_ids(ids)
            raise

    def stream_decoder(self, special: SpecialPolicy = "ignore") -> SentencePieceStreamDecoder:
        """A streaming decoder whose deltas concatenate to ``decode(ids, special)``."""
        return SentencePieceStreamDecoder(self, special)


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
