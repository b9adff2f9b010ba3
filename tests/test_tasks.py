"""Task generators: reproducible rows whose CSVs tokenise to the intended labels."""

import csv

import pytest

from jaxinterp import tasks
from jaxinterp.data import load_pairs, read_pairs_csv, year_token_ids
from jaxinterp.tokenizer import build_word_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(tasks.task_vocabulary())


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _csv(tmp_path, task, tok, n=40, seed=3):
    path = tasks.write_pairs_csv(task, n, str(tmp_path / f"{task}.csv"), tok, seed=seed)
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_vocabulary_covers_every_generated_word(tok):
    vocab = tasks.task_vocabulary()
    assert len(vocab) == len(set(vocab))
    assert {f"{y:02d}" for y in range(100)} <= set(vocab)
    for task in tasks.TASKS:
        for r in tasks.generate(task, 200, seed=1):
            for text in (r["clean"], r["corrupted"]):
                assert set(text.split()) <= set(vocab), text
                ids = _ids(tok, text)
                assert tok.unk_token_id not in ids
                assert len(ids) == len(text.split())  # one token per word
                assert len(ids) + 2 <= 32  # BOS + prompt + answer fit the demo model's context


@pytest.mark.parametrize("task", tasks.TASKS)
def test_same_seed_same_rows(task):
    assert tasks.generate(task, 30, seed=5) == tasks.generate(task, 30, seed=5)
    assert tasks.generate(task, 30, seed=5) != tasks.generate(task, 30, seed=6)
    assert tasks.generate(task, 10, seed=5) == tasks.generate(task, 30, seed=5)[:10]


def test_same_seed_same_csv(tmp_path, tok):
    a = tasks.write_pairs_csv("ioi", 20, str(tmp_path / "a.csv"), tok, seed=9)
    b = tasks.write_pairs_csv("ioi", 20, str(tmp_path / "b.csv"), tok, seed=9)
    assert open(a).read() == open(b).read()


def test_ioi_csv(tmp_path, tok):
    rows = _csv(tmp_path, "ioi", tok)
    assert list(rows[0]) == ["clean", "corrupted", "correct_idx", "incorrect_idx"]
    orders = set()
    for row, gen in zip(rows, tasks.generate("ioi", 40, seed=3)):
        clean, corrupted = _ids(tok, row["clean"]), _ids(tok, row["corrupted"])
        io, s = int(row["correct_idx"]), int(row["incorrect_idx"])
        assert tok.convert_ids_to_tokens(io) == gen["correct"] and tok.convert_ids_to_tokens(s) == gen["incorrect"]
        assert io != s and io in tasks_ids(tok, tasks.NAMES) and s in tasks_ids(tok, tasks.NAMES)
        assert clean.count(io) == 1 and clean.count(s) == 2  # IO once, the subject twice
        # corrupted: the same prompt with the second subject mention replaced by a third name
        assert len(clean) == len(corrupted)
        diff = [i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b]
        assert len(diff) == 1
        pos = diff[0]
        assert clean[pos] == s and pos == max(i for i, t in enumerate(clean) if t == s)
        assert corrupted[pos] not in (io, s) and corrupted[pos] in tasks_ids(tok, tasks.NAMES)
        assert corrupted.count(io) == 1 and corrupted.count(s) == 1
        first = min(i for i, t in enumerate(clean) if t in (io, s))
        order = "ABBA" if clean[first] == io else "BABA"
        assert order == gen["order"]
        orders.add(order)
    assert orders == {"ABBA", "BABA"}
    assert len({g["template"] for g in tasks.generate("ioi", 200, seed=0)}) == len(tasks.IOI_TEMPLATES)


def tasks_ids(tok, words):
    return {tok.convert_tokens_to_ids(w) for w in words}


def test_greater_than_csv(tmp_path, tok):
    rows = _csv(tmp_path, "greater_than", tok)
    assert list(rows[0]) == ["clean", "corrupted", "label"]
    year_ids = list(year_token_ids(tok))
    assert len(set(year_ids)) == 100 and tok.unk_token_id not in year_ids
    for row, gen in zip(rows, tasks.generate("greater_than", 40, seed=3)):
        label = int(row["label"])
        assert 2 <= label <= 98 and label == gen["label"]
        clean, corrupted = _ids(tok, row["clean"]), _ids(tok, row["corrupted"])
        words = row["clean"].split()
        # "... from the year CC YY to the year CC": the start year is the token after the century
        i = words.index("from")
        assert words[i:i + 3] == ["from", "the", "year"]
        century, yy = words[i + 3], words[i + 4]
        assert yy == f"{label:02d}" and clean[i + 4] == year_ids[label]
        assert words[-3:] == ["the", "year", century] and 11 <= int(century) <= 17
        diff = [j for j, (a, b) in enumerate(zip(clean, corrupted)) if a != b]
        assert len(clean) == len(corrupted) and diff == [i + 4] and corrupted[i + 4] == year_ids[1]
        assert label < int(gen["target"]) <= min(label + tasks.GT_MAX_SPAN, 99)


def test_induction_csv(tmp_path, tok):
    rows = _csv(tmp_path, "induction", tok)
    assert list(rows[0]) == ["clean", "corrupted", "correct_idx", "incorrect_idx"]
    for row, gen in zip(rows, tasks.generate("induction", 40, seed=3)):
        clean, corrupted = _ids(tok, row["clean"]), _ids(tok, row["corrupted"])
        n, k = gen["length"], gen["k"]
        assert len(set(clean[:n])) == n and clean[n:] == clean[:k]  # A then A[:k]
        correct, incorrect = int(row["correct_idx"]), int(row["incorrect_idx"])
        assert correct == clean[k] and incorrect not in clean
        diff = [j for j, (a, b) in enumerate(zip(clean, corrupted)) if a != b]
        assert len(clean) == len(corrupted) and diff == [k] and corrupted[k] == incorrect


@pytest.mark.parametrize("task", tasks.TASKS)
def test_csv_loads_with_data_module(tmp_path, tok, task):
    path = tasks.write_pairs_csv(task, 16, str(tmp_path / "x.csv"), tok, seed=0)
    assert len(read_pairs_csv(path)) == 16
    pairs = load_pairs(path, tok, vocab_size=len(tok), n_ctx=32)
    assert pairs.clean.shape == pairs.corrupted.shape and (pairs.clean[:, 0] == tok.bos_token_id).all()
    assert (pairs.lengths == pairs.corrupted_lengths).all()


def test_unknown_words_are_refused(tmp_path):
    small = build_word_tokenizer(["When", "and"])
    with pytest.raises(ValueError, match="vocabulary"):
        tasks.write_pairs_csv("ioi", 4, str(tmp_path / "x.csv"), small)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.generate("nope", 3)


def test_generate_command_writes_the_demo_models_word_prompts(tmp_path, capsys):
    from jaxinterp.cli import main

    out = tmp_path / "gt.csv"
    assert main(["generate", "greater_than", "--n", "8", "--out", str(out), "--seed", "2"]) == 0
    assert [r["labels"] for r in read_pairs_csv(str(out))] == [g["label"] for g in tasks.generate("greater_than", 8, 2)]
    assert "wrote 8 greater_than pairs in the model's own words" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["factual", "--n", "4"], "task 'factual' needs a pretrained model's tokenizer"),
    (["ioi", "--n", "4", "--keep-correct"], "--keep-correct is for a pretrained model"),
    (["ioi", "--n", "0"], "argument --n: 0 is not an integer >= 1"),
])
def test_generate_command_refuses_what_the_demo_model_cannot_do(tmp_path, capsys, argv, message):
    from jaxinterp.cli import main

    out = tmp_path / "x.csv"
    try:
        status = main(["generate", *argv, "--out", str(out)])
    except SystemExit as e:  # argparse's own refusals
        status = e.code
    assert status == 2 and message in capsys.readouterr().err
    assert not out.exists()
