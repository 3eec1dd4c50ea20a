"""A pytest plugin: the parity suite of mistral-ref against real weights, for any project.

    pytest --mistral-checkpoint /models/Mistral-7B-Instruct-v0.3 [--mistral-dtype bfloat16]

Installed with mistral-ref (entry point `pytest11`), so every project that has mistral-ref gets the options and
fixtures; the suite below is added to the run only when --mistral-checkpoint is given (collected from this
file; run it alone with `pytest --mistral-checkpoint DIR -p no:cacheprovider $(python -c "import
parity_oracles.pytest_plugin as p; print(p.__file__)")`, where each test is skipped without a checkpoint).

The suite, on the checkpoint (a native or HF directory, or a .gguf file):

  test_logits_match_transformers          mistral-ref vs transformers on the same ids, every layer recorded
                                          (parity.run_parity); passes within DEFAULT_TOLERANCE of the dtype
  test_greedy_tokens_match_transformers   the same run's greedy tokens, identical (or diverging only where
                                          transformers' own top-2 margin is within twice the largest logit
                                          difference of the probe: a near tie)
  test_cached_decode_matches_full_forward prefill half the probe into a KVCache, decode the rest token by token:
                                          the logits equal one full forward pass
  test_chunked_prefill_matches_full_forward  prefill in chunks of 3 tokens: the same
  test_chat_template_matches_mistral_common  chat requests encoded by mistral-ref and by mistral-common for the
                                          checkpoint's tokenizer file: identical token ids

Each test is skipped (saying why) when what it needs is missing: transformers, mistral-common, a tokenizer file.
Fixtures for a project's own tests: `mistral_checkpoint` (Path; skips without the option), `mistral_dtype`,
`mistral_probe` (token ids), `mistral_model` (mistral-ref's model, loaded once per session).

This module imports neither torch nor mistral_ref's model until a test runs: pytest imports every plugin at
start-up, in every project of the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

GREEDY_STEPS = 8
CHUNK = 3


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mistral-ref", "mistral-ref parity suite against real weights")
    group.addoption("--mistral-checkpoint", default=None, metavar="PATH",
                    help="run mistral-ref's parity suite on this checkpoint (directory or .gguf file)")
    group.addoption("--mistral-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the parity suite (default: float32)")
    group.addoption("--mistral-prompt", default=None, metavar="TEXT",
                    help="the probe text (default: parity.DEFAULT_PROMPT, or fixed ids without a tokenizer)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("mistral_checkpoint"):
        here = str(Path(__file__).resolve())
        if not any(Path(arg.split("::")[0]).resolve() == Path(here) for arg in config.args):
            config.args.append(here)  # collect the suite of this file too


# ---- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mistral_checkpoint(request: pytest.FixtureRequest) -> Path:
    """The checkpoint given with --mistral-checkpoint; skips the test without one."""
    path = request.config.getoption("mistral_checkpoint")
    if not path:
        pytest.skip("no checkpoint: run with --mistral-checkpoint PATH")
    path = Path(path)
    if not path.exists():
        raise pytest.UsageError(f"--mistral-checkpoint {path}: no such file or directory")
    return path


@pytest.fixture(scope="session")
def mistral_dtype(request: pytest.FixtureRequest) -> Any:
    """The suite's torch dtype (--mistral-dtype)."""
    from mistral_ref.checkpoint import parse_dtype

    return parse_dtype(request.config.getoption("mistral_dtype"))


@pytest.fixture(scope="session")
def mistral_probe(request: pytest.FixtureRequest, mistral_checkpoint: Path) -> list[int]:
    """The probe's token ids (parity.probe_tokens with --mistral-prompt)."""
    from mistral_ref.parity import probe_tokens

    return probe_tokens(mistral_checkpoint, prompt=request.config.getoption("mistral_prompt"))[0]


@pytest.fixture(scope="session")
def mistral_transformers_report(mistral_checkpoint: Path, mistral_probe: list[int], mistral_dtype: Any) -> Any:
    """One parity run against transformers (every layer, greedy decode), shared by the tests that read it."""
    pytest.importorskip("transformers")
    from mistral_ref.parity import run_parity

    return run_parity(mistral_checkpoint, "transformers", mistral_probe, dtype=mistral_dtype, layers=True,
                      generate=GREEDY_STEPS)


@pytest.fixture(scope="session")
def mistral_model(mistral_checkpoint: Path, mistral_dtype: Any) -> Any:
    """mistral-ref's model of the checkpoint, loaded once (memory-mapped where possible)."""
    from mistral_ref.checkpoint import load_model

    return load_model(mistral_checkpoint, dtype=mistral_dtype)


def _tolerance(dtype: Any) -> float:
    from mistral_ref.parity import DEFAULT_TOLERANCE

    return DEFAULT_TOLERANCE[dtype]


def _rel_err(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# ---- the suite (collected from this file when --mistral-checkpoint is given) -------------------------------
# transformers first: its run loads and frees its model before mistral_model is loaded for the rest.
def test_logits_match_transformers(mistral_transformers_report: Any) -> None:
    report = mistral_transformers_report
    assert report.passed, "\n" + report.table()


def test_greedy_tokens_match_transformers(mistral_transformers_report: Any) -> None:
    report = mistral_transformers_report
    g = report.greedy
    if g.first_divergence is not None:
        # Only a near tie may flip a greedy token: transformers' own top-2 margin there must be within twice the
        # largest logit difference the two sides showed on the probe.
        bound = 2 * report.logits_error.max_abs
        assert g.b_margin <= bound, (
            f"greedy tokens diverge at step {g.first_divergence}: mistral-ref {g.a_tokens}, transformers "
            f"{g.b_tokens}; transformers' top-2 margin there is {g.b_margin:.3g}, more than {bound:.3g}")


def _prefill_then_decode(model: Any, tokens: list[int], split: int, chunk: int | None) -> Any:
    """Logits (T, vocab) of `tokens` computed through a KVCache: positions < split in chunks of `chunk` (one
    pass if None), then one token at a time."""
    import torch

    from mistral_ref.cache import KVCache

    cache = KVCache(model.args, 1, len(tokens), model.dtype, model.device)
    out = []
    with torch.no_grad():
        starts = list(range(0, split, chunk or split)) + list(range(split, len(tokens)))
        ends = starts[1:] + [len(tokens)]
        for s, e in zip(starts, ends):
            out.append(model(torch.tensor([tokens[s:e]]), torch.arange(s, e)[None], cache)[0])
    return torch.cat(out)


def test_cached_decode_matches_full_forward(mistral_model: Any, mistral_probe: list[int], mistral_dtype: Any) -> None:
    import torch

    with torch.no_grad():
        full = mistral_model(torch.tensor([mistral_probe]))[0]
    cached = _prefill_then_decode(mistral_model, mistral_probe, max(1, len(mistral_probe) // 2), None)
    assert _rel_err(cached, full) <= _tolerance(mistral_dtype)


def test_chunked_prefill_matches_full_forward(mistral_model: Any, mistral_probe: list[int],
                                              mistral_dtype: Any) -> None:
    import torch

    with torch.no_grad():
        full = mistral_model(torch.tensor([mistral_probe]))[0]
    chunked = _prefill_then_decode(mistral_model, mistral_probe, len(mistral_probe), CHUNK)
    assert _rel_err(chunked, full) <= _tolerance(mistral_dtype)


CHAT_REQUESTS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris"}, {"role": "user", "content": "And of Italy?"}],
    [{"role": "user", "content": "Write 2 + 2."}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "Now with words, please: «deux plus deux»."}],
]


def test_chat_template_matches_mistral_common(mistral_checkpoint: Path) -> None:
    pytest.importorskip("mistral_common")
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mistral_ref.parity import tokenizer_dir
    from mistral_ref.tokenizer import TokenizerError, find_tokenizer_file, load_tokenizer

    try:
        file = find_tokenizer_file(tokenizer_dir(mistral_checkpoint))
    except TokenizerError as e:
        pytest.skip(str(e))
    ours, oracle = load_tokenizer(file), MistralTokenizer.from_file(str(file))
    for messages in CHAT_REQUESTS:
        want = oracle.encode_chat_completion(ChatCompletionRequest.from_openai(messages)).tokens
        assert ours.encode_chat(messages) == want, (file.name, messages)
