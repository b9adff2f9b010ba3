"""docs/smollm2_circuits.py --reuse: a method is added to an earlier result only on exactly the
recorded pairs and only when the full model and the empty circuit measure as recorded; the
comparison it states counts sizes as written out by hand here. No model is run."""

import importlib.util
import json
import os

import numpy as np
import pytest

from jaxinterp.tasks import write_rows_csv

_PATH = os.path.join(os.path.dirname(__file__), "..", "docs", "smollm2_circuits.py")
_spec = importlib.util.spec_from_file_location("smollm2_circuits", _PATH)
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

ROWS = [{"clean": "When Amy and Tom went out, Tom gave it to", "corrupted": "When Amy and Tom went out, Joe gave it to",
         "correct_idx": 12, "incorrect_idx": 34, "task": "ioi", "words": "Amy Tom"},
        {"clean": "Ann and Bob met. Bob said to", "corrupted": "Ann and Bob met. Sue said to",
         "correct_idx": 56, "incorrect_idx": 78, "task": "ioi", "words": "Ann Bob"}]


def test_recorded_pairs_from_the_csvs_match_the_generated_rows(tmp_path):
    write_rows_csv(ROWS[:1], str(tmp_path / "train.csv"))
    write_rows_csv(ROWS[1:], str(tmp_path / "heldout.csv"))
    rec = script.recorded_pairs({}, str(tmp_path))  # a result from before the JSON held its pairs
    assert rec == {"train": [["When Amy and Tom went out, Tom gave it to", "When Amy and Tom went out, Joe gave it to",
                              "12", "34"]],
                   "heldout": [["Ann and Bob met. Bob said to", "Ann and Bob met. Sue said to", "56", "78"]]}
    script.check_same_pairs(rec, {"train": script.pair_records(ROWS[:1]), "heldout": script.pair_records(ROWS[1:])})
    # the JSON's own record wins over the files
    assert script.recorded_pairs({"pairs": {"train": [], "heldout": []}}, str(tmp_path)) == {"train": [], "heldout": []}


def test_other_pairs_are_refused_naming_the_first_difference():
    rec = {"train": script.pair_records(ROWS), "heldout": []}
    swapped = [dict(ROWS[0]), dict(ROWS[1], incorrect_idx=79)]
    with pytest.raises(ValueError, match="train pairs.*pair 1"):
        script.check_same_pairs(rec, {"train": script.pair_records(swapped), "heldout": []})
    with pytest.raises(ValueError, match="1 against 2 pairs.*pair 1"):
        script.check_same_pairs(rec, {"train": script.pair_records(ROWS[:1]), "heldout": []})


def test_ends_must_agree_within_a_thousandth_of_the_full_minus_empty_gap():
    recorded = {"model": 3.0, "empty": -1.0}  # gap 4: tolerance 0.004
    check = script.check_ends(recorded, 3.003, -1.0)
    assert check["tolerance"] == pytest.approx(0.004) and check["abs_diff"]["model"] == pytest.approx(0.003)
    with pytest.raises(ValueError, match="differ from the recorded"):
        script.check_ends(recorded, 3.0, -1.005)


def _result(curves):
    return {"n_train": 10, "n_heldout": 10,
            "curves": {k: {s: {"faithfulness": v} for s in ("train", "heldout")} for k, v in curves.items()}}


def test_ordering_counts_sizes_closer_to_one_and_higher():
    eap, inputs, acts = [0.2, 0.5, 0.9, 1.2], [0.3, 0.4, 1.05, 1.0], [0.25, 0.7, 0.8, 1.5]
    # inputs vs EAP: |1-f| 0.7<0.8 yes, 0.6<0.5 no, 0.05<0.1 yes, 0<0.2 yes -> closer 3; higher: 0.3, 1.05 -> 2
    # acts vs EAP: 0.75<0.8 yes, 0.3<0.5 yes, 0.2<0.1 no, 0.5<0.2 no -> closer 2; higher: 0.25, 0.7, 1.5 -> 3
    # acts vs inputs: 0.75<0.7 no, 0.3<0.6 yes, 0.2<0.05 no, 0.5<0 no -> closer 1; higher: 0.7, 1.5 -> 2
    out = script.ordering(_result({"EAP": eap, "EAP-IG-inputs": inputs, "EAP-IG-activations": acts}))
    assert out["EAP-IG-inputs/train"] == {"closer_to_1": 3, "higher": 2, "of": 4}
    assert out["EAP-IG-activations/heldout"] == {"closer_to_1": 2, "higher": 3, "of": 4}
    assert out["EAP-IG-activations vs EAP-IG-inputs/train"] == {"closer_to_1": 1, "higher": 2, "of": 4}
    assert out["mean_abs_1_minus_f"]["EAP/train"] == pytest.approx(np.mean([0.8, 0.5, 0.1, 0.2]))
    assert "is mixed" in out["statement"]  # inputs wins at most sizes, activations at half: no majority either way


def test_added_curves_take_their_place_in_the_table():
    curves = {"EAP": 1, "EAP-IG-inputs": 2, "clean-corrupted": 3, "Edge Pruning mask logits": 4, "EAP-IG-activations": 5}
    assert list(script.ordered_curves(curves)) == ["EAP", "EAP-IG-inputs", "EAP-IG-activations", "clean-corrupted",
                                                   "Edge Pruning mask logits"]


def test_reuse_refuses_before_loading_a_model(tmp_path, capsys):
    prev = {"args": {"model": "smollm2", "train": 10, "heldout": 10, "seed": 0, "ig_steps": 5, "batch_size": 10},
            "curves": {"EAP": {}, "EAP-IG-inputs": {}, "clean-corrupted": {}}}
    (tmp_path / "smollm2_circuits.json").write_text(json.dumps(prev))
    new = str(tmp_path / "new")
    for argv, why in ((["--reuse", str(tmp_path), "--out", str(tmp_path)], "never overwritten"),
                      (["--reuse", str(tmp_path), "--out", new, "--train", "3"], "takes --train from the earlier run"),
                      (["--reuse", str(tmp_path), "--out", new, "--methods", "EAP,clean-corrupted"], "already in")):
        with pytest.raises(SystemExit):
            script.main(argv)
        assert why in capsys.readouterr().err
    assert not os.path.exists(new)
