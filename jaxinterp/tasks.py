"""Seeded task generators: IOI, greater-than and induction prompt pairs.

Every prompt is a sequence of whitespace-separated words from :func:`task_vocabulary`,
so the word-level tokenizer (:func:`jaxinterp.tokenizer.build_word_tokenizer`) maps each
word to exactly one token. Word lists and templates are this project's own.

Tasks (``generate(task, n, seed)`` returns one dict per pair; ``clean`` is what the model
continues, ``target`` the word a trained model should produce next):

* ``ioi`` (indirect object identification), e.g.
  ``"When Mary and John went to the store , John gave a drink to"`` -> ``Mary``. Six
  templates, each in ABBA (``IO S ... S``) and BABA (``S IO ... S``) order. The corrupted
  prompt replaces the second subject mention with a third name, different from both:
  ``"When Mary and John went to the store , Kate gave a drink to"``. Labels: correct =
  the IO name, incorrect = the subject name.
* ``greater_than``, e.g. ``"The war lasted from the year 13 52 to the year 13"``: years
  are written as *two tokens*, the century (``11`` .. ``17``) and the two-digit year
  (``00`` .. ``99``), separated by a space, so the vocabulary holds the 100 tokens
  ``"00" .. "99"`` (the century tokens are the same strings as years ``11`` .. ``17``;
  the model tells them apart by position). Start years are ``02`` .. ``98``. The
  corrupted prompt has start year ``01`` (``"... from the year 13 01 to the year 13"``);
  the label is the clean start year (52), and the correct continuations are the years
  after it. ``target`` (the training continuation) is drawn uniformly from the 10 years
  after the start year (fewer when the century ends first): ``53 .. 62`` for 52, so a
  model that learns it predicts a year just after the start year, and on the corrupted
  prompt one just after 01 (earlier than the clean start year for labels >= 11).
* ``induction``: a random sequence ``A`` of 6..10 words from a pool of nouns, followed
  by its first ``k`` words (``2 <= k < len(A)``); the next word by induction is ``A[k]``.
  The corrupted prompt changes ``A[k]`` in the *first* copy to a distractor ``D`` not in
  ``A``, so that induction there predicts ``D``. Labels: correct ``A[k]``, incorrect ``D``.
  Corrupted differs from clean in that one token.

CSV files (:func:`write_pairs_csv`) use the reference (hannamw/EAP-IG) columns ``clean``,
``corrupted`` and ``correct_idx``, ``incorrect_idx`` (ioi, induction: token ids of the
words, found as the single token of ``" " + word`` in the given tokenizer) or ``label``
(greater_than: the start year as an integer).
"""

from __future__ import annotations

import argparse
import csv
import os
from typing import Optional, Sequence

import numpy as np

TASKS = ("ioi", "greater_than", "induction")

NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Kate", "Anna", "Paul", "Lucy", "Mark", "Emma", "Jack",
         "Sarah", "David", "Laura", "Peter", "Julia", "Simon", "Nora", "Henry", "Clara", "Oscar", "Ruth",
         "Victor", "Helen", "Adam", "Grace", "Leo", "Irene", "Max"]
PLACES = ["store", "park", "school", "garden", "station", "market", "library", "beach", "office",
          "cafe", "museum", "hospital"]
OBJECTS = ["drink", "book", "ball", "letter", "key", "ring", "basket", "bottle", "card", "pencil",
           "necklace", "hat"]

# {N1} and {N2} are the two names introduced first; {S2} is the second subject mention.
IOI_TEMPLATES = [
    "When {N1} and {N2} went to the {PLACE} , {S2} gave a {OBJECT} to",
    "Then , {N1} and {N2} had a long day at the {PLACE} . {S2} gave a {OBJECT} to",
    "After {N1} and {N2} arrived at the {PLACE} , {S2} handed a {OBJECT} to",
    "While {N1} and {N2} were working at the {PLACE} , {S2} passed a {OBJECT} to",
    "{N1} and {N2} found a {OBJECT} at the {PLACE} . {S2} threw it to",
    "Friends {N1} and {N2} walked to the {PLACE} . {S2} brought a {OBJECT} for",
]

GT_NOUNS = ["war", "siege", "famine", "journey", "voyage", "reign", "drought", "trial", "treaty", "festival",
            "plague", "expedition", "dynasty", "rebellion", "construction", "crusade"]
GT_VERBS = ["lasted", "continued", "went on", "ran"]
GT_TEMPLATE = "The {NOUN} {VERB} from the year {CC} {YY} to the year {CC}"
CENTURIES = list(range(11, 18))
GT_MAX_SPAN = 10  # the training continuation is 1 .. 10 years after the start year

INDUCTION_POOL = ["apple", "river", "stone", "cloud", "tiger", "lamp", "chair", "wolf", "candle", "bridge",
                  "forest", "mirror", "engine", "violin", "pepper", "anchor", "rocket", "turtle", "window",
                  "hammer", "island", "lemon", "feather", "castle", "spoon", "planet", "camel", "blanket",
                  "ladder", "cactus", "rabbit", "button", "desert", "oyster", "tunnel", "magnet", "pillow",
                  "falcon", "copper", "harbor"]


def year_words() -> list[str]:
    return [f"{y:02d}" for y in range(100)]


def task_vocabulary() -> list[str]:
    """Every word the generators can produce, each once, in a fixed order."""
    words: list[str] = []
    for t in IOI_TEMPLATES:
        words += [w for w in t.split() if not w.startswith("{")]
    words += NAMES + PLACES + OBJECTS
    for verb in GT_VERBS:
        words += verb.split()
    words += [w for w in GT_TEMPLATE.split() if not w.startswith("{")]
    words += GT_NOUNS + year_words() + INDUCTION_POOL
    out, seen = [], set()
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _ioi(rng: np.random.Generator, template: Optional[int] = None) -> dict:
    t = int(rng.integers(len(IOI_TEMPLATES))) if template is None else template
    io, s, c = (NAMES[i] for i in rng.choice(len(NAMES), 3, replace=False))
    order = "ABBA" if rng.random() < 0.5 else "BABA"
    n1, n2 = (io, s) if order == "ABBA" else (s, io)
    fill = dict(N1=n1, N2=n2, PLACE=PLACES[rng.integers(len(PLACES))], OBJECT=OBJECTS[rng.integers(len(OBJECTS))])
    tpl = IOI_TEMPLATES[t]
    return {"task": "ioi", "clean": tpl.format(S2=s, **fill), "corrupted": tpl.format(S2=c, **fill),
            "correct": io, "incorrect": s, "target": io, "template": t, "order": order, "corrupt_name": c}


def _greater_than(rng: np.random.Generator) -> dict:
    cc = int(rng.choice(CENTURIES))
    yy = int(rng.integers(2, 99))  # 02 .. 98: some later year always exists
    end = int(rng.integers(yy + 1, min(yy + GT_MAX_SPAN, 99) + 1))
    fill = dict(NOUN=GT_NOUNS[rng.integers(len(GT_NOUNS))], VERB=GT_VERBS[rng.integers(len(GT_VERBS))],
                CC=f"{cc:02d}")
    return {"task": "greater_than", "clean": GT_TEMPLATE.format(YY=f"{yy:02d}", **fill),
            "corrupted": GT_TEMPLATE.format(YY="01", **fill), "label": yy, "target": f"{end:02d}",
            "century": cc}


def _induction(rng: np.random.Generator) -> dict:
    n = int(rng.integers(6, 11))
    idx = rng.choice(len(INDUCTION_POOL), n + 1, replace=False)  # the last one is the distractor
    seq = [INDUCTION_POOL[i] for i in idx[:n]]
    distractor = INDUCTION_POOL[idx[n]]
    k = int(rng.integers(2, n))
    corrupted_first = seq[:k] + [distractor] + seq[k + 1:]
    return {"task": "induction", "clean": " ".join(seq + seq[:k]), "corrupted": " ".join(corrupted_first + seq[:k]),
            "correct": seq[k], "incorrect": distractor, "target": seq[k], "k": k, "length": n}


_GENERATORS = {"ioi": _ioi, "greater_than": _greater_than, "induction": _induction}


def _check_task(task: str) -> str:
    task = task.replace("-", "_")
    if task == "gt":
        task = "greater_than"
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    return task


def generate(task: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` pairs of ``task`` ("ioi", "greater_than" or "induction"), reproducible from ``seed``.

    Each dict has ``task``, ``clean``, ``corrupted``, ``target`` (the word that follows the
    clean prompt) and labels: ``correct``/``incorrect`` words (ioi, induction) or ``label``
    (greater_than, the start year 2..98), plus generator metadata.
    """
    task = _check_task(task)
    # the task name enters the seed, so that tasks generated with one seed are independent
    rng = np.random.default_rng([int(seed), TASKS.index(task)])
    gen = _GENERATORS[task]
    return [gen(rng) for _ in range(int(n))]


def word_token_id(tokenizer, word: str) -> int:
    """The id of the single token ``word`` is (as the continuation ``" " + word``)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens in this tokenizer; labels must be single tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk:
        raise ValueError(f"{word!r} is not in the tokenizer's vocabulary")
    return int(ids[0])


def _check_prompt(tokenizer, text: str) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in tokenizer(text, add_special_tokens=False)["input_ids"]:
        raise ValueError(f"prompt {text!r} has words outside the tokenizer's vocabulary")


def csv_rows(rows: Sequence[dict], tokenizer) -> list[dict]:
    """Generated pairs as reference-format CSV rows (labels as token ids for ``tokenizer``)."""
    out = []
    for r in rows:
        _check_prompt(tokenizer, r["clean"])
        _check_prompt(tokenizer, r["corrupted"])
        row = {"clean": r["clean"], "corrupted": r["corrupted"]}
        if r["task"] == "greater_than":
            row["label"] = int(r["label"])
        else:
            row["correct_idx"] = word_token_id(tokenizer, r["correct"])
            row["incorrect_idx"] = word_token_id(tokenizer, r["incorrect"])
        out.append(row)
    return out


def write_pairs_csv(task: str, n: int, path: str, tokenizer, seed: int = 0) -> str:
    """Write ``n`` pairs of ``task`` to ``path`` in the reference's CSV format (atomically)."""
    import io

    from .io import atomic_write_text

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of {task} pairs must be an integer >= 1, got {n!r}")
    rows = csv_rows(generate(task, n, seed), tokenizer)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def main_generate(argv: Optional[Sequence[str]] = None) -> str:
    """``generate TASK N OUT [--model DIR] [--seed S]``: write a pairs CSV.

    The tokenizer is the one saved in ``--model`` (default: the shipped demo model).
    """
    p = argparse.ArgumentParser(prog="jaxinterp generate", description="Write a clean/corrupted pairs CSV.")
    p.add_argument("task", choices=TASKS)
    p.add_argument("n", type=int)
    p.add_argument("out")
    p.add_argument("--model", default=None, help="model directory whose tokenizer gives the label ids "
                   "(default: the shipped demo model)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from transformers import AutoTokenizer

    if a.model is None:
        from .demo import demo_model_dir
        a.model = demo_model_dir()
    tok = AutoTokenizer.from_pretrained(a.model)
    write_pairs_csv(a.task, a.n, a.out, tok, seed=a.seed)
    print(f"wrote {a.n} {a.task} pairs to {a.out}")
    return a.out
