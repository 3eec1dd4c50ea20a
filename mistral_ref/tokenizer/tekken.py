r"""Tekken tokenizers (``tekken.json``): byte-level BPE run by ``tiktoken``.

File layout (see tokenizers/README.md): ``config`` holds the pre-tokenizer regex ``pattern``,
``default_vocab_size`` (131072), ``default_num_special_tokens`` (1000) and the instruct ``version``;
``vocab`` lists ``{rank, token_bytes (base64), token_str}`` by rank; ``special_tokens`` (optional up to v7)
lists ``{rank, token_str, is_control}``. Only the first ``vocab_size - num_special`` ranks are kept and
token id = rank + num_special; ids below num_special are the special tokens. v15 files add a
``model_settings_builder`` (:mod:`.settings`).

Long runs of white space: tiktoken's regex engine (fancy-regex) gives up on the alternative ``\s+(?!\S)`` once a
run of white space without a line break reaches about a million characters, and tiktoken's ``encode_ordinary``
then panics (pyo3's ``PanicException``, not an ``Exception``; its ``encode``, which mistral-common calls, raises
a ValueError).  :meth:`TekkenTokenizer.encode` therefore cuts such runs (from
:data:`LONG_SPACE_RUN` characters on) out of the text and byte-pair-encodes them itself as the single pre-token
the regex would have made; see :func:`_split_long_space_runs` for why the ids stay identical.
"""

from __future__ import annotations

import base64
import codecs
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import tiktoken

from .base import SpecialPolicy, StreamDecoder, Tokenizer, check_policy
from .errors import TokenizerError
from .settings import ModelSettingsSpec
from .templates import TEMPLATES, VERSIONS

#: The special tokens of tekken files up to v7 that carry no ``special_tokens`` list (ids 0..19);
#: ids 20..num_special-1 are then named ``<SPECIAL_20>`` ... ``<SPECIAL_999>``.
LEGACY_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)  # fmt: skip

#: The most special-token slots a file may declare (published files: 1000); more is a corrupt file, refused
#: before a name list of that length is built.
MAX_SPECIAL_TOKENS = 100_000

#: The pre-tokenizer regex of every published tekken file (the long-run handling below is derived from it).
TEKKEN_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Runs of white space without a line break at least this long are byte-pair-encoded without the regex (tiktoken
#: panics from about 1,000,000; shorter runs take the same path so that tests can compare it with mistral-common).
LONG_SPACE_RUN = 4096
# \s of the Rust regex crate (Unicode White_Space); Python's \s also matches U+001C..U+001F, which are not.
_WHITE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_LONG_WHITE_RUN = re.compile(f"(?<![{_WHITE}])[{_WHITE}]{{{LONG_SPACE_RUN},}}")  # whole runs only


def _split_long_space_runs(text: str) -> list[tuple[str, bool]]:
    r"""Cut ``text`` into ``(part, is_one_pretoken)``: regex-encoded parts and long white-space pre-tokens.

    Under :data:`TEKKEN_PATTERN`, a maximal run of white space W (followed by non-space B, or by the end) is
    pre-tokenized as: (line breaks at its start, possibly eaten by a punctuation match before it), then
    everything up to its last line break (``\s*[\r\n]+``), then the rest R, which has no line break:
    ``\s+(?!\S)`` takes all of R at the end of the text, otherwise all of R but its last character (which is
    then matched together with B).  So the full text has a pre-token boundary where R starts; the regex run on
    the text up to there makes the same matches (nothing before can reach past a line break into R); and the
    regex has no look-behind, so matching after the pre-token is the same as in the full text.  Encoding the
    parts separately therefore gives exactly the ids of encoding the whole text.
    """
    parts: list[tuple[str, bool]] = []
    start = 0
    for m in _LONG_WHITE_RUN.finditer(text):
        i, j = m.span()
        last_break = max(text.rfind("\n", i, j), text.rfind("\r", i, j))
        r = last_break + 1 if last_break >= 0 else i  # R = text[r:j]
        if j - r < LONG_SPACE_RUN:
            continue  # a short R: the regex copes
        end = j if j == len(text) else j - 1
        parts += [(text[start:r], False), (text[r:end], True)]
        start = end
    parts.append((text[start:], False))
    return parts


def _config_int(config: Mapping[str, Any], name: str, where: str) -> int:
    try:
        return int(config[name])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise TokenizerError(
            f"{where}: missing or malformed tekken field config.{name} (expected an integer, found "
            f"{config.get(name)!r:.60})"
        ) from None


def _tiktoken_is_linear() -> bool:
    """tiktoken < 0.13 merges a long pre-token (e.g. 10,000 times the same letter) in quadratic time."""
    try:
        major, minor = (int(x) for x in tiktoken.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return True
    return (major, minor) >= (0, 13)


class TekkenTokenizer(Tokenizer):
    """A Tekken tokenizer.

    Args:
        data: the parsed ``tekken.json``.
        path: where it came from (for messages and ``repr``).
    """

    kind = "tekken"

    def __init__(self, data: Mapping[str, Any], path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        where = str(path) if path is not None else "tekken data"
        try:
            config = data["config"]
            vocab = data["vocab"]
            pattern = config["pattern"]
            len(vocab)
        except (KeyError, TypeError) as e:
            raise TokenizerError(f"{where}: missing or malformed tekken field {e}") from e
        vocab_size = _config_int(config, "default_vocab_size", where)
        num_special = _config_int(config, "default_num_special_tokens", where)
        if not 0 <= num_special <= MAX_SPECIAL_TOKENS:
            raise TokenizerError(
                f"{where}: config.default_num_special_tokens={num_special} is outside 0..{MAX_SPECIAL_TOKENS} "
                "(published files: 1000): corrupt file"
            )
        if not num_special + 256 < vocab_size <= num_special + len(vocab):
            raise TokenizerError(
                f"{where}: config.default_vocab_size={vocab_size} needs {vocab_size - num_special} vocab "
                f"entries after the {num_special} special tokens, but the file has {len(vocab)} "
                "(and at least 257 are needed): corrupt file"
            )
        version = config.get("version")
        if version not in VERSIONS:
            raise TokenizerError(f"{where}: unsupported tekken version {version!r}; supported: {VERSIONS}")
        self.version = version

        listed = data.get("special_tokens")
        if listed is None:
            if VERSIONS.index(version) > VERSIONS.index("v7"):
                raise TokenizerError(
                    f"{where}: tekken files of version {version} must list their special_tokens"
                )
            names = list(LEGACY_SPECIAL_TOKENS)
        else:
            names = []
            for i, tok in enumerate(listed):
                if tok.get("rank") != i:
                    raise TokenizerError(
                        f"{where}: special_tokens[{i}] has rank {tok.get('rank')}, expected {i}"
                    )
                names.append(tok["token_str"])
        if len(names) > num_special:
            raise TokenizerError(f"{where}: {len(names)} special tokens listed but only {num_special} slots")
        names += [f"<SPECIAL_{i}>" for i in range(len(names), num_special)]
        if len(set(names)) != len(names):
            raise TokenizerError(f"{where}: special token names are not unique")

        inner = vocab_size - num_special  # 256 < inner <= len(vocab), checked above
        # ids are rank + num_special; tiktoken only compares ranks, so offsetting them keeps every merge
        # identical and makes tiktoken return final ids directly.
        ranks: dict[bytes, int] = {}
        token_bytes: list[bytes] = [b""] * vocab_size
        for i in range(inner):
            entry = vocab[i]
            if entry["rank"] != i:
                raise TokenizerError(f"{where}: vocab[{i}] has rank {entry['rank']}")
            b = base64.b64decode(entry["token_bytes"])
            if i < 256 and b != bytes((i,)):
                raise TokenizerError(f"{where}: rank {i} must be the single byte {i}, got {b!r}")
            ranks[b] = i + num_special
            token_bytes[i + num_special] = b
        if len(ranks) != inner:
            raise TokenizerError(f"{where}: duplicate token_bytes in the first {inner} ranks")
        if not _tiktoken_is_linear():
            warnings.warn(
                f"tiktoken {tiktoken.__version__} encodes long runs of one character in quadratic time; "
                "install tiktoken>=0.13",
                RuntimeWarning,
                stacklevel=2,
            )
        builder = data.get("model_settings_builder")
        if builder is not None and not TEMPLATES[version].model_settings:
            raise TokenizerError(f"{where}: model_settings_builder is for v15 files; this one is {version}")
        self.model_settings = ModelSettingsSpec.from_json(builder, where) if builder is not None else None
        self._model = tiktoken.Encoding(
            name=f"tekken-{version}", pat_str=pattern, mergeable_ranks=ranks, special_tokens={}
        )
        self._vocab_size = vocab_size
        self.num_special_tokens = num_special
        self._token_bytes = token_bytes
        self._special_names = names
        self._specials = {name: i for i, name in enumerate(names)}
        self.pattern = pattern

    @classmethod
    def from_file(cls, path: str | Path) -> TekkenTokenizer:
        """Load a ``tekken*.json`` file."""
        path = Path(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, or an int of > 4300 digits
            raise TokenizerError(f"{path}: cannot read tekken json ({e})") from None
        return cls(data, path)

    # ---- vocabulary ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """``default_vocab_size`` of the file (131072), special ids included."""
        return self._vocab_size

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """All ``num_special_tokens`` names, fillers ``<SPECIAL_N>`` included."""
        return self._specials

    @property
    def pad_id(self) -> int | None:
        """Id of ``<pad>`` (11 in all published files)."""
        return self._specials.get("<pad>")

    @property
    def unk_id(self) -> int:
        """Id of ``<unk>`` (0)."""
        return self.special_id("<unk>")

    def is_special(self, token_id: int) -> bool:
        """Special tokens are exactly the ids below ``num_special_tokens``."""
        return 0 <= token_id < self.num_special_tokens

    def id_to_piece(self, token_id: int) -> str:
        """Special-token name, or the token's bytes decoded as UTF-8 (partial characters -> U+FFFD)."""
        self.check_ids([token_id])
        if token_id < self.num_special_tokens:
            return self._special_names[token_id]
        return self._token_bytes[token_id].decode("utf-8", "replace")

    def id_to_bytes(self, token_id: int) -> bytes:
        """The token's raw bytes; ``b""`` for special tokens. Tekken adds no implicit spaces."""
        self.check_ids([token_id])
        return self._token_bytes[token_id]

    def token_bytes_table(self) -> list[bytes]:
        """Raw bytes of every id (``b""`` for the special ids), indexed by id."""
        return list(self._token_bytes)

    # ---- text ---------------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Byte-level BPE of ``text``; special-token names in the text stay ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        if len(text) < LONG_SPACE_RUN or self.pattern != TEKKEN_PATTERN:
            ids = self._encode_ordinary(text)
        else:
            ids = []
            for part, is_one_pretoken in _split_long_space_runs(text):
                ids += self._model._encode_single_piece(part) if is_one_pretoken else self._encode_ordinary(part)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        """tiktoken's encoding; a failure of its regex becomes TokenizerError."""
        try:
            return self._model.encode_ordinary(text)
        except BaseException as e:
            # tiktoken reports a regex failure (e.g. out of backtracking stack) as a ValueError from some entry
            # points and as a Rust panic from others: pyo3's PanicException, a BaseException not importable by name
            if not isinstance(e, ValueError) and type(e).__name__ != "PanicException":
                raise
            raise TokenizerError(
                f"tiktoken failed on a text of {len(text)} characters with this tekken pattern: {e}"
            ) from None

    def decode(self, ids: Sequence[int], special: SpecialPolicy = "ignore") -> str:
        """Decode ids like mistral-common: each run of ordinary tokens is decoded on its own.

        ``"keep"`` writes special tokens by name, ``"ignore"`` drops them, ``"raise"`` raises
        ``TokenizerError``. Bytes of a run that do not form UTF-8 become U+FFFD.
        """
        check_policy(special)
        if not isinstance(ids, list):
            ids = list(ids)
        if not ids:
            return ""
        nsp = self.num_special_tokens
        lo = min(ids)
        if lo < 0:
            self.check_ids(ids)
        if lo >= nsp:  # no special token: one call into tiktoken
            try:
                return self._model.decode_bytes(ids).decode("utf-8", "replace")
            except (KeyError, OverflowError, TypeError):
                self.check_ids(ids)
                raise
        self.check_ids(ids)
        parts: list[str] = []
        for is_special, group in groupby(ids, lambda t: t < nsp):
            if is_special:
                if special == "raise":
                    first = next(group)
                    raise TokenizerError(
                        f"decode(special='raise') met the special token {self._special_names[first]!r}"
                    )
                if special == "keep":
                    parts.extend(self._special_names[t] for t in group)
            else:
                parts.append(self._model.decode_bytes(list(group)).decode("utf-8", "replace"))
        return "".join(parts)

    def stream_decoder(self, special: SpecialPolicy = "ignore") -> TekkenStreamDecoder:
        """A streaming decoder whose deltas concatenate to ``decode(ids, special)``."""
        return TekkenStreamDecoder(self, special)


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
