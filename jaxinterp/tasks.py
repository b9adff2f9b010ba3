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

from typing import Callable, Optional, Sequence

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
    from .data import write_pairs_csv as write

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of {task} pairs must be an integer >= 1, got {n!r}")
    return write(csv_rows(generate(task, n, seed), tokenizer), path)


# --- tasks for real (sub-word) tokenizers ----------------------------------------------------
#
# The generators above write word-per-token prompts for the demo model's word tokenizer
# (" , " as a word). For a pretrained model with a BPE tokenizer (SmolLM2, GPT-2, ...) the
# prompts below are natural text, and every word a label depends on is kept only when it
# is one token for *that* tokenizer (``" " + word``), so that a clean prompt and its
# corrupted partner have the same length and the label is one next token.

REAL_TASKS = ("ioi", "greater_than", "induction", "factual")

REAL_NAMES = NAMES + ["James", "Michael", "Robert", "William", "Richard", "Thomas", "Daniel", "Matthew",
                      "Andrew", "Joseph", "Charles", "George", "Edward", "Steven", "Sam", "Ben", "Dan",
                      "Elizabeth", "Jennifer", "Jessica", "Susan", "Karen", "Lisa", "Linda", "Rachel", "Amy",
                      "Rose", "Sophie", "Alex", "Chris", "Kevin", "Brian", "Eric", "Jane", "Joe"]
REAL_INDUCTION_POOL = INDUCTION_POOL + ["table", "garden", "horse", "paper", "silver", "orange", "bottle", "doctor",
                                       "winter", "summer", "music", "yellow", "green", "shoe", "glass", "coffee",
                                       "letter", "train", "ocean", "mountain", "dog", "cat", "bird", "fish"]

# Facts, one relation per template: (subject, attribute). The corrupted prompt is the same
# template with another subject of the relation whose attribute differs (the "incorrect"
# label is that subject's attribute), as in pair-based causal tracing.
FACT_TEMPLATES = {
    "capital": "The capital of {S} is",
    "language": "The official language of {S} is",
    "landmark": "{S} is located in the city of",
}
FACTS = {
    "capital": [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
                ("Japan", "Tokyo"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"),
                ("England", "London"), ("China", "Beijing"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
                ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Norway", "Oslo"),
                ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Turkey", "Ankara"),
                ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Thailand", "Bangkok"),
                ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
                ("Belgium", "Brussels"), ("Scotland", "Edinburgh")],
    "language": [("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
                 ("Japan", "Japanese"), ("Russia", "Russian"), ("China", "Chinese"), ("Greece", "Greek"),
                 ("Portugal", "Portuguese"), ("Poland", "Polish"), ("Sweden", "Swedish"), ("Turkey", "Turkish"),
                 ("Finland", "Finnish"), ("Brazil", "Portuguese"), ("Mexico", "Spanish"), ("Egypt", "Arabic"),
                 ("Norway", "Norwegian"), ("Denmark", "Danish"), ("Hungary", "Hungarian"),
                 ("the Netherlands", "Dutch"), ("Iran", "Persian"), ("Israel", "Hebrew"), ("Thailand", "Thai")],
    "landmark": [("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("Big Ben", "London"),
                 ("The Brandenburg Gate", "Berlin"), ("The Sagrada Familia", "Barcelona"),
                 ("The Acropolis", "Athens"), ("The Kremlin", "Moscow"), ("The Space Needle", "Seattle"),
                 ("The Sydney Opera House", "Sydney"), ("The Forbidden City", "Beijing"),
                 ("The Taj Mahal", "Agra"), ("The Louvre", "Paris"), ("The Prado Museum", "Madrid"),
                 ("The Tower of London", "London"), ("The Burj Khalifa", "Dubai"), ("The Alhambra", "Granada"),
                 ("The Little Mermaid statue", "Copenhagen"), ("The Blue Mosque", "Istanbul")],
}

# the criterion of "the model gets it right" per task (see :func:`model_correct`)
DEFAULT_CRITERION = {"ioi": "pair", "greater_than": "later", "induction": "top1", "factual": "top1"}


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_token_words(tokenizer, words: Sequence[str]) -> list[str]:
    """The words of ``words`` that are one token as a continuation (``" " + word``)."""
    unk = getattr(tokenizer, "unk_token_id", None)
    out = []
    for w in words:
        ids = _ids(tokenizer, " " + w)
        if len(ids) == 1 and ids[0] != unk and w not in out:
            out.append(w)
    return out


def digits_split(tokenizer) -> bool:
    """True when the tokenizer writes two-digit numbers as two one-digit tokens (SmolLM2,
    Llama 3 style); False when ``"00" .. "99"`` are single tokens (GPT-2)."""
    return any(len(_ids(tokenizer, f"{y:02d}")) != 1 for y in range(100))


def _natural(template: str) -> str:
    """The word-tokenizer template in ordinary punctuation (``" , "`` -> ``", "``)."""
    return template.replace(" , ", ", ").replace(" . ", ". ")


def _real_ioi(rng, tokenizer, names, places, objects) -> Optional[dict]:
    t = int(rng.integers(len(IOI_TEMPLATES)))
    io, s, c = (names[i] for i in rng.choice(len(names), 3, replace=False))
    order = "ABBA" if rng.random() < 0.5 else "BABA"
    n1, n2 = (io, s) if order == "ABBA" else (s, io)
    fill = dict(N1=n1, N2=n2, PLACE=places[rng.integers(len(places))], OBJECT=objects[rng.integers(len(objects))])
    tpl = _natural(IOI_TEMPLATES[t])
    return {"task": "ioi", "clean": tpl.format(S2=s, **fill), "corrupted": tpl.format(S2=c, **fill),
            "correct": io, "incorrect": s, "template": t, "order": order, "corrupt_name": c}


def _real_greater_than(rng, tokenizer) -> Optional[dict]:
    cc = int(rng.choice(CENTURIES))
    yy = int(rng.integers(2, 99))
    fill = dict(NOUN=GT_NOUNS[rng.integers(len(GT_NOUNS))], VERB=GT_VERBS[rng.integers(len(GT_VERBS))])
    tpl = "The {NOUN} {VERB} from the year {CC}{YY} to the year {CC}"
    clean = tpl.format(CC=f"{cc}", YY=f"{yy:02d}", **fill)
    # the prompt must end exactly where the (first token of the) end year starts
    full = _ids(tokenizer, clean + f"{yy:02d}")
    if full[:len(_ids(tokenizer, clean))] != _ids(tokenizer, clean):
        return None
    return {"task": "greater_than", "clean": clean, "corrupted": tpl.format(CC=f"{cc}", YY="01", **fill),
            "label": yy, "century": cc}


def _real_induction(rng, tokenizer, pool) -> Optional[dict]:
    n = int(rng.integers(6, 11))
    idx = rng.choice(len(pool), n + 1, replace=False)
    seq = [pool[i] for i in idx[:n]]
    distractor = pool[idx[n]]
    k = int(rng.integers(2, n))
    first = seq[:k] + [distractor] + seq[k + 1:]
    # "Words:" first, so that every pool word is preceded by a space in both copies
    return {"task": "induction", "clean": "Words: " + " ".join(seq + seq[:k]),
            "corrupted": "Words: " + " ".join(first + seq[:k]), "correct": seq[k], "incorrect": distractor,
            "k": k, "length": n}


def _real_factual(rng, tokenizer, facts) -> Optional[dict]:
    relation = sorted(facts)[int(rng.integers(len(facts)))]
    pairs = facts[relation]
    i, j = rng.choice(len(pairs), 2, replace=False)
    (s, a), (s2, a2) = pairs[i], pairs[j]
    if a == a2:
        return None
    tpl = FACT_TEMPLATES[relation]
    return {"task": "factual", "clean": tpl.format(S=s), "corrupted": tpl.format(S=s2), "correct": a,
            "incorrect": a2, "relation": relation, "subject": s, "corrupt_subject": s2}



class RealTaskSet(list):
    """Rows of a real-tokenizer task (a list of dicts, see :func:`generate_real`) with
    ``accuracy``: the fraction of scored candidates the model got right (None when no
    model was given), ``n_scored``: how many candidates were scored."""

    accuracy: Optional[float] = None
    n_scored: int = 0


def _label_ids(tokenizer, row: dict) -> dict:
    if row["task"] == "greater_than":
        return {"label": int(row["label"])}
    return {"correct_idx": word_token_id(tokenizer, row["correct"]),
            "incorrect_idx": word_token_id(tokenizer, row["incorrect"])}


def _candidates(task: str, tokenizer, rng) -> "Callable[[], Optional[dict]]":
    if task == "ioi":
        names = single_token_words(tokenizer, REAL_NAMES)
        if len(names) < 3:
            raise ValueError(f"ioi: only {names} of the name list are single tokens in this tokenizer (3 needed)")
        places, objects = PLACES, OBJECTS
        return lambda: _real_ioi(rng, tokenizer, names, places, objects)
    if task == "greater_than":
        return lambda: _real_greater_than(rng, tokenizer)
    if task == "induction":
        pool = single_token_words(tokenizer, REAL_INDUCTION_POOL)
        if len(pool) < 12:
            raise ValueError(f"induction: only {len(pool)} pool words are single tokens in this tokenizer (12 needed)")
        return lambda: _real_induction(rng, tokenizer, pool)
    facts = {}
    for relation, pairs in FACTS.items():
        ok = set(single_token_words(tokenizer, sorted({a for _, a in pairs})))
        kept = [(s, a) for s, a in pairs if a in ok]
        if len({a for _, a in kept}) >= 2:
            facts[relation] = kept
    if not facts:
        raise ValueError("factual: no relation has two single-token answers in this tokenizer")
    return lambda: _real_factual(rng, tokenizer, facts)


def generate_real(task: str, n: int, tokenizer, seed: int = 0, model=None, keep_correct: bool = False,
                  criterion: Optional[str] = None, max_candidates: Optional[int] = None) -> RealTaskSet:
    """``n`` prompt pairs of ``task`` ("ioi", "greater_than", "induction", "factual") for a
    real tokenizer, reproducible from ``seed``.

    Each row has ``task``, ``clean``, ``corrupted``, the labels of the reference's CSV
    (``correct_idx``/``incorrect_idx`` token ids, or ``label`` for greater-than) and the
    words they stand for, plus generator metadata. Only candidates whose clean and
    corrupted prompts have the same number of tokens are kept, and only words that are one
    token (``" " + word``) are used as labels.

    greater_than: ``"The war lasted from the year 1752 to the year 17"``, label 52 (the
    start year), corrupted start year 01. With a tokenizer that has two-digit tokens
    (GPT-2) the next token is the year ``"52"``-like token, as in the reference's data;
    with one that splits digits (SmolLM2) the next token is the *tens digit*, and the
    reference's ``prob_diff`` over ``year_token_ids`` (the first token of ``"00"..."99"``)
    becomes ``10 * (p(tens > 5) - p(tens < 5)) + (8 - 2 * 2) p(5)``: each digit counted once
    per year it starts, i.e. the expected greater-than score under uniform units digits.

    model: a :class:`jaxinterp.Model`; with it the clean prompts are scored
    (:func:`model_correct`) and the set's ``accuracy`` reported; ``keep_correct`` keeps
    only the prompts the model gets right (scoring more candidates until ``n`` are kept or
    ``max_candidates``, default ``20 * n``, were tried). ``criterion``: see
    :func:`model_correct` (default per task: :data:`DEFAULT_CRITERION`).
    """
    if task not in REAL_TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {REAL_TASKS}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of {task} pairs must be an integer >= 1, got {n!r}")
    if keep_correct and model is None:
        raise ValueError("keep_correct needs the model whose answers decide what is kept")
    rng = np.random.default_rng([int(seed), REAL_TASKS.index(task), 1])
    draw = _candidates(task, tokenizer, rng)
    max_candidates = max_candidates or 20 * n
    out, seen, tried, scored, right = RealTaskSet(), set(), 0, 0, 0
    while len(out) < n and tried < max_candidates:
        batch = []
        while len(batch) < max(n - len(out), 8) and tried < max_candidates:
            tried += 1
            row = draw()
            if row is None or (row["clean"], row["corrupted"]) in seen:
                continue
            if len(_ids(tokenizer, row["clean"])) != len(_ids(tokenizer, row["corrupted"])):
                continue
            seen.add((row["clean"], row["corrupted"]))
            batch.append({**row, **_label_ids(tokenizer, row)})
        if model is not None and batch:
            ok = model_correct(model, batch, criterion or DEFAULT_CRITERION[task])
            scored, right = scored + len(batch), right + int(ok.sum())
            for r, good in zip(batch, ok):
                r["model_correct"] = bool(good)
            if keep_correct:
                batch = [r for r, good in zip(batch, ok) if good]
        out.extend(batch[:n - len(out)])
    if len(out) < n:
        raise ValueError(f"{task}: only {len(out)} of {n} pairs after {tried} candidates"
                         + (" (keeping only prompts the model gets right)" if keep_correct else "")
                         + "; ask for fewer or raise max_candidates")
    out.accuracy = right / scored if scored else None
    out.n_scored = scored
    return out


def model_correct(model, rows: Sequence[dict], criterion: str, batch_size: int = 16) -> np.ndarray:
    """``[len(rows)]`` bool: does ``model`` get each clean prompt right?

    criterion: ``"top1"``: the correct token is the model's most likely next token;
    ``"pair"``: the correct token's logit beats the incorrect one's (IOI's usual accuracy);
    ``"later"`` (greater-than): the probability of the years after the label exceeds that
    of the years up to it, over the reference's ``year_token_ids`` (the metric's sign).
    Prompts are tokenised as the data loader does: BOS, then the tokens (right padding).
    """
    from .data import bos_id, year_token_ids

    if criterion not in ("top1", "pair", "later"):
        raise ValueError(f"unknown criterion {criterion!r}; choose from top1, pair, later")
    tok = model.tokenizer
    seqs = [[bos_id(tok)] + _ids(tok, r["clean"]) for r in rows]
    n_pos = max(map(len, seqs))
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos_id(tok)
    years = year_token_ids(tok) if criterion == "later" else None
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        # one batch shape for every chunk: a 30-layer model compiles once
        ids = np.full((batch_size, n_pos), pad, np.int32)
        mask = np.zeros((batch_size, n_pos), np.int32)
        for i, s in enumerate(chunk):
            ids[i, :len(s)], mask[i, :len(s)] = s, 1
        logits = np.asarray(model(ids, mask))
        for i, (s, r) in enumerate(zip(chunk, rows[start:start + batch_size])):
            last = logits[i, len(s) - 1].astype(np.float64)
            if criterion == "top1":
                out.append(int(last.argmax()) == r["correct_idx"])
            elif criterion == "pair":
                out.append(last[r["correct_idx"]] > last[r["incorrect_idx"]])
            else:
                p = np.exp(last - last.max())
                p = p[years] / p.sum()
                later = np.arange(100) > int(r["label"])
                out.append(p[later].sum() > p[~later].sum())
    return np.array(out, dtype=bool)


def write_rows_csv(rows: Sequence[dict], path: str) -> str:
    """Write rows of :func:`generate_real` to ``path`` in the reference's CSV format
    (``clean, corrupted`` and ``correct_idx, incorrect_idx`` or ``label``), atomically."""
    from .data import write_pairs_csv

    return write_pairs_csv(rows, path)


def word_level(tokenizer) -> bool:
    """True for a word-level tokenizer like the shipped model's (ordinary punctuation,
    ``"store,"``, is outside its vocabulary): its prompts are :func:`generate`'s words;
    any other tokenizer gets :func:`generate_real`'s natural text."""
    unk = getattr(tokenizer, "unk_token_id", None)
    return unk is not None and unk in tokenizer("the store, then", add_special_tokens=False)["input_ids"]


def write_task_csv(task: str, n: int, path: str, model, seed: int = 0, keep_correct: bool = False) -> dict:
    """``jaxinterp generate``: ``n`` pairs of ``task`` for ``model`` (a :class:`jaxinterp.Model`)
    written to ``path`` in the reference's CSV format. A word-level tokenizer (the shipped
    model's) gets :func:`generate`'s prompts; any other (SmolLM2, GPT-2, ...) gets
    :func:`generate_real`'s, scored by the model (its accuracy is returned) and, with
    ``keep_correct``, only those it gets right. Returns what was written."""
    tok = model.tokenizer
    if word_level(tok):
        if task not in TASKS:
            raise ValueError(f"task {task!r} needs a pretrained model's tokenizer; the word-level model "
                             f"{model.path} has {', '.join(TASKS)}")
        if keep_correct:
            raise ValueError("--keep-correct is for a pretrained model's natural prompts; the word-level "
                             f"model {model.path} has the generated tasks' own words")
        write_pairs_csv(task, n, path, tok, seed=seed)
        return {"task": task, "n": n, "path": path, "style": "words", "accuracy": None}
    rows = generate_real(task, n, tok, seed=seed, model=model, keep_correct=keep_correct)
    write_rows_csv(rows, path)
    return {"task": task, "n": n, "path": path, "style": "natural", "accuracy": rows.accuracy}
