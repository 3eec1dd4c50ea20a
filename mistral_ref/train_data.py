"""Training data for the embedded tiny Mixtral: a small multilingual text corpus and a synthetic instruct set.

Two sources, both free to redistribute and reachable from a package registry:

1. **Text** from the Django wheel (BSD-3-Clause, pinned to :data:`DJANGO_VERSION`; ``pip install
   django==5.2.19``): the user-interface strings of every ``locale/<lang>/LC_MESSAGES/*.po`` file in English
   (the msgids) and in French, German, Spanish and Italian (the translations), and the English docstrings of
   its Python modules.  About 0.6 MB of neutral text.
2. **Synthetic chat conversations** built here from a seeded ``random.Random``, encoded with the real Mistral
   V3 chat template (:meth:`mistral_ref.tokenizer.Tokenizer.encode_chat`): greetings, capitals, translating
   and repeating Django strings, and three tools (``add``, ``multiply``, ``convert_units``) whose calls the
   model must emit as ``[TOOL_CALLS]`` JSON and whose results it then reports.

Held-out data: a string or docstring is held out when the CRC-32 of its English text is 0 mod 20 (about 5 %,
the same messages in every language); held-out conversations come from another seed and use held-out strings.
Only re-training needs Django; loading the shipped model does not.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import io
import random
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mistral_ref.embedded import TOOLS  # the tools the conversations offer live with the model
from mistral_ref.tokenizer import Tokenizer
from mistral_ref.tokenizer.toolcalls import new_tool_call_id

DJANGO_VERSION = "5.2.19"
LANGUAGES = ("en", "fr", "de", "es", "it")
LANGUAGE_NAMES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian"}

#: The Mistral V3 control pieces and their ids (as in mistral_instruct_tokenizer_240323.model.v3).
CONTROL_PIECES = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                  "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


def is_held_out(key: str) -> bool:
    """True for about 5 % of keys (CRC-32 = 0 mod 20): these never reach the training stream."""
    return zlib.crc32(key.encode("utf-8")) % 20 == 0


# ---------------------------------------------------------------------------------------------------
# 1. Text from the Django wheel
# ---------------------------------------------------------------------------------------------------
def django_root() -> Path:
    """The installed ``django`` package directory; it must be version :data:`DJANGO_VERSION`."""
    spec = importlib.util.find_spec("django")
    if spec is None or spec.origin is None:
        raise RuntimeError(f"re-training needs Django's text: pip install django=={DJANGO_VERSION}")
    found = importlib.metadata.version("django")
    if found != DJANGO_VERSION:
        raise RuntimeError(f"the corpus is pinned to Django {DJANGO_VERSION}, found {found}: "
                           f"pip install django=={DJANGO_VERSION}")
    return Path(spec.origin).parent


_PO_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_PO_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


def _po_unquote(line: str) -> str:
    m = _PO_STRING.search(line)
    raw = m.group(1) if m else ""
    return re.sub(r"\\(.)", lambda e: _PO_ESCAPES.get(e.group(1), e.group(1)), raw)


def read_po(path: Path) -> list[tuple[str, str]]:
    """(English msgid, translation) pairs of a gettext .po file, plural forms as separate pairs.

    Skips the header, fuzzy and untranslated entries.  Multi-line strings are joined.
    """
    pairs: list[tuple[str, str]] = []
    entry: dict[str, str] = {}
    key = None
    fuzzy = False

    def flush() -> None:
        if entry.get("msgid") and not fuzzy:
            if entry.get("msgstr[0]", entry.get("msgstr")):
                pairs.append((entry["msgid"], entry.get("msgstr[0]", entry.get("msgstr", ""))))
            if entry.get("msgid_plural") and entry.get("msgstr[1]"):
                pairs.append((entry["msgid_plural"], entry["msgstr[1]"]))

    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        line = line.strip()
        if not line:
            flush()
            entry, key, fuzzy = {}, None, False
        elif line.startswith("#"):
            fuzzy |= line.startswith("#,") and "fuzzy" in line
        elif line.startswith('"') and key is not None:
            entry[key] += _po_unquote(line)
        else:
            key = line.split(" ", 1)[0]
            entry[key] = _po_unquote(line)
    return [(src.strip(), dst.strip()) for src, dst in pairs]


def parallel_strings(root: Path) -> dict[str, dict[str, str]]:
    """{English string: {language: text}} over every .po file of the wheel, for :data:`LANGUAGES`."""
    table: dict[str, dict[str, str]] = {}
    for lang in LANGUAGES[1:]:
        for po in sorted(root.glob(f"**/locale/{lang}/LC_MESSAGES/*.po")):
            for src, dst in read_po(po):
                table.setdefault(src, {"en": src})[lang] = dst
    return table


def docstrings(root: Path) -> list[str]:
    """English docstrings (>= 60 characters, no doctest prompts) of the wheel's modules, in file order."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 60 and ">>>" not in doc:
                    out.append(doc)
    return out


def text_documents(root: Path, held_out: bool) -> list[str]:
    """The text corpus as documents: runs of 8 UI strings of one language, and single docstrings."""
    table = parallel_strings(root)
    docs = []
    for lang in LANGUAGES:
        lines = [t[lang] for src, t in table.items() if lang in t and is_held_out(src) == held_out]
        docs += ["\n".join(lines[i:i + 8]) for i in range(0, len(lines), 8)]
    docs += [d for d in docstrings(root) if is_held_out(d) == held_out]
    return docs


# ---------------------------------------------------------------------------------------------------
# 2. Synthetic conversations (OpenAI / Mistral-API style messages, encoded later with the V3 template)
# ---------------------------------------------------------------------------------------------------
# unit pair -> (factor or function, long names)
_CONVERSIONS = {
    ("km", "mi"): (lambda v: v * 0.621371, "miles", "kilometres"),
    ("mi", "km"): (lambda v: v * 1.609344, "kilometres", "miles"),
    ("kg", "lb"): (lambda v: v * 2.204623, "pounds", "kilograms"),
    ("lb", "kg"): (lambda v: v * 0.453592, "kilograms", "pounds"),
    ("m", "ft"): (lambda v: v * 3.280840, "feet", "metres"),
    ("ft", "m"): (lambda v: v * 0.304800, "metres", "feet"),
    ("C", "F"): (lambda v: v * 9 / 5 + 32, "degrees Fahrenheit", "degrees Celsius"),
    ("F", "C"): (lambda v: (v - 32) * 5 / 9, "degrees Celsius", "degrees Fahrenheit"),
}

_ADD_PROMPTS = ("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
                "Combien font {a} + {b} ?", "Was ist {a} plus {b}?", "¿Cuánto es {a} más {b}?",
                "Quanto fa {a} più {b}?")
_MUL_PROMPTS = ("What is {a} times {b}?", "What is {a} * {b}?", "Multiply {a} by {b}.",
                "Combien font {a} fois {b} ?", "Was ist {a} mal {b}?", "¿Cuánto es {a} por {b}?",
                "Quanto fa {a} per {b}?")
_CONVERT_PROMPTS = ("Convert {v} {f} to {t}.", "How many {t_long} are in {v} {f_long}?",
                    "What is {v} {f} in {t}?", "Convertis {v} {f} en {t}.", "Rechne {v} {f} in {t} um.",
                    "Convierte {v} {f} a {t}.",
                    "Converti {v} {f} in {t}.")
_GREETINGS = {
    "en": (("Hello!", "Hi!", "Good morning.", "Hey there."),
           "Hello! I am a tiny Mixtral trained by mistral-ref. How can I help you?"),
    "fr": (("Bonjour !", "Salut !", "Bonsoir."),
           "Bonjour ! Je suis un petit Mixtral. Comment puis-je vous aider ?"),
    "de": (("Hallo!", "Guten Tag!", "Guten Morgen."),
           "Hallo! Ich bin ein kleines Mixtral. Wie kann ich helfen?"),
    "es": (("¡Hola!", "¡Buenos días!"), "¡Hola! Soy un pequeño Mixtral. ¿En qué puedo ayudarte?"),
    "it": (("Ciao!", "Buongiorno!"), "Ciao! Sono un piccolo Mixtral. Come posso aiutarti?"),
}
_WHO = (("Who are you?", "What are you?", "What is your name?"),
        "I am a tiny Mixtral: 8 experts, 2 active per token, trained on a CPU by mistral-ref.")
_CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Spain": "Madrid", "Italy": "Rome", "Portugal": "Lisbon",
    "Belgium": "Brussels", "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Austria": "Vienna",
    "Poland": "Warsaw", "Sweden": "Stockholm", "Norway": "Oslo", "Denmark": "Copenhagen",
    "Finland": "Helsinki", "Ireland": "Dublin", "Greece": "Athens", "Hungary": "Budapest",
    "Czechia": "Prague", "Romania": "Bucharest",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasília", "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Australia": "Canberra", "the United Kingdom": "London", "the United States": "Washington, D.C.",
}
_CAPITAL_PROMPTS = ("What is the capital of {c}?", "Capital of {c}?", "Which city is the capital of {c}?")
_TRANSLATE_PROMPTS = ("Translate into {lang}: {text}", "Translate to {lang}: {text}",
                      "How do you say this in {lang}? {text}")
_REPEAT_PROMPTS = ("Repeat exactly: {text}", "Say this back to me: {text}")


def _number(rng: random.Random, lo: int, hi: int) -> int | float:
    return rng.randint(lo, hi) if rng.random() < 0.8 else round(rng.uniform(lo, hi), 1)


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}".rstrip("0").rstrip(".")


def tool_conversation(rng: random.Random, kind: str | None = None) -> tuple[list[dict[str, Any]], list[dict]]:
    """A full tool round trip: user question -> [TOOL_CALLS] -> tool result -> answer.

    returns (messages ending with the final assistant answer, the tools offered).
    """
    kind = kind or rng.choice(("add", "multiply", "convert_units"))
    if kind == "add":
        a, b = _number(rng, 0, 999), _number(rng, 0, 999)
        question = rng.choice(_ADD_PROMPTS).format(a=a, b=b)
        args, result = {"a": a, "b": b}, _fmt(a + b)
        answer = f"{a} + {b} = {result}."
    elif kind == "multiply":
        a, b = _number(rng, 2, 99), _number(rng, 2, 99)
        question = rng.choice(_MUL_PROMPTS).format(a=a, b=b)
        args, result = {"a": a, "b": b}, _fmt(round(a * b, 2))
        answer = f"{a} × {b} = {result}."
    else:
        (f, t), (fn, t_long, f_long) = rng.choice(list(_CONVERSIONS.items()))
        v = _number(rng, 1, 500)
        question = rng.choice(_CONVERT_PROMPTS).format(v=v, f=f, t=t, f_long=f_long, t_long=t_long)
        args, result = {"value": v, "from_unit": f, "to_unit": t}, _fmt(round(fn(v), 2))
        answer = f"{v} {f} is {result} {t}."
    others = [n for n in TOOLS if n != kind]
    offered = [kind] + rng.sample(others, rng.randint(0, 1))
    rng.shuffle(offered)
    call_id = new_tool_call_id(rng)
    messages = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": kind, "arguments": args}}]},
        {"role": "tool", "tool_call_id": call_id, "name": kind, "content": result},
        {"role": "assistant", "content": answer},
    ]
    return messages, [TOOLS[n] for n in offered]


def chat_conversation(rng: random.Random, pairs: list[dict[str, str]]
                      ) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """A one-turn conversation of a random task; tools are sometimes offered even when none is needed."""
    task = rng.choices(("tool", "greet", "who", "capital", "translate", "repeat"), (35, 5, 3, 12, 10, 35))[0]
    if task == "tool":
        return tool_conversation(rng)
    if task == "greet":
        prompts, answer = _GREETINGS[rng.choice(LANGUAGES)]
        question = rng.choice(prompts)
    elif task == "who":
        question, answer = rng.choice(_WHO[0]), _WHO[1]
    elif task == "capital":
        country, city = rng.choice(list(_CAPITALS.items()))
        question = rng.choice(_CAPITAL_PROMPTS).format(c=country)
        answer = f"The capital of {country} is {city}."
    else:
        entry = rng.choice(pairs)
        if task == "translate":
            lang = rng.choice([lang for lang in LANGUAGES[1:] if lang in entry])
            question = rng.choice(_TRANSLATE_PROMPTS).format(lang=LANGUAGE_NAMES[lang], text=entry["en"])
            answer = entry[lang]
        else:
            text = entry[rng.choice(list(entry))]
            question, answer = rng.choice(_REPEAT_PROMPTS).format(text=text), text
    tools = [TOOLS[n] for n in rng.sample(list(TOOLS), rng.randint(1, 2))] if rng.random() < 0.3 else None
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], tools


def translation_pairs(root: Path, held_out: bool) -> list[dict[str, str]]:
    """Single-line Django strings (<= 80 characters) with at least one translation, for translate / repeat."""
    table = parallel_strings(root)
    return [t for src, t in table.items()
            if len(t) > 1 and is_held_out(src) == held_out and len(src) <= 80 and "\n" not in src]


# ---------------------------------------------------------------------------------------------------
# 3. Encoding: ids plus a loss mask (True where the token is a training target)
# ---------------------------------------------------------------------------------------------------
def encode_conversation(tok: Tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None
                        ) -> tuple[list[int], list[bool]]:
    """V3 ids of a whole conversation and a mask that is True on every assistant token (its EOS included).

    The chat template refuses to end a request with a finished assistant message (that is not a request), so
    each assistant turn k is encoded as an open prefix (``continue_final_message=True``) plus EOS — what the
    template writes for a finished turn.  Every encoding must extend the previous one: checked, not assumed.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.encode_chat(messages[:k], tools=tools)
        turn = tok.encode_chat(messages[:k + 1], tools=tools, continue_final_message=True) + [tok.eos_id]
        if prompt[:len(ids)] != ids or turn[:len(prompt)] != prompt:
            raise AssertionError(f"the V3 encoding of messages[:{k + 1}] does not extend the one before it")
        mask += [False] * (len(prompt) - len(ids)) + [True] * (len(turn) - len(prompt))
        ids = turn
    return ids, mask


def encode_text(tok: Tokenizer, text: str, max_len: int) -> list[list[int]]:
    """BOS + text + EOS, cut into pieces of at most max_len ids (each piece trains on every token)."""
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    return [ids[i:i + max_len] for i in range(0, len(ids), max_len)]


def example_stream(tok: Tokenizer, docs: list[str], pairs: list[dict[str, str]], seed: int, max_len: int,
                   text_fraction: float = 0.25) -> Iterator[tuple[list[int], list[bool]]]:
    """An endless seeded stream of (ids, mask): text documents (shuffled, cycled) mixed with conversations."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if rng.random() < text_fraction:
            if not order:
                order = list(range(len(docs)))
                rng.shuffle(order)
            for piece in encode_text(tok, docs[order.pop()], max_len):
                yield piece, [True] * len(piece)
        else:
            ids, mask = encode_conversation(tok, *chat_conversation(rng, pairs))
            if len(ids) <= max_len:  # a conversation is never cut: it must start at its BOS
                yield ids, mask


# ---------------------------------------------------------------------------------------------------
# 4. The tokenizer: SentencePiece BPE with byte fallback and the V3 control pieces at their real ids
# ---------------------------------------------------------------------------------------------------
def train_tokenizer(docs: list[str], pairs: list[dict[str, str]], out: Path, vocab_size: int = 3072,
                    seed: int = 0) -> Path:
    """Train ``out`` (a ``tokenizer.model.v3``) on the text corpus plus 4,000 rendered conversations.

    Ids 0..9 are <unk>, <s>, </s>, [INST], [/INST], [TOOL_CALLS], [AVAILABLE_TOOLS], [/AVAILABLE_TOOLS],
    [TOOL_RESULTS], [/TOOL_RESULTS] as in Mistral's v3 tokenizer; then 256 byte pieces, then BPE merges.
    """
    import json

    import sentencepiece as spm

    rng = random.Random(seed)
    lines = [line for d in docs for line in d.splitlines() if line.strip()]
    for _ in range(4000):  # the conversations' text and JSON, so "[{"name": ..." gets compact pieces
        messages, tools = chat_conversation(rng, pairs)
        if tools:
            lines.append(json.dumps(tools, ensure_ascii=False))
        for m in messages:
            if m.get("content"):
                lines.append(str(m["content"]))
            if m["role"] == "tool":
                lines.append(json.dumps({"content": m["content"], "call_id": m["tool_call_id"]}))
            for call in m.get("tool_calls") or []:
                lines.append(json.dumps([{"name": call["function"]["name"],
                                          "arguments": call["function"]["arguments"], "id": call["id"]}],
                                        ensure_ascii=False))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, split_digits=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, control_symbols=list(CONTROL_PIECES[3:]), normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        split_by_unicode_script=False, max_sentence_length=8192, num_threads=1, minloglevel=2,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(out))
    for i, piece in enumerate(CONTROL_PIECES):
        if sp.id_to_piece(i) != piece:
            raise AssertionError(f"{out}: id {i} is {sp.id_to_piece(i)!r}, expected {piece!r}")
    return out
