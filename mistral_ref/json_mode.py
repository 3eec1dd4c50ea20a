"""A hand-written JSON grammar: constrained decoding explained from scratch (notebook 04 teaches with it).

This is a teaching example, not the runtime path: the chat API's structured outputs (``response_format``
json_object / json_schema, strict tool calls) run on llguidance through mistral_ref/grammar.py, which handles
any JSON schema.  Everything below works on its own as a :class:`JsonLogitsProcessor` in the one sampling path
(sampling.py, step 2): before each token is chosen, every token whose bytes cannot continue a valid JSON
document gets logit -inf.  EOS is allowed only once the top-level value is complete; special tokens never are.
So a generation that ends at EOS is always valid JSON; one cut by max_tokens may not be.

The grammar works on **bytes**, because that is what tokens are: a SentencePiece byte-fallback piece
``<0xE2>`` is one byte of a UTF-8 character, ``▁`` is a space, a Tekken token is any byte string.  Each
token's bytes come from ``tokenizer.id_to_bytes`` once per tokenizer (:class:`JsonVocab`).  Strings must also
be valid UTF-8 (a multi-byte character may be split across tokens), with escapes checked and control characters refused.

The JSON grammar is a pushdown automaton: a lexical state (51 states, below) plus a stack of open containers.
Both drivers read one table, ``NEXT[ctx, lex, byte] -> lex'`` and ``OP[ctx, lex, byte]`` (push {, push [,
pop), where ctx is the innermost open container (top level, object or array):

* :func:`advance` runs one byte string through it in Python (the state after a chosen token; the lazy checks);
* :meth:`JsonVocab.allowed` runs many tokens at once with numpy (a few vector operations per byte position
  over the tokens still alive; tokens are pre-filtered by first byte), giving the exact allowed mask of a
  state.  The part of a mask that cannot depend on the stack is computed once per lexical state and kept.

Per step the processor is lazy: with greedy decoding it checks tokens in descending logit order and stops at
the first allowed one (usually the first; after 32 misses, or when the state's mask is already cached, it
takes the masked argmax instead); when sampling it needs the exact mask (the draw may land on any allowed
token) and takes it from an LRU cache keyed by the full grammar state, computing it only on a miss — inside a
long string the state repeats, so most steps are hits.  ``benchmarks/bench_json_mode.py`` measures the cost.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

# ---- the grammar table -------------------------------------------------------------------------------------
TOP, OBJ, ARR = 0, 1, 2  # ctx: the innermost open container (TOP = none open)
OP_NONE, OP_PUSH_OBJ, OP_PUSH_ARR, OP_POP = 0, 1, 2, 3
REJECT = -1

_names: list[str] = []


def _state(name: str) -> int:
    _names.append(name)
    return len(_names) - 1


ROOT_OBJECT = _state("root: expect '{'")
VALUE = _state("expect a value")
OBJ_FIRST = _state("after '{': key or '}'")
OBJ_NEXT = _state("after ',' in an object: key")
AFTER_KEY = _state("after a key: ':'")
ARR_FIRST = _state("after '[': value or ']'")
AFTER_VALUE = _state("after a value")
# strings: the same 13 states for keys and for values; they differ only in where the closing quote leads
_STRING_PARTS = ("body", "escape", "u4", "u3", "u2", "u1", "cont1", "cont2", "cont3", "e0", "ed", "f0", "f4")
KEY = {p: _state(f"key string: {p}") for p in _STRING_PARTS}
STR = {p: _state(f"value string: {p}") for p in _STRING_PARTS}
NUM_MINUS, NUM_ZERO, NUM_INT, NUM_DOT, NUM_FRAC, NUM_E, NUM_E_SIGN, NUM_EXP = (
    _state(f"number: {p}") for p in ("-", "0", "int", ".", "frac", "e", "e sign", "exp"))
NUM_TERMINAL = (NUM_ZERO, NUM_INT, NUM_FRAC, NUM_EXP)  # a number may end here
LITERALS = {word: [_state(f"literal {word}: {i}") for i in range(1, len(word))]
            for word in ("true", "false", "null")}
N_STATES = len(_names)

WHITESPACE = b" \t\n\r"
DIGITS = b"0123456789"
HEX = b"0123456789abcdefABCDEF"


def _build_tables() -> tuple[np.ndarray, np.ndarray]:
    """NEXT, OP: (3, N_STATES, 256) int8 — the next lexical state (or REJECT) and the stack operation."""
    nxt = np.full((3, N_STATES, 256), REJECT, dtype=np.int8)
    op = np.zeros((3, N_STATES, 256), dtype=np.int8)

    def on(state: int, chars: bytes | range, to: int, o: int = OP_NONE,
           ctxs: Sequence[int] = (TOP, OBJ, ARR)) -> None:
        for c in ctxs:
            for b in chars:
                nxt[c, state, b], op[c, state, b] = to, o

    def value_starts(state: int) -> None:
        on(state, WHITESPACE, state)
        on(state, b"{", OBJ_FIRST, OP_PUSH_OBJ)
        on(state, b"[", ARR_FIRST, OP_PUSH_ARR)
        on(state, b'"', STR["body"])
        on(state, b"-", NUM_MINUS)
        on(state, b"0", NUM_ZERO)
        on(state, b"123456789", NUM_INT)
        for word, states in LITERALS.items():
            on(state, word[:1].encode(), states[0])

    on(ROOT_OBJECT, WHITESPACE, ROOT_OBJECT)
    on(ROOT_OBJECT, b"{", OBJ_FIRST, OP_PUSH_OBJ)
    value_starts(VALUE)
    value_starts(ARR_FIRST)
    on(ARR_FIRST, b"]", AFTER_VALUE, OP_POP, ctxs=(ARR,))
    on(OBJ_FIRST, WHITESPACE, OBJ_FIRST)
    on(OBJ_FIRST, b'"', KEY["body"])
    on(OBJ_FIRST, b"}", AFTER_VALUE, OP_POP, ctxs=(OBJ,))
    on(OBJ_NEXT, WHITESPACE, OBJ_NEXT)
    on(OBJ_NEXT, b'"', KEY["body"])
    on(AFTER_KEY, WHITESPACE, AFTER_KEY)
    on(AFTER_KEY, b":", VALUE)
    on(AFTER_VALUE, WHITESPACE, AFTER_VALUE)
    on(AFTER_VALUE, b",", OBJ_NEXT, ctxs=(OBJ,))
    on(AFTER_VALUE, b"}", AFTER_VALUE, OP_POP, ctxs=(OBJ,))
    on(AFTER_VALUE, b",", VALUE, ctxs=(ARR,))
    on(AFTER_VALUE, b"]", AFTER_VALUE, OP_POP, ctxs=(ARR,))

    for s, closed in ((KEY, AFTER_KEY), (STR, AFTER_VALUE)):
        body = s["body"]
        on(body, range(0x20, 0x80), body)  # printable ASCII and DEL; control characters are invalid in JSON
        on(body, b'"', closed)
        on(body, b"\\", s["escape"])
        on(body, range(0xC2, 0xE0), s["cont1"])  # UTF-8 lead bytes (RFC 3629 table of well-formed sequences)
        on(body, b"\xe0", s["e0"])
        on(body, range(0xE1, 0xED), s["cont2"])
        on(body, b"\xed", s["ed"])
        on(body, b"\xee\xef", s["cont2"])
        on(body, b"\xf0", s["f0"])
        on(body, range(0xF1, 0xF4), s["cont3"])
        on(body, b"\xf4", s["f4"])
        on(s["cont1"], range(0x80, 0xC0), body)
        on(s["cont2"], range(0x80, 0xC0), s["cont1"])
        on(s["cont3"], range(0x80, 0xC0), s["cont2"])
        on(s["e0"], range(0xA0, 0xC0), s["cont1"])  # no overlong 3-byte forms
        on(s["ed"], range(0x80, 0xA0), s["cont1"])  # no UTF-16 surrogates
        on(s["f0"], range(0x90, 0xC0), s["cont2"])  # no overlong 4-byte forms
        on(s["f4"], range(0x80, 0x90), s["cont2"])  # nothing above U+10FFFF
        on(s["escape"], b'"\\/bfnrt', body)
        on(s["escape"], b"u", s["u4"])
        on(s["u4"], HEX, s["u3"])
        on(s["u3"], HEX, s["u2"])
        on(s["u2"], HEX, s["u1"])
        on(s["u1"], HEX, body)

    on(NUM_MINUS, b"0", NUM_ZERO)
    on(NUM_MINUS, b"123456789", NUM_INT)
    on(NUM_INT, DIGITS, NUM_INT)
    for s in (NUM_ZERO, NUM_INT):
        on(s, b".", NUM_DOT)
        on(s, b"eE", NUM_E)
    on(NUM_DOT, DIGITS, NUM_FRAC)
    on(NUM_FRAC, DIGITS, NUM_FRAC)
    on(NUM_FRAC, b"eE", NUM_E)
    on(NUM_E, b"+-", NUM_E_SIGN)
    on(NUM_E, DIGITS, NUM_EXP)
    on(NUM_E_SIGN, DIGITS, NUM_EXP)
    on(NUM_EXP, DIGITS, NUM_EXP)
    for word, states in LITERALS.items():
        for i, s in enumerate(states):
            on(s, word[i + 1:i + 2].encode(), states[i + 1] if i + 1 < len(states) else AFTER_VALUE)

    # A number has no end marker: in a state where it may end, a byte that cannot continue it is read as the
    # first byte after the value ("1," "1}" "1 ").  Compose those entries with AFTER_VALUE's.
    for s in NUM_TERMINAL:
        free = nxt[:, s, :] == REJECT  # (3, 256)
        nxt[:, s, :] = np.where(free, nxt[:, AFTER_VALUE, :], nxt[:, s, :])
        op[:, s, :] = np.where(free, op[:, AFTER_VALUE, :], op[:, s, :])
    return nxt, op


NEXT, OP = _build_tables()
_NEXT_FLAT = NEXT.reshape(-1).astype(np.int16)  # index (ctx * N_STATES + lex) * 256 + byte
_OP_FLAT = OP.reshape(-1)
_NEXT_LIST: list[int] = _NEXT_FLAT.tolist()  # the same tables as Python lists, for the scalar driver
_OP_LIST: list[int] = _OP_FLAT.tolist()


class JsonState(NamedTuple):
    """Where a JSON document stands: the lexical state and the stack of open containers.

    stack: an int whose bit i is the type of the container i levels below the innermost (1 = array, 0 =
    object), so the innermost is bit 0; depth: how many containers are open.
    """

    lex: int
    stack: int = 0
    depth: int = 0

    @property
    def complete(self) -> bool:
        """True when the top-level value is finished (only whitespace may follow, and EOS may end
        generation)."""
        return self.depth == 0 and (self.lex == AFTER_VALUE or self.lex in NUM_TERMINAL)


def initial_state(root: str = "object") -> JsonState:
    """The state before any byte: root "object" (what json_object promises) or "any" (any JSON value)."""
    if root not in ("object", "any"):
        raise ValueError(f"root must be 'object' or 'any', got {root!r}")
    return JsonState(ROOT_OBJECT if root == "object" else VALUE)


def advance(state: JsonState, data: bytes) -> JsonState | None:
    """Run `data` through the grammar from `state`; return the new state, or None if the bytes are not valid JSON."""
    lex, stack, depth = state
    nxt, ops = _NEXT_LIST, _OP_LIST
    for b in data:
        ctx = 0 if depth == 0 else 1 + (stack & 1)
        i = ((ctx * N_STATES) + lex) * 256 + b
        lex = nxt[i]
        if lex < 0:
            return None
        o = ops[i]
        if o == OP_POP:
            stack >>= 1
            depth -= 1
        elif o:
            stack = (stack << 1) | (o - 1)
            depth += 1
    return JsonState(lex, stack, depth)


def is_complete_json(text: str, root: str = "object") -> bool:
    """True if `text` (UTF-8 encoded) is one complete JSON document of the grammar (whitespace around allowed)."""
    state = advance(initial_state(root), text.encode("utf-8"))
    return state is not None and state.complete


# ---- the vocabulary side -----------------------------------------------------------------------------------
_STACK_BITS = 62  # the stacked check keeps the innermost 62 levels in an int64: exact for tokens of <= 60 bytes


class JsonVocab:
    """A tokenizer's token bytes, arranged once for grammar checks (build cost: one id_to_bytes per token).

    A state's mask is split in two.  Most tokens never touch the stack from a given lexical state (string
    content, digits, whitespace, a key and its colon): whether they fit depends only on (lex, ctx), so that part
    is computed once per (lex, ctx) and kept.  The few that open or close a container (``"},``, ``[{``, ...) are
    run from the actual state, stack included.  Full masks are also kept in an LRU cache keyed by state.
    Tokens that are special or have no bytes (control pieces) are never allowed; EOS is handled by the caller.
    """

    def __init__(self, tokenizer: Any, cache_size: int = 256):
        V = tokenizer.vocab_size
        self.vocab_size = V
        specials = tokenizer.special_ids
        self.token_bytes: list[bytes] = [b"" if i in specials else tokenizer.id_to_bytes(i) for i in range(V)]
        lens = np.array([len(b) for b in self.token_bytes], dtype=np.int64)  # (V,)
        self.lens = lens
        nonempty = np.nonzero(lens > 0)[0]
        mat = np.zeros((V, int(lens.max()) if len(nonempty) else 1), dtype=np.uint8)  # (V, longest) zero-padded
        for i in nonempty.tolist():
            b = self.token_bytes[i]
            mat[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
        self.bytes_matrix = mat
        first = mat[nonempty, 0]
        self.by_first: list[np.ndarray] = [nonempty[first == b] for b in range(256)]  # ids by first byte
        self._free: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._cache: OrderedDict[JsonState, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size
        self.cache_hits = self.cache_misses = 0

    def allowed(self, state: JsonState) -> torch.Tensor:
        """(V,) bool: the tokens whose bytes can follow `state` (EOS and special tokens excluded)."""
        return ~self.blocked(state)

    def blocked(self, state: JsonState) -> torch.Tensor:
        """(V,) bool: the complement of :meth:`allowed` (what a processor sets to -inf).  Cached per state."""
        mask = self.cached(state)
        if mask is not None:
            self.cache_hits += 1
            return mask
        self.cache_misses += 1
        ctx = 0 if state.depth == 0 else 1 + (state.stack & 1)
        free, stacky = self._stack_free(state.lex, ctx)
        out = free.copy()
        out[stacky[self._run_with_stack(stacky, state)]] = True
        mask = torch.from_numpy(~out)
        self._cache[state] = mask
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return mask

    def cached(self, state: JsonState) -> torch.Tensor | None:
        """The blocked mask of `state` if it is in the cache, else None (computes nothing)."""
        mask = self._cache.get(state)
        if mask is not None:
            self._cache.move_to_end(state)
        return mask

    def _candidates(self, lex: int, ctx: int) -> np.ndarray:
        """Ids of the tokens whose first byte the grammar accepts in (lex, ctx)."""
        row = (ctx * N_STATES + lex) * 256
        firsts = np.nonzero(_NEXT_FLAT[row: row + 256] >= 0)[0].tolist()
        return np.concatenate([self.by_first[b] for b in firsts]) if firsts else np.zeros(0, dtype=np.int64)

    def _stack_free(self, lex: int, ctx: int) -> tuple[np.ndarray, np.ndarray]:
        """For (lex, ctx): (V,) bool of the tokens that fit without any stack operation, and the ids of the
        tokens that reach a stack operation while still fitting (to be checked against the real stack)."""
        key = (lex, ctx)
        if key in self._free:
            return self._free[key]
        free = np.zeros(self.vocab_size, dtype=bool)
        ids = self._candidates(lex, ctx)
        cur = np.full(len(ids), lex, dtype=np.int64)
        lens = self.lens[ids]
        stacky = []
        base, j = ctx * N_STATES * 256, 0
        while len(ids):
            i = base + cur * 256 + self.bytes_matrix[ids, j]
            cur = _NEXT_FLAT[i].astype(np.int64)
            o = _OP_FLAT[i]
            stacky.append(ids[(cur >= 0) & (o != OP_NONE)])
            plain = (cur >= 0) & (o == OP_NONE)  # ctx cannot change without a stack operation
            j += 1
            free[ids[plain & (lens == j)]] = True
            keep = plain & (lens > j)
            ids, cur, lens = ids[keep], cur[keep], lens[keep]
        self._free[key] = free, np.concatenate(stacky) if stacky else np.zeros(0, dtype=np.int64)
        return self._free[key]

    def _run_with_stack(self, ids: np.ndarray, state: JsonState) -> np.ndarray:
        """(n,) bool: which of the tokens `ids` fit after `state`, stack operations included."""
        ok = np.zeros(len(ids), dtype=bool)
        short = self.lens[ids] <= _STACK_BITS - 2
        for k in np.nonzero(~short)[0].tolist():  # a token that could pop past the 62 kept levels
            ok[k] = advance(state, self.token_bytes[int(ids[k])]) is not None
        rows = np.nonzero(short)[0]
        sub = ids[rows]
        lex = np.full(len(sub), state.lex, dtype=np.int64)
        stack = np.full(len(sub), state.stack & ((1 << _STACK_BITS) - 1), dtype=np.int64)
        depth = np.full(len(sub), state.depth, dtype=np.int64)
        lens = self.lens[sub]
        j = 0
        while len(sub):
            ctx = np.where(depth == 0, 0, 1 + (stack & 1))
            i = (ctx * N_STATES + lex) * 256 + self.bytes_matrix[sub, j]
            lex = _NEXT_FLAT[i].astype(np.int64)
            o = _OP_FLAT[i]
            push = (o == OP_PUSH_OBJ) | (o == OP_PUSH_ARR)
            pop = o == OP_POP
            stack = np.where(push, (stack << 1) | (o == OP_PUSH_ARR), np.where(pop, stack >> 1, stack))
            depth = depth + push - pop
            j += 1
            ok[rows[(lens == j) & (lex >= 0)]] = True
            keep = (lens > j) & (lex >= 0)
            rows, sub, lex, stack, depth, lens = rows[keep], sub[keep], lex[keep], stack[keep], depth[keep], lens[keep]
        return ok


_VOCABS: weakref.WeakKeyDictionary[Any, JsonVocab] = weakref.WeakKeyDictionary()


def json_vocab(tokenizer: Any) -> JsonVocab:
    """The :class:`JsonVocab` of `tokenizer`, built on first use and kept as long as the tokenizer lives."""
    vocab = _VOCABS.get(tokenizer)
    if vocab is None:
        vocab = _VOCABS[tokenizer] = JsonVocab(tokenizer)
    return vocab


# ---- the logits processor ----------------------------------------------------------------------------------
class JsonLogitsProcessor:
    """A sampling.LogitsProcessor that keeps each row's generated text valid JSON.

    tokenizer: gives the token bytes (via :func:`json_vocab`) and the EOS id; greedy: the sampler uses
    temperature 0, so only the best allowed token matters and the lazy path applies; root: "object" (default,
    what response_format json_object promises) or "any".

    Call it as ``proc(generated, logits)`` once per step, in order (generated: (B, n) tokens so far, logits:
    (B, V)); it advances each row's state with ``generated[:, -1]``.  ``states[b]`` is row b's JsonState.
    """

    def __init__(self, tokenizer: Any, greedy: bool = False, root: str = "object"):
        self.vocab = json_vocab(tokenizer)
        self.eos_id = tokenizer.eos_id
        self.greedy = greedy
        self.root = root
        self.states: list[JsonState | None] = []
        self.seen = 0
        self.lazy_checks = 0  # tokens checked one by one on the greedy path (for the benchmark)

    def _advance_rows(self, generated: torch.Tensor) -> None:
        n = generated.shape[1]
        if not self.states:
            self.states = [initial_state(self.root)] * generated.shape[0]
        if n == self.seen:
            return
        if n != self.seen + 1:
            raise ValueError(
                f"JsonLogitsProcessor must be called once per step (saw {self.seen} tokens, now {n})")
        for row, t in enumerate(generated[:, -1].tolist()):
            s = self.states[row]
            if s is not None:  # None: the row is finished (EOS) or frozen
                s = None if t == self.eos_id else advance(s, self.vocab.token_bytes[t])
                self.states[row] = s
        self.seen = n

    def __call__(self, generated: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """generated: (B, n) int64; logits: (B, V) fp32 -> logits with disallowed tokens at -inf (in
        place)."""
        self._advance_rows(generated)
        for row, state in enumerate(self.states):
            if state is None:
                continue  # finished row: its choice is ignored by the generate loop
            if self.greedy and self.vocab.cached(state) is None:
                best = self._best_allowed(state, logits[row])
                if best is not None:
                    value = logits[row, best].clone()
                    logits[row].fill_(float("-inf"))
                    logits[row, best] = value
                    continue
            blocked = self.vocab.blocked(state).to(logits.device)  # (V,)
            if state.complete:
                blocked = blocked.clone()
                blocked[self.eos_id] = False
            logits[row].masked_fill_(blocked, float("-inf"))
        return logits

    def _ok(self, state: JsonState, token: int) -> bool:
        if token == self.eos_id:
            return state.complete
        data = self.vocab.token_bytes[token]
        return bool(data) and advance(state, data) is not None

    def _best_allowed(self, state: JsonState, row: torch.Tensor, limit: int = 32) -> int | None:
        """The argmax of `row` over the allowed tokens (lowest id among ties), checking the best `limit` tokens one
        by one in descending order; None if none of them is allowed (the caller then builds the full mask)."""
        values, ids = row.topk(min(limit, row.shape[0]))
        for v, t in zip(values.tolist(), ids.tolist()):
            self.lazy_checks += 1
            if v == float("-inf"):
                return None
            if self._ok(state, t):
                ties = torch.nonzero(row == v)[:, 0].tolist()  # argmax takes the lowest id among equal maxima
                return min(u for u in ties if u == t or self._ok(state, u))
        return None
