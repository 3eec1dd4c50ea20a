"""Test helpers for the chat API, JSON mode and server tests: real tokenizers, tiny random-weight models.

The tokenizer files come from the installed mistral-common wheel (test assets, located with importlib; never
copied into the repository).  The models are random: what they say is noise, so tests that need a particular
output *steer* a random model with :class:`SteeredModel` — a fixed logit bias (e.g. make EOS and JSON
punctuation likely) and/or a script of tokens to emit at given positions (e.g. a well-formed tool call).
Everything else — the template, the sampling path, the constraints, the parsing — is the real code under test.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from mistral_ref.config import ModelArgs
from mistral_ref.model import Transformer
from mistral_ref.tokenizer import Tokenizer, load_tokenizer, mistral_common_data_dir

DATA = mistral_common_data_dir()
needs_tokenizer_files = pytest.mark.skipif(
    DATA is None, reason="the mistral-common wheel ships the tokenizer files"
)
SP_V3 = "mistral_instruct_tokenizer_240323.model.v3"
SP_V7 = "mistral_instruct_tokenizer_241114.model.v7"
TEKKEN_V3 = "tekken_240718.json"
_TOKENIZERS: dict[str, Tokenizer] = {}


def tokenizer(name: str) -> Tokenizer:
    """A tokenizer file of the mistral-common wheel, loaded once per test session (Tekken takes ~3 s)."""
    if name not in _TOKENIZERS:
        assert DATA is not None
        _TOKENIZERS[name] = load_tokenizer(DATA / name)
    return _TOKENIZERS[name]


class SteeredModel(Transformer):
    """A random-weight Transformer whose logits get ``bias`` (V,) added, plus +100 on ``script[k]`` at the position
    that predicts the k-th generated token (``script_start`` = prompt length).  Shapes as
    Transformer.forward."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.bias = torch.zeros(args.vocab_size)
        self.script: list[int] | None = None
        self.script_start = 0

    def steer(
        self, script: Sequence[int] | None = None, start: int = 0, bias: torch.Tensor | None = None
    ) -> SteeredModel:
        self.script, self.script_start = (list(script) if script is not None else None), start
        self.bias = bias if bias is not None else torch.zeros(self.args.vocab_size)
        return self

    def forward(self, tokens, positions=None, cache=None, logits_at=None):
        kw = {} if logits_at is None else {"logits_at": logits_at}  # (B,) the one position per row wanted
        logits = super().forward(tokens, positions, cache, **kw) + self.bias  # (B, T or 1, V)
        if self.script:
            if positions is None:
                positions = torch.arange(tokens.shape[1]).expand(tokens.shape)
            if logits_at is not None:
                positions = positions.gather(1, logits_at[:, None])  # (B, 1)
            k = positions + 1 - self.script_start  # index into the script of the token predicted there
            for b, t in ((k >= 0) & (k < len(self.script))).nonzero().tolist():
                logits[b, t, self.script[int(k[b, t])]] += 100.0
        return logits


def tiny_model(tok: Tokenizer, seed: int = 0, max_seq_len: int | None = None) -> SteeredModel:
    """A 2-layer GQA model (head_dim != dim / n_heads, sliding window 16) over `tok`'s vocabulary, fp32,
    eval."""
    torch.manual_seed(seed)
    args = ModelArgs(
        dim=32,
        n_layers=2,
        hidden_dim=64,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        vocab_size=tok.vocab_size,
        sliding_window=16,
        norm_eps=1e-5,
        max_seq_len=max_seq_len,
    )
    return SteeredModel(args).eval()


def punctuation_bias(tok: Tokenizer, strength: float = 4.0) -> torch.Tensor:
    """(V,) bias that makes EOS and the tokens made only of JSON punctuation likely (so JSON closes early)."""
    from mistral_ref.json_mode import json_vocab  # its token bytes are computed once per tokenizer

    bias = torch.zeros(tok.vocab_size)
    for i, data in enumerate(json_vocab(tok).token_bytes):  # b"" for special tokens
        if data and all(c in b'{}[]":,' for c in data):
            bias[i] = strength
    bias[tok.eos_id] = strength + 2.0
    return bias


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids oversubscription (10x faster here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
