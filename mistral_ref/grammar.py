"""Constrained decoding: one logits processor that keeps generated text inside a grammar (llguidance).

Structured outputs (``response_format`` ``json_object`` / ``json_schema``) and constrained tool calls all plug
:class:`GrammarLogitsProcessor` into the one sampling path (sampling.py, step 2): before each token is chosen,
every token whose bytes cannot continue the grammar gets logit -inf, and EOS is allowed only where the grammar
may end.  So a generation that ends at EOS (finish_reason "stop") is always a complete document of the
grammar; one cut by max_tokens may not be.

The grammar engine is `llguidance <https://github.com/guidance-ai/llguidance>`_ (a Rust library: an Earley
parser over a lexer, with token masks computed over a token trie, typically tens of microseconds per step).
It needs each token's **bytes** (:func:`ll_tokenizer`): a SentencePiece byte-fallback piece ``<0xE2>`` is
one byte, ``▁`` is a space, a Tekken token is any byte string; special tokens are marked special (the grammar
never produces them, except EOS where it may end).

Limits that keep a weak model from filling the context inside one token class: whitespace between JSON
tokens is at most :data:`MAX_WHITESPACE` characters of ``[ \\n]`` (no tabs, no runs of blank lines), and
a run of digits (a number's integer part, fraction or exponent; digits in a string too) is at most
:data:`MAX_NUMBER_DIGITS` long unless the grammar needs more (the processor drops digit tokens past the bound
when something else fits), and a JSON string is at most :data:`MAX_STRING_BYTES` bytes of source text between its
quotes (``GrammarLogitsProcessor(max_string_bytes=...)``): past the bound only tokens that close the string are
allowed, whatever the schema's ``maxLength`` (a string the grammar needs longer, by ``minLength`` or a
``pattern``, still gets its bytes).
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

MAX_WHITESPACE = 2
MAX_NUMBER_DIGITS = 16
MAX_STRING_BYTES = 512
_WHITESPACE = f"[ \\n]{{0,{MAX_WHITESPACE}}}"
_JSON_OPTIONS = {"whitespace_pattern": _WHITESPACE}


class GrammarError(ValueError):
    """A grammar or JSON schema llguidance cannot compile; the message names the unsupported feature."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # pragma: no cover - the `grammar` extra installs it
        raise ImportError("constrained decoding needs llguidance: pip install 'mistral-ref[grammar]'") from e
    return llguidance


def _bytes_to_close(data: bytes) -> int:
    """Bytes of `data` before the '"' that closes a JSON string it continues (len(data) if none does)."""
    escaped = False
    for k, b in enumerate(data):
        if escaped:
            escaped = False
        elif b == 0x5C:  # backslash
            escaped = True
        elif b == 0x22:  # '"'
            return k
    return len(data)


class _StringState:
    """Where a row's generated text is with respect to JSON strings: inside one (and how many bytes in), after a
    backslash there."""

    def __init__(self):
        self.inside, self.escaped, self.run = False, False, 0

    def feed(self, data: bytes) -> None:
        for b in data:
            if not self.inside:
                if b == 0x22:
                    self.inside, self.run = True, 0
            elif self.escaped:
                self.escaped, self.run = False, self.run + 1
            elif b == 0x5C:
                self.escaped, self.run = True, self.run + 1
            elif b == 0x22:
                self.inside, self.run = False, 0
            else:
                self.run += 1


# ---- the tokenizer -----------------------------------------------------------------------------------------
class _TokenBytes:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS / BOS, special ids, and an encode callable."""

    def __init__(self, tokenizer: Any):
        specials = tokenizer.special_ids
        # special tokens: 0xFF + their name (llguidance's convention: no text can produce the 0xFF byte)
        self.tokens = [b"\xff" + tokenizer.id_to_piece(i).encode("utf-8") if i in specials
                       else tokenizer.id_to_bytes(i) for i in range(tokenizer.vocab_size)]
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = sorted(specials)
        self._tokenizer = tokenizer
        # digit runs, for the number bound: leading digits of each token, trailing digits, all digits
        lead, trail = [], []
        for data in self.tokens:
            stripped = data.lstrip(b"0123456789")
            lead.append(len(data) - len(stripped))
            trail.append(len(data) - len(data.rstrip(b"0123456789")))
        self.lead_digits = np.array(lead, dtype=np.int64)  # (V,)
        self.trail_digits = np.array(trail, dtype=np.int64)  # (V,)
        self.all_digits = (self.lead_digits > 0) & (self.lead_digits == np.array([len(t) for t in self.tokens]))
        # strings, for the string bound: bytes before each token's first unescaped '"' when it is read inside a
        # string (its length if it has none); special tokens never continue a string
        self.to_close = np.array([_bytes_to_close(data) for data in self.tokens], dtype=np.int64)  # (V,)
        self.to_close[sorted(specials)] = 0
        # too_long[r]: (ceil(V / 32),) int32 bitmask of the tokens that would make a run of r digits too long
        words = (len(self.tokens) + 31) // 32
        self.too_long = []
        for r in range(MAX_NUMBER_DIGITS + 1):
            bits = np.zeros(words * 32, dtype=bool)
            bits[: len(self.tokens)] = (self.lead_digits > 0) & (self.lead_digits + r > MAX_NUMBER_DIGITS)
            self.too_long.append(np.packbits(bits, bitorder="little").view(np.int32))

        # bytes -> id (a later id wins: SentencePiece's <0xNN> byte pieces come first, its text pieces after)
        self.ids: dict[bytes, int] = {data: i for i, data in enumerate(self.tokens) if data and i not in specials}
        self.longest = max(len(data) for data in self.ids)
        missing = [b for b in range(256) if bytes([b]) not in self.ids]
        if missing:
            raise GrammarError(f"the tokenizer cannot spell the bytes {missing[:8]} (no byte tokens)")

    def __call__(self, text: str | bytes) -> list[int]:
        """Token ids whose bytes are exactly `text`'s (llguidance relies on that): the tokenizer's encoding
        when it round-trips (SentencePiece adds a leading "▁"), else the longest token at each position."""
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        try:
            ids = self._tokenizer.encode(data.decode("utf-8"))
            if b"".join(self.tokens[i] for i in ids) == data:
                return ids
        except UnicodeDecodeError:
            pass
        ids, k = [], 0
        while k < len(data):
            n = min(self.longest, len(data) - k)
            while data[k:k + n] not in self.ids:
                n -= 1
            ids.append(self.ids[data[k:k + n]])
            k += n
        return ids


_LL_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer: Any) -> Any:
    """The llguidance.LLTokenizer of a mistral_ref Tokenizer (SentencePiece or Tekken), built once per tokenizer
    (one id_to_bytes per token; ~0.3 s for 32k tokens, ~1.5 s for 131k) and kept while the tokenizer lives."""
    return _vocab(tokenizer)[0]


def _vocab(tokenizer: Any) -> tuple[Any, _TokenBytes]:
    entry = _LL_TOKENIZERS.get(tokenizer)
    if entry is None:
        llg = _llguidance()
        data = _TokenBytes(tokenizer)
        entry = _LL_TOKENIZERS[tokenizer] = (llg.LLTokenizer(llg.TokenizerWrapper(data)), data)
    return entry


# ---- grammars ----------------------------------------------------------------------------------------------
def json_lark(schema: Mapping[str, Any] | bool) -> str:
    """A Lark expression for one JSON document of `schema` (llguidance's ``%json``), whitespace bounded."""
    body = dict(schema, **{"x-guidance": _JSON_OPTIONS}) if isinstance(schema, Mapping) else schema
    return "%json " + json.dumps(body)


def json_schema_grammar(schema: Mapping[str, Any] | bool | None = None) -> str:
    """The llguidance grammar of the JSON documents `schema` accepts (None: any JSON object, what json_object
    promises), after at most MAX_WHITESPACE leading spaces / newlines (a SentencePiece model's first token is
    often ``▁{``).  Whitespace inside is bounded too (MAX_WHITESPACE); numbers are bounded by the processor.

    Raises GrammarError naming the feature when llguidance does not support part of the schema (``if`` /
    ``then``, look-around in a ``pattern``, an unknown ``format`` ...)."""
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, (Mapping, bool)):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return lark_grammar(f"start: LEAD? doc\nLEAD: /{_WHITESPACE[:-5]}{{1,{MAX_WHITESPACE}}}/\n"
                        f"doc: {json_lark(schema)}\n")


def lark_grammar(lark: str) -> str:
    """The llguidance grammar of a Lark grammar text (``%json {...}`` embeds a JSON schema); GrammarError if invalid."""
    grammar = _llguidance().LLMatcher.grammar_from_lark(lark)
    check_grammar(grammar)
    return grammar


def check_grammar(grammar: str) -> None:
    """GrammarError with llguidance's message (which names the unsupported feature) if `grammar` is invalid."""
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:  # llguidance's message: "at LINE(COL): problem", then the grammar text; the problem is enough
        lines = []
        for line in (messages[0] if messages else "invalid grammar").splitlines():
            if re.match(r"\s*\d+ \|", line):
                break
            lines.append(line.strip())
        text = " ".join(x for x in lines if x and x != "^")
        raise GrammarError(re.sub(r"^at \d+\(\d+\): ", "", text))


# ---- the logits processor ----------------------------------------------------------------------------------
class GrammarLogitsProcessor:
    """A sampling.LogitsProcessor that keeps each row's generated tokens inside `grammar`.

    tokenizer: a mistral_ref Tokenizer (gives the token bytes and EOS); grammar: an llguidance grammar string
    (:func:`json_schema_grammar`, :func:`lark_grammar`).  Call it as ``proc(generated, logits)`` once per step,
    in order (generated: (B, n) tokens so far, logits: (B, V)); it first feeds each row's last token to that
    row's matcher, then sets every token the grammar refuses next to -inf.  A row that ended (EOS, or the
    grammar is finished) allows only EOS.  ``masks_computed`` counts mask computations (for the benchmark).
    """

    def __init__(self, tokenizer: Any, grammar: str, max_string_bytes: int = MAX_STRING_BYTES):
        llg = _llguidance()
        self.max_string_bytes = max_string_bytes
        self._llg = llg
        self.tokenizer, self._bytes = _vocab(tokenizer)
        self.grammar = grammar
        self.eos_id = tokenizer.eos_id
        self.matchers: list[Any] = []
        self.digit_runs: list[int] = []  # per row: how many digits the generated text ends with
        self.strings: list[_StringState] = []  # per row: inside a JSON string?
        self.seen = 0
        self.masks_computed = 0

    def _matcher(self) -> Any:
        m = self._llg.LLMatcher(self.tokenizer, self.grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return m

    def _advance_rows(self, generated: torch.Tensor) -> None:
        n = generated.shape[1]
        if not self.matchers:
            self.matchers = [self._matcher() for _ in range(generated.shape[0])]
            self.digit_runs = [0] * generated.shape[0]
            self.strings = [_StringState() for _ in range(generated.shape[0])]
        if n == self.seen:
            return
        if n != self.seen + 1:
            raise ValueError(f"GrammarLogitsProcessor must be called once per step (saw {self.seen} tokens, "
                             f"now {n})")
        tb = self._bytes
        for row, (m, t) in enumerate(zip(self.matchers, generated[:, -1].tolist())):
            if not m.is_stopped() and not m.is_error():
                m.consume_token(int(t))
            if t < len(tb.tokens):
                self.digit_runs[row] = self.digit_runs[row] + int(tb.lead_digits[t]) if tb.all_digits[t] \
                    else int(tb.trail_digits[t])
                if tb.to_close[t] or tb.tokens[t][:1] == b'"':  # (special tokens: 0)
                    self.strings[row].feed(tb.tokens[t])
        self.seen = n

    def bitmask(self, row: int = 0) -> np.ndarray:
        """(ceil(V / 32),) int32: bit i of word w set = token 32 w + i allowed next in row `row` (EOS included
        where the grammar may end; digits past the run bound dropped when something else fits)."""
        from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

        V = self.tokenizer.vocab_size
        bits = allocate_token_bitmask(1, V)  # (1, ceil(V / 32)) int32
        m = self.matchers[row]
        if m.is_error():  # cannot happen when the matcher is fed only tokens of its own masks; end the row
            bits[:] = 0
            bits[0, self.eos_id // 32] = np.int32(np.uint32(1 << (self.eos_id % 32)).view(np.int32))
            return bits[0]
        fill_next_token_bitmask(m, bits)
        self.masks_computed += 1
        bounded = bits[0] & ~self._bytes.too_long[min(self.digit_runs[row], MAX_NUMBER_DIGITS)]
        if not bounded.any():
            bounded = bits[0]  # the grammar needs more digits: let it have them
        s = self.strings[row]
        if s.inside and not s.escaped and s.run + self._bytes.longest > self.max_string_bytes:
            # (V,) tokens that would not close the string in time (past the bound, when the grammar needed more,
            # only a closing quote right away is in time)
            too_long = self._bytes.to_close + s.run > max(self.max_string_bytes, s.run)
            words = np.packbits(np.pad(too_long, (0, len(bounded) * 32 - len(too_long))), bitorder="little")
            closing = bounded & ~words.view(np.int32)
            if closing.any():  # else the grammar needs a longer string (minLength, a pattern): let it have it
                bounded = closing
        return bounded

    def allowed(self, row: int = 0) -> np.ndarray:
        """(V,) bool: the tokens row `row`'s grammar allows next (see :meth:`bitmask`)."""
        V = self.tokenizer.vocab_size
        return np.unpackbits(self.bitmask(row).view(np.uint8), bitorder="little")[:V].astype(bool)

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """generated: (B, n) int64; logits: (B, V) fp32 -> logits with refused tokens at -inf (in place)."""
        self._advance_rows(generated)
        V = self.tokenizer.vocab_size
        for row in range(len(self.matchers)):
            blocked = np.unpackbits((~self.bitmask(row)).view(np.uint8), bitorder="little")[:V].view(bool)  # (V,)
            if logits.device.type == "cpu":  # numpy fills a masked row in place ~25x faster than masked_fill_
                np.copyto(logits[row, :V].detach().numpy(), -np.inf, where=blocked)
            else:
                logits[row, :V].masked_fill_(torch.from_numpy(blocked).to(logits.device), float("-inf"))
            logits[row, V:] = float("-inf")  # a model vocabulary padded past the tokenizer's
        return logits

    def is_accepting(self, row: int = 0) -> bool:
        """True when row `row`'s text so far is a complete document of the grammar."""
        return bool(self.matchers) and self.matchers[row].is_accepting()


# ---- tool calls --------------------------------------------------------------------------------------------
def _lark_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a Lark string literal


def tool_call_grammar(tokenizer: Any, tools: list[Mapping[str, Any]], *, parallel: bool = True,
                      strict_only: bool = False) -> str:
    """The grammar of what follows the first ``[TOOL_CALLS]`` token: one call (``parallel=False``) or several,
    each naming one of `tools` (``{"type": "function", "function": {"name", "parameters", "strict"}}``) with
    arguments valid against that function's ``parameters`` schema (``strict_only``: only for functions marked
    ``"strict": true``; the others' arguments are any JSON object).  The syntax is the tokenizer version's
    (templates.py's ``tool_call``): a JSON list ``[{"name", "arguments"(, "id")}]`` for v2 / v3 / v7,
    ``name[CALL_ID]id[ARGS]{...}`` for v11, ``name[ARGS]{...}`` for v13 (repeated after ``[TOOL_CALLS]``).
    GrammarError naming the function when its parameters schema is not supported."""
    from mistral_ref.tokenizer.templates import template_for

    syntax = template_for(tokenizer.version).tool_call
    functions = []
    for tool in tools:
        fn = tool["function"]
        params = fn.get("parameters") or {"type": "object"}
        if strict_only and not fn.get("strict"):
            params = {"type": "object"}
        try:
            check_grammar(_llguidance().LLMatcher.grammar_from_lark("start: " + json_lark(params)))
        except (GrammarError, ValueError) as e:
            raise GrammarError(f"function {fn['name']!r}: its parameters schema is not supported: {e}") from None
        functions.append((fn["name"], params))
    if syntax in ("json", "json_id"):
        items = []
        for name, params in functions:
            props: dict[str, Any] = {"name": {"const": name}, "arguments": params}
            if syntax == "json_id":
                props["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
            items.append({"type": "object", "properties": props, "required": ["name", "arguments"],
                          "additionalProperties": False})
        calls = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
        if not parallel:
            calls["maxItems"] = 1
        return json_schema_grammar(calls)
    if syntax not in ("name_id_args", "name_args"):
        raise GrammarError(f"tokenizer {tokenizer.version} has no tool calls")
    args_id = tokenizer.special_id("[ARGS]")
    call_id = f'(<[{tokenizer.special_id("[CALL_ID]")}]> /[a-zA-Z0-9]{{9}}/)? ' if syntax == "name_id_args" else ""
    rules = [f"call_{k}: {_lark_string(name)} {call_id}<[{args_id}]> {json_lark(params)}"
             for k, (name, params) in enumerate(functions)]
    one = " | ".join(f"call_{k}" for k in range(len(functions)))
    more = f' (<[{tokenizer.special_id("[TOOL_CALLS]")}]> call)*' if parallel else ""
    return lark_grammar(f"start: call{more}\ncall: {one}\n" + "\n".join(rules) + "\n")


class AfterToken:
    """A logits processor that runs `inner` (a GrammarLogitsProcessor) on what each row generates after its first
    `token_id` (``[TOOL_CALLS]``); before that token the row is left alone.  Rows of one batch start their
    grammar at different steps, so each row gets its own inner processor."""

    def __init__(self, token_id: int, make_inner: Any):
        self.token_id = token_id
        self.make_inner = make_inner
        self.starts: list[int | None] = []
        self.inner: list[Any] = []

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """generated: (B, n); logits: (B, V) -> logits, masked for the rows past their `token_id`."""
        if not self.starts:
            self.starts = [None] * generated.shape[0]
            self.inner = [None] * generated.shape[0]
        for row in range(generated.shape[0]):
            if self.starts[row] is None and generated.shape[1] and generated[row, -1].item() == self.token_id:
                self.starts[row] = generated.shape[1]
                self.inner[row] = self.make_inner()
            start = self.starts[row]
            if start is not None:
                self.inner[row](generated[row:row + 1, start:], logits[row:row + 1])
        return logits
