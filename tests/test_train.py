"""The training loop and its data pipeline (mistral_ref.train, mistral_ref.train_data), on tiny configs.

Nothing here needs Django: conversations are built from a handful of hand-written string pairs and encoded
with the shipped tiny-mixtral tokenizer.
"""

from __future__ import annotations

import itertools
import random
import textwrap

import pytest
import torch

from mistral_ref import train_data as data
from mistral_ref.checkpoint import load_model
from mistral_ref.config import ModelArgs, MoeArgs
from mistral_ref.embedded import EMBEDDED_MODEL_DIR
from mistral_ref.tokenizer import load_tokenizer
from mistral_ref.train import (
    TINY_MIXTRAL,
    TrainConfig,
    batches_of,
    lr_at,
    make_batch,
    packed_rows,
    save_native,
    train,
)

PAIRS = [
    {"en": "Enter a valid URL.", "fr": "Saisissez une URL valide.", "de": "Bitte gültige Adresse eingeben.",
     "es": "Introduzca una URL válida.", "it": "Inserisci un URL valido."},
    {"en": "This field is required.", "fr": "Ce champ est obligatoire.",
     "de": "Dieses Feld ist zwingend erforderlich.",
     "es": "Este campo es obligatorio.", "it": "Campo obbligatorio."},
    {"en": "Save and continue editing", "fr": "Enregistrer et continuer les modifications"},
]
DOCS = ["Return the list of fields of this model.\nFields are ordered by creation.",
        "Renvoie la liste des champs.", "Gibt die Liste der Felder zurück."]

TINY = ModelArgs(dim=32, n_layers=2, head_dim=12, hidden_dim=48, n_heads=4, n_kv_heads=2, vocab_size=3072,
                 rope_theta=1e4, sliding_window=16, moe=MoeArgs(4, 2), max_seq_len=64)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(EMBEDDED_MODEL_DIR / "tokenizer.model.v3")


def _stream(tok, seed: int = 0, max_len: int = 65):
    return data.example_stream(tok, DOCS, PAIRS, seed=seed, max_len=max_len)


# ---- data --------------------------------------------------------------------------------------------------
def test_read_po_joins_lines_keeps_plurals_skips_header_and_fuzzy(tmp_path):
    po = tmp_path / "django.po"
    po.write_text(textwrap.dedent('''\
        # Translators:
        msgid ""
        msgstr ""
        "Language: fr\\n"

        #: forms.py:10
        msgid "Enter a valid "
        "email address."
        msgstr "Saisissez une adresse "
        "électronique valide."

        #, fuzzy
        msgid "Old"
        msgstr "Vieux"

        msgid "Untranslated"
        msgstr ""

        msgid "%(n)s item"
        msgid_plural "%(n)s items"
        msgstr[0] "%(n)s élément"
        msgstr[1] "%(n)s éléments"

        msgid "Say \\"hi\\""
        msgstr "Dis \\"salut\\""
        '''), encoding="utf-8")
    assert data.read_po(po) == [
        ("Enter a valid email address.", "Saisissez une adresse électronique valide."),
        ("%(n)s item", "%(n)s élément"), ("%(n)s items", "%(n)s éléments"),
        ('Say "hi"', 'Dis "salut"'),
    ]


def test_held_out_split_is_deterministic_and_about_five_percent():
    keys = [f"string number {i}" for i in range(4000)]
    held = [k for k in keys if data.is_held_out(k)]
    assert held == [k for k in keys if data.is_held_out(k)]
    assert 0.03 < len(held) / len(keys) < 0.07


def test_conversation_mask_covers_exactly_the_assistant_turns_and_their_eos(tok):
    messages, tools = data.tool_conversation(random.Random(3), "multiply")
    ids, mask = data.encode_conversation(tok, messages, tools)
    assert ids[:-1] == tok.encode_chat(messages, tools=tools, continue_final_message=True)
    assert ids[-1] == tok.eos_id
    targets = [i for i, m in zip(ids, mask) if m]
    # two assistant turns, each ending with EOS: the tool call, then the answer reporting the tool's result
    assert targets.count(tok.eos_id) == 2 and targets[-1] == tok.eos_id
    call, answer = tok.decode(targets, special="keep").split("</s>")[:2]
    assert call.startswith("[TOOL_CALLS]") and '"name": "multiply"' in call
    assert answer.strip() == messages[3]["content"]
    parsed = tok.parse_assistant(targets[:targets.index(tok.eos_id)])
    assert parsed["tool_calls"][0]["function"]["name"] == "multiply"
    # nothing of the user's question or the tool result is a target
    prompt_len = len(tok.encode_chat(messages[:1], tools=tools))
    assert not any(mask[:prompt_len])


@pytest.mark.parametrize("seed", range(20))
def test_every_task_encodes_with_the_v3_template(tok, seed):
    rng = random.Random(seed)
    for _ in range(10):
        messages, tools = data.chat_conversation(rng, PAIRS)
        ids, mask = data.encode_conversation(tok, messages, tools)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1]
        answer = tok.decode([i for i, m in zip(ids, mask) if m]).strip()
        assert answer.endswith(messages[-1]["content"].strip())


def test_packing_keeps_examples_whole_and_masks_prompt_and_padding(tok):
    examples = [([1, 10, 11, 12], [False, False, True, True]), ([1, 20, 21], [True, True, True]),
                ([1, 30, 31, 32, 33], [False, True, True, True, True])]
    rows = list(packed_rows(iter(examples), seq_len=7))
    assert [r[0] for r in rows] == [[1, 10, 11, 12, 1, 20, 21, 0], [1, 30, 31, 32, 33, 0, 0, 0]]
    inputs, targets = make_batch(rows)
    assert inputs.tolist() == [[1, 10, 11, 12, 1, 20, 21], [1, 30, 31, 32, 33, 0, 0]]
    assert targets.tolist() == [[-100, 11, 12, 1, 20, 21, -100], [30, 31, 32, 33, -100, -100, -100]]
    with pytest.raises(ValueError, match="does not fit a row of 8"):
        list(packed_rows(iter([([1] * 9, [True] * 9)]), seq_len=7))
    assert sum(b[0].shape[0] for b in batches_of(iter(examples * 3), 4, 7)) == 6


def test_text_documents_are_cut_into_pieces_that_start_with_bos(tok):
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    pieces = data.encode_text(tok, text, max_len=65)
    assert all(len(p) <= 65 for p in pieces) and pieces[0][0] == tok.bos_id and pieces[-1][-1] == tok.eos_id
    assert [t for p in pieces for t in p] == [tok.bos_id, *tok.encode(text), tok.eos_id]


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lr_at(100, cfg) == pytest.approx(1e-4)


def test_tokenizer_trainer_puts_v3_control_pieces_at_their_ids(tmp_path):
    path = data.train_tokenizer(DOCS * 20, PAIRS, tmp_path / "tokenizer.model.v3", vocab_size=600)
    tok = load_tokenizer(path)
    assert tok.version == "v3" and tok.vocab_size == 600
    for i, piece in enumerate(data.CONTROL_PIECES):
        assert tok.id_to_piece(i) == piece
    assert [tok.is_special(i) for i in range(10)] == [False] + [True] * 9
    text = "Grüße ∑ 12 😀"  # byte fallback: nothing becomes <unk>
    assert tok.unk_id not in tok.encode(text) and tok.decode(tok.encode(text)) == text


# ---- the loop ----------------------------------------------------------------------------------------------
def _run(tok, seed: int, steps: int = 6):
    cfg = TrainConfig(seq_len=64, batch_size=4, steps=steps, lr=1e-2, warmup=2, seed=seed, eval_every=1)
    eval_set = batches_of(itertools.islice(_stream(tok, seed=99), 12), 4, 64)
    return train(TINY, cfg, _stream(tok, seed=seed), {"held": eval_set}, log=lambda s: None)


def test_a_few_steps_reduce_the_loss_and_are_reproducible(tok):
    model_a, hist_a = _run(tok, seed=0)
    model_b, hist_b = _run(tok, seed=0)
    model_c, _ = _run(tok, seed=1)
    first, last = hist_a[0]["eval_held"], hist_a[-1]["eval_held"]  # held-out loss after step 1 and step 6
    assert last < first - 0.5, [h["eval_held"] for h in hist_a]
    assert [h["loss"] for h in hist_a] == [h["loss"] for h in hist_b]
    sa, sb, sc = model_a.state_dict(), model_b.state_dict(), model_c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_saved_checkpoint_loads_back_with_the_same_logits(tok, tmp_path):
    model, _ = _run(tok, seed=0, steps=2)
    save_native(model, EMBEDDED_MODEL_DIR / "tokenizer.model.v3", tmp_path, dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.safetensors", "params.json",
                                                          "tokenizer.model.v3"]
    loaded = load_model(tmp_path)
    assert loaded.args == TINY
    x = torch.randint(0, TINY.vocab_size, (2, 40))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_shipped_config_is_a_real_mixtral():
    a = TINY_MIXTRAL
    assert a.moe == MoeArgs(8, 2) and a.n_kv_heads < a.n_heads and a.head_dim != a.dim // a.n_heads
    assert a.sliding_window < TrainConfig.seq_len
