"""Tekken tokenizers (``tekken.json``): byte-level BPE run by ``tiktoken``.

File layout (see tokenizers/README.md): ``config`` holds the pre-tokenizer regex ``pattern``,
``default_vocab_size`` (131072), ``default_num_special_tokens`` (1000) and the instruct ``version``;
``vocab`` lists ``{rank, token_bytes (base64), token_str}`` by rank; ``special_tokens`` (optional up to v7)
lists ``{rank, token_str, is_control}``. Only the first ``vocab_size - num_special`` ranks are kept and
token id = rank + num_special; ids below num_special are the special tokens. v15 files add a
``model_settings_builder`` (:mod:`.settings`).
"""

from __future__ import annotations

import base64
import codecs
import json
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
            vocab_size = int(config["default_vocab_size"])
            num_special = int(config["default_num_special_tokens"])
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerError(f"{where}: missing or malformed tekken field {e}") from e
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

        inner = vocab_size - num_special
        if inner <= 256 or len(vocab) < inner:
            raise TokenizerError(
                f"{where}: vocab has {len(vocab)} entries, needs {inner} (= {vocab_size} - {num_special})"
            )
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
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read tekken json ({e})") from e
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
        ids = self._model.encode_ordinary(text)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

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
