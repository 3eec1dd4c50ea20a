"""The tokenizer metadata of a GGUF file, in the form llama.cpp reads (`tokenizer.ggml.*`), for save_gguf.

llama.cpp does not read tokenizer files: a GGUF carries its vocabulary as metadata, and llama.cpp refuses a file
without it.  Two of its tokenizer models cover Mistral's two tokenizer kinds:

* SentencePiece (tokenizer.model.vN): tokenizer.ggml.model "llama".  Every piece is listed by id with its score
  and kind (tokenizer.ggml.tokens / scores / token_type; kinds are gguf.TokenType: NORMAL, UNKNOWN, CONTROL,
  USER_DEFINED, UNUSED, BYTE); llama.cpp re-runs SentencePiece's BPE from the scores (the pair of adjacent pieces
  whose union scores highest merges first), with byte fallback to the <0xNN> pieces.  Two normalizer settings
  travel as flags: add_space_prefix (SentencePiece's dummy prefix "▁" before the text) and
  remove_extra_whitespaces; both are read off the tokenizer's behaviour.  Any other normalization (NFKC) llama.cpp
  does not do: such a file is written with a warning.
* Tekken (tekken.json): tokenizer.ggml.model "gpt2" with pre-tokenizer "tekken" (llama.cpp's name for Mistral
  Nemo's regex), i.e. byte-level BPE.  tokens are the special tokens' names, then every token's bytes spelled in
  GPT-2's byte-to-character alphabet (a printable character per byte, so "Ġ" is a space); tiktoken's vocabulary
  has ranks but no merge list, so the merges are derived: every split of a token into two tokens is one merge, and
  merges are ordered by the rank of the token they make, which is the order tiktoken merges in.

Both: bos/eos/unk ids (and pad where the tokenizer has one), add_bos_token true, add_eos_token false, as
Mistral's instruct formats start every sequence with <s>.  A model whose embedding has more rows than the
tokenizer has tokens gets "[PAD{id}]" UNUSED tokens for the rest (llama.cpp requires one token per row).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mistral_ref.checkpoint.errors import CheckpointError
from mistral_ref.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# gguf.TokenType values (llama.cpp's llama_token_type), named here so this module reads without the package.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68 bytes take
    the characters from U+0100 on, in byte order (so the space 0x20 is U+0120 "Ġ", the newline "Ċ")."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = [""] * 256, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_ALPHABET = _byte_alphabet()


def _spell(data: bytes) -> str:
    return "".join(BYTE_ALPHABET[b] for b in data)


def sentencepiece_vocab(path: Path) -> dict[str, Any]:
    """tokenizer.ggml.* of a SentencePiece model file (model "llama")."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                     UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    # The normalizer, read off its behaviour: a dummy prefix makes "a" start with "▁"; collapsing white space
    # loses the second space of "a  b"; anything else that changes text is a normalization llama.cpp lacks.
    space_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    collapse = sp.decode(sp.encode("a  b")) != "a  b"
    probe = "ﬁ Ⅻ ｶ e\u0301"  # changed by NFKC / NFC
    if sp.decode(sp.encode(probe)) != probe:
        log.warning("%s normalizes text (e.g. NFKC): llama.cpp does not, so its token ids will differ from "
                    "SentencePiece's for such text", path)
    meta: dict[str, Any] = {
        "model": "llama", "tokens": tokens, "scores": scores, "token_type": types,
        "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "unknown_token_id": sp.unk_id(),
        "add_space_prefix": space_prefix, "remove_extra_whitespaces": collapse,
    }
    if sp.pad_id() >= 0:
        meta["padding_token_id"] = sp.pad_id()
    return meta


def tekken_merges(pieces: list[bytes], first: int) -> list[str]:
    """BPE merges "left right" (GPT-2 spelling) that reproduce tiktoken's ranks: for each token, ranks from
    `first` on in order, every split into two tokens of the vocabulary, the splits ordered by their pieces' ranks."""
    rank = {p: i for i, p in enumerate(pieces) if i >= first}
    merges = []
    for i in range(first, len(pieces)):
        token = pieces[i]
        splits = [(rank[token[:k]], rank[token[k:]]) for k in range(1, len(token))
                  if token[:k] in rank and token[k:] in rank]
        merges += [f"{_spell(pieces[a])} {_spell(pieces[b])}" for a, b in sorted(splits)]
    return merges


def tekken_vocab(tok: Tokenizer) -> dict[str, Any]:
    """tokenizer.ggml.* of a tekken tokenizer (model "gpt2", pre-tokenizer "tekken")."""
    n_special = tok.num_special_tokens
    names = sorted(tok.special_tokens, key=tok.special_tokens.__getitem__)
    pieces = tok.token_bytes_table()
    tokens = names + [_spell(p) for p in pieces[n_special:]]
    specials = tok.special_tokens
    meta: dict[str, Any] = {
        "model": "gpt2", "pre": "tekken", "tokens": tokens,
        "token_type": [CONTROL] * n_special + [NORMAL] * (len(tokens) - n_special),
        "merges": tekken_merges(pieces, n_special),
        "bos_token_id": specials["<s>"], "eos_token_id": specials["</s>"], "unknown_token_id": specials["<unk>"],
    }
    if tok.pad_id is not None:
        meta["padding_token_id"] = tok.pad_id
    return meta


def tokenizer_metadata(tokenizer: Tokenizer | str | Path, vocab_size: int) -> dict[str, Any]:
    """{key after "tokenizer.ggml.": value} for `tokenizer` (a Tokenizer, its file or its checkpoint directory),
    padded to `vocab_size` tokens.  Raises CheckpointError if the tokenizer has more tokens than the model has
    embedding rows, or is of a kind llama.cpp has no model for."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    if tok.kind == "sentencepiece":
        meta = sentencepiece_vocab(Path(tok.path))
    elif tok.kind == "tekken":
        meta = tekken_vocab(tok)
    else:
        raise CheckpointError(f"{tok.path}: a {tok.kind!r} tokenizer has no llama.cpp tokenizer model "
                              "(GGUF metadata is written for SentencePiece and tekken)")
    n = len(meta["tokens"])
    if n > vocab_size:
        raise CheckpointError(f"{tok.path}: the tokenizer has {n} tokens but the model's embedding only "
                              f"{vocab_size} rows: not this model's tokenizer")
    meta["tokens"] = meta["tokens"] + [f"[PAD{i}]" for i in range(n, vocab_size)]
    meta["token_type"] = meta["token_type"] + [UNUSED] * (vocab_size - n)
    if "scores" in meta:
        meta["scores"] = meta["scores"] + [-1000.0] * (vocab_size - n)
    meta.update(add_bos_token=True, add_eos_token=False)
    return meta


def add_tokenizer(writer: Any, meta: dict[str, Any]) -> None:
    """Write tokenizer_metadata(...) into a gguf.GGUFWriter."""
    writer.add_tokenizer_model(meta["model"])
    if "pre" in meta:
        writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    if "scores" in meta:
        writer.add_token_scores(meta["scores"])
    writer.add_token_types(meta["token_type"])
    if "merges" in meta:
        writer.add_token_merges(meta["merges"])
    writer.add_bos_token_id(meta["bos_token_id"])
    writer.add_eos_token_id(meta["eos_token_id"])
    writer.add_unk_token_id(meta["unknown_token_id"])
    if "padding_token_id" in meta:
        writer.add_pad_token_id(meta["padding_token_id"])
    writer.add_add_bos_token(meta["add_bos_token"])
    writer.add_add_eos_token(meta["add_eos_token"])
    if "add_space_prefix" in meta:
        writer.add_add_space_prefix(meta["add_space_prefix"])
        writer.add_remove_extra_whitespaces(meta["remove_extra_whitespaces"])
