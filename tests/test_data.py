"""Pairs CSV reading and tokenisation (TransformerLens' to_tokens conventions)."""

import pytest

from jaxinterp.data import DataError, load_pairs, read_pairs_csv, write_pairs_csv


def write(tmp_path, text):
    p = tmp_path / "d.csv"
    p.write_text(text)
    return str(p)


def test_bos_prepended_right_padded_common_length(tmp_path, model):
    tok = model.tokenizer
    mary, john = tok.convert_tokens_to_ids("Mary"), tok.convert_tokens_to_ids("John")
    path = write(tmp_path, "clean,corrupted,correct_idx,incorrect_idx\n"
                           f"When Mary and John went to the store,When Mary and John went to the park,{mary},{john}\n"
                           f"Then John had fun,Then Mary had fun at the park,{john},{mary}\n")
    pairs = load_pairs(path, tok, model.cfg.vocab_size)
    assert pairs.clean.shape == pairs.corrupted.shape == (2, 9)  # 1 BOS + 8 words, the longest prompt
    assert (pairs.clean[:, 0] == tok.bos_token_id).all()
    assert pairs.lengths.tolist() == [9, 5] and pairs.corrupted_lengths.tolist() == [9, 8]
    assert (pairs.clean[1, 5:] == tok.pad_token_id).all()
    assert pairs.attention_mask[1].tolist() == [1] * 5 + [0] * 4
    assert tok.convert_ids_to_tokens(pairs.clean[1, 1:5].tolist()) == ["Then", "John", "had", "fun"]
    assert pairs.labels.tolist() == [[mary, john], [john, mary]]


def test_integer_labels(tmp_path, model):
    pairs = load_pairs(write(tmp_path, "clean,corrupted,label\nMary went,John went,52\n"), model.tokenizer)
    assert pairs.labels.tolist() == [52]


@pytest.mark.parametrize("text, message", [
    ("clean,corrupted,correct_idx,incorrect_idx\nMary went,John went,1,x\n", "line 2: unreadable"),
    ("clean,corrupted,correct_idx,incorrect_idx\nMary went,John went,1,2\n , ,1,2\n", "line 3: empty prompt"),
    ("clean,corrupted,correct_idx,incorrect_idx\nMary went,John went,1,99999\n", "line 2: label ids"),
    ("clean,corrupted,correct_idx,incorrect_idx\nMary flew,John went,1,2\n", "line 2: .*outside the tokenizer"),
    ("clean,wrong\na,b\n", "needs columns"),
    ("clean,corrupted\na,b\n", "label columns"),
])
def test_bad_rows_are_named(tmp_path, model, text, message):
    with pytest.raises(DataError, match=message):
        load_pairs(write(tmp_path, text), model.tokenizer, model.cfg.vocab_size)


def test_batches_pad_the_last_batch_with_zero_weight(tmp_path, model):
    rows = "".join(f"Mary went,John went,{i % 5 + 4},{i % 3 + 4}\n" for i in range(5))
    pairs = load_pairs(write(tmp_path, "clean,corrupted,correct_idx,incorrect_idx\n" + rows), model.tokenizer)
    batches = list(pairs.batches(2))
    assert len(batches) == 3 and all(b["clean"].shape[0] == 2 for b in batches)
    assert batches[-1]["weight"].tolist() == [1.0, 0.0]
    assert read_pairs_csv(write(tmp_path, "clean,corrupted,label\na,b,3\n"))[0]["labels"] == 3


@pytest.mark.parametrize("labels", [{"correct_idx": 3, "incorrect_idx": 7}, {"label": 41}])
def test_written_pairs_read_back_as_written(tmp_path, labels):
    rows = [{"clean": 'He said "a, b"', "corrupted": "He said, x", "note": "not a column", **labels},
            {"clean": "ü é", "corrupted": "ö è", **labels}]
    path = write_pairs_csv(rows, str(tmp_path / "sub" / "pairs.csv"))
    back = read_pairs_csv(path)
    assert [(r["clean"], r["corrupted"]) for r in back] == [(r["clean"], r["corrupted"]) for r in rows]
    want = (3, 7) if "label" not in labels else 41
    assert all(r["labels"] == want for r in back)
    assert open(path, encoding="utf-8").readline().strip().split(",") == ["clean", "corrupted", *labels]
    with pytest.raises(DataError, match="no rows to write"):
        write_pairs_csv([], str(tmp_path / "empty.csv"))
