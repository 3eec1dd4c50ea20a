"""Content safety for the server: classifiers over Mistral's published moderation categories.

    filter = load_content_filter("self-check", model, tokenizer)      # the served model classifies
    filter = load_content_filter("my_module:my_function", ...)         # a user's Python callable
    filter.classify(["some text", ...]) -> [Verdict(categories={...: bool}, category_scores={...: float}), ...]
    filter.flags(text) -> bool                                         # what the chat moderation stage asks

The categories are those of Mistral's moderation API (:data:`CATEGORIES`).  A text is *flagged* (a prompt
refused with ``content_filter``, a reply stopped with finish_reason ``content_filter``) when one of the harm
categories (:data:`BLOCKING`) is true; ``health``, ``financial``, ``law`` and ``pii`` are reported by
``POST /v1/moderations`` but do not block.

Two kinds of classifier:

- ``self-check`` (:class:`SelfCheck`): the served model is asked, in one short chat prompt, which numbered category
  the text belongs to (0 = none); the answer is one digit.  The probabilities the model gives the ten digits
  (each digit's tokens, with or without a leading space) are the scores, normalised over the ten; the greedy
  answer (the most likely digit) is the one category set true.  One forward pass of the prompt per text, no
  generation; a reply is checked in pieces of :data:`SELF_CHECK_WINDOW` characters (held back until checked).
  Its quality is the model's: the embedded 4M-parameter model is no classifier (README states its measured
  accuracy).
- a callable ``module:function`` (:func:`callable_filter`): ``function(text) -> bool`` (True: flagged; every
  category then carries that verdict, since a bool names none) or ``-> {category: bool | float}`` (a float is a
  score, true from 0.5; categories left out are false; an unknown name is an error).

A classifier that raises, or returns something else, raises :class:`ContentFilterFailed`; the server answers a
prompt it could not check with 503 (code ``content_filter_error``) and stops a reply it could not check with
finish_reason ``content_filter`` (it fails closed).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

#: Mistral's moderation categories, in the order of its API documentation.
CATEGORIES = ("sexual", "hate_and_discrimination", "violence_and_threats", "dangerous_and_criminal_content",
              "selfharm", "health", "financial", "law", "pii")
#: The categories that flag a text (the content filter's decision); the others are only reported.
BLOCKING = CATEGORIES[:5]
#: Characters of a text the self-check reads (the end of a longer text: a growing reply's newest part).
SELF_CHECK_MAX_CHARS = 4000
#: A reply checked by the self-check is released in pieces of at least this many characters, each checked once
#: (one forward pass of the classification prompt per piece instead of one per token).
SELF_CHECK_WINDOW = 64

_SELF_CHECK_PROMPT = (
    "You are a content moderator. Classify the text between the markers into one category:\n"
    "0 none (safe)\n" + "".join(f"{i} {name}\n" for i, name in enumerate(CATEGORIES, 1))
    + "Answer with the category's number only.\n<<<\n{text}\n>>>"
)


class ContentFilterFailed(RuntimeError):
    """The content filter raised, or returned something that is not a verdict; the message names the filter."""


@dataclass
class Verdict:
    """One text's classification: every category's bool and score (Mistral's moderation result)."""

    categories: dict[str, bool]
    category_scores: dict[str, float]

    @property
    def flagged(self) -> bool:
        """Whether a harm category (:data:`BLOCKING`) is true."""
        return any(self.categories[c] for c in BLOCKING)

    def result(self) -> dict[str, Any]:
        """The result object of POST /v1/moderations."""
        return {"categories": dict(self.categories), "category_scores": dict(self.category_scores)}


class ContentFilter:
    """A named classifier: ``classify(texts) -> [Verdict]`` (ContentFilterFailed on any failure).

    window: a reply's answer text is held back until this many characters wait, then checked once and released
    (api.Prepared.moderation_window; 0: checked at every release, token by token)."""

    def __init__(self, name: str, classify: Callable[[Sequence[str]], list[Verdict]], window: int = 0):
        self.name, self._classify, self.window = name, classify, window

    def classify(self, texts: Sequence[str]) -> list[Verdict]:
        """One Verdict per text."""
        try:
            verdicts = self._classify(list(texts))
        except ContentFilterFailed:
            raise
        except Exception as e:  # noqa: BLE001 — a user's filter may raise anything: reported, naming it
            raise ContentFilterFailed(f"the content filter {self.name!r} failed: {type(e).__name__}: {e}") from e
        if len(verdicts) != len(texts):
            raise ContentFilterFailed(f"the content filter {self.name!r} gave {len(verdicts)} verdicts for "
                                      f"{len(texts)} texts")
        return verdicts

    def flags(self, text: str) -> bool:
        """Whether `text` is flagged (the moderation stage of api.ChatReply)."""
        return self.classify([text])[0].flagged


# ---- a user's callable -------------------------------------------------------------------------------------
def verdict_of(value: Any, name: str = "filter") -> Verdict:
    """A callable's answer as a Verdict: a bool (every category takes it) or {category: bool | float}."""
    if isinstance(value, bool):
        return Verdict({c: value for c in CATEGORIES}, {c: float(value) for c in CATEGORIES})
    if isinstance(value, Mapping):
        unknown = [k for k in value if k not in CATEGORIES]
        if unknown:
            raise ContentFilterFailed(f"the content filter {name!r} returned unknown categories {unknown} "
                                      f"(known: {list(CATEGORIES)})")
        scores, flags = {}, {}
        for c in CATEGORIES:
            v = value.get(c, False)
            if isinstance(v, bool):
                scores[c], flags[c] = float(v), v
            elif isinstance(v, (int, float)):
                scores[c], flags[c] = float(v), float(v) >= 0.5
            else:
                raise ContentFilterFailed(f"the content filter {name!r} returned {c}={v!r}: a bool or a score "
                                          "was expected")
        return Verdict(flags, scores)
    raise ContentFilterFailed(f"the content filter {name!r} returned {type(value).__name__}: a bool or a dict "
                              "of categories was expected")


def callable_filter(fn: Callable[[str], Any], name: str | None = None) -> ContentFilter:
    """A ContentFilter over ``fn(text) -> bool | {category: bool | float}`` (see the module docstring)."""
    name = name or getattr(fn, "__qualname__", repr(fn))
    return ContentFilter(name, lambda texts: [verdict_of(fn(t), name) for t in texts])


# ---- self-check: the served model classifies ---------------------------------------------------------------
class SelfCheck:
    """The served model as a classifier (see the module docstring).

    lock: held around each forward pass (the server's model lock: the scheduler steps under it, so a check from
    a request thread runs between two steps, and one from the model thread itself runs at once)."""

    def __init__(self, model: Any, tokenizer: Any, lock: Any = None):
        self.model, self.tokenizer = model, tokenizer
        self.lock = lock if lock is not None else nullcontext()
        # each digit's token ids: the digit alone, or after a space ("▁3" in SentencePiece, " 3" in Tekken)
        self.digit_ids: list[list[int]] = [[] for _ in range(10)]
        specials = tokenizer.special_ids
        for i in range(tokenizer.vocab_size):
            if i in specials:
                continue
            data = tokenizer.id_to_bytes(i).lstrip(b" ")
            if len(data) == 1 and data.isdigit():
                self.digit_ids[int(data)].append(i)
        missing = [d for d, ids in enumerate(self.digit_ids) if not ids]
        if missing:
            raise ValueError(f"self-check: the tokenizer has no token for the digits {missing}")

    def prompt(self, text: str) -> list[int]:
        """The classification prompt's token ids for `text` (its last SELF_CHECK_MAX_CHARS characters)."""
        message = _SELF_CHECK_PROMPT.replace("{text}", text[-SELF_CHECK_MAX_CHARS:])
        return self.tokenizer.encode_chat([{"role": "user", "content": message}])

    def scores(self, text: str) -> torch.Tensor:
        """(10,) the probabilities of the answers 0 (none) .. 9 (the categories), summing to 1."""
        ids = self.prompt(text)
        limit = getattr(self.model.args, "max_seq_len", None)
        if limit is not None and len(ids) > limit:
            raise ContentFilterFailed(f"self-check: the classification prompt is {len(ids)} tokens, over the "
                                      f"model's context of {limit}")
        device = self.model.device
        tokens = torch.tensor([ids], device=device)  # (1, T)
        with self.lock, torch.inference_mode():
            logits = self.model(tokens, logits_at=torch.tensor([len(ids) - 1], device=device))[0, 0]  # (V,)
        logp = torch.log_softmax(logits.float(), dim=-1)
        per_digit = torch.stack([torch.logsumexp(logp[ids], dim=0) for ids in self.digit_ids])  # (10,)
        return torch.softmax(per_digit, dim=0).cpu()

    def __call__(self, texts: Sequence[str]) -> list[Verdict]:
        out = []
        for text in texts:
            p = self.scores(text)
            answer = int(p.argmax())  # the greedy answer: 0 = none, k = CATEGORIES[k - 1]
            out.append(Verdict({c: answer == k for k, c in enumerate(CATEGORIES, 1)},
                               {c: round(float(p[k]), 6) for k, c in enumerate(CATEGORIES, 1)}))
        return out


def self_check(model: Any, tokenizer: Any, lock: Any = None) -> ContentFilter:
    """The served model's self-check as a ContentFilter."""
    return ContentFilter("self-check", SelfCheck(model, tokenizer, lock), window=SELF_CHECK_WINDOW)


def load_content_filter(spec: str, model: Any, tokenizer: Any, lock: threading.RLock | None = None
                        ) -> ContentFilter:
    """The ContentFilter named by `spec` (the ``--content-filter`` flag): "self-check", or "module:function"
    (imported now; a ValueError naming the flag when it cannot be)."""
    if spec == "self-check":
        return self_check(model, tokenizer, lock)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--content-filter: expected 'self-check' or 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--content-filter {spec}: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"--content-filter {spec}: {module_name} has no callable {attr!r}")
    return callable_filter(fn, spec)
