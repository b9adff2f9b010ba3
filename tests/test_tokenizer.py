"""JsonTokenizer: a saved ``tokenizer.json`` read without ``transformers`` gives what
``transformers.PreTrainedTokenizerFast.from_pretrained`` gives on the same directory: ids
with and without special tokens, decoded text with and without them and with and without
the clean-up of spaces, the special tokens and their ids, the vocabulary, token names; and
what it saves, transformers reads back the same. (SmolLM2's GGUF tokenizer: tests/test_gguf.py.)
"""

import json
import os

import pytest

from devtools.testing import small_vocab, trained_tokenizer
from jaxinterp.loading import demo_model_dir
from jaxinterp.tokenizer import JsonTokenizer, TokenizerError, build_word_tokenizer, save_tokenizer

TEXTS = [
    "When Mary and John went to the store , John gave a drink to",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "Then, Alice and Bob had a long argument; afterwards Bob said to",
    "The war lasted from the year 1987 to the year 19",
    "don't stop . Really ? yes ! it's what we've done , isn't it",
    "caf\u00e9 na\u00efve \u2014 \u6771\u4eac",
    "  leading and trailing spaces  ",
    "multiple    spaces\tand a tab",
    "line one\nline two\n\nline four\r\n",
    "<bos>When Mary <eos> and <pad>John<unk>",
    "<|endoftext|>When Mary and John<|endoftext|> went <|sep|>",
    "Mary<sep>John <mask> went<extra> to <plain>store",
    "",
    " ",
]
NAMES = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]


def assert_same(ours, theirs):
    """Every part of the surface jaxinterp uses gives the same answer on TEXTS."""
    for text in TEXTS:
        for special in (False, True):
            ids = theirs(text, add_special_tokens=special)["input_ids"]
            assert ours(text, add_special_tokens=special)["input_ids"] == ids, (text, special)
            assert ours.encode(text, add_special_tokens=special) == theirs.encode(text, add_special_tokens=special)
        # the text's ids between every special token, so that skipping them matters
        ids = [*theirs.all_special_ids, *theirs(text, add_special_tokens=False)["input_ids"], *theirs.all_special_ids]
        for skip in (False, True):
            for clean in (None, False, True):
                assert ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean) == \
                    theirs.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean), (text, skip, clean)
    assert ours(TEXTS, add_special_tokens=False)["input_ids"] == theirs(TEXTS, add_special_tokens=False)["input_ids"]
    for name in NAMES:
        assert (getattr(ours, name), getattr(ours, name + "_id")) == (getattr(theirs, name), getattr(theirs, name + "_id"))
    assert ours.all_special_tokens == theirs.all_special_tokens
    assert ours.all_special_ids == theirs.all_special_ids
    assert (len(ours), ours.vocab_size, ours.get_vocab()) == (len(theirs), theirs.vocab_size, theirs.get_vocab())
    every = list(range(len(theirs) + 2))  # two past the end: None, as transformers gives
    assert ours.convert_ids_to_tokens(every) == theirs.convert_ids_to_tokens(every)
    assert ours.convert_ids_to_tokens(every, skip_special_tokens=True) == \
        theirs.convert_ids_to_tokens(every, skip_special_tokens=True)
    assert [ours.convert_ids_to_tokens(i) for i in every] == [theirs.convert_ids_to_tokens(i) for i in every]
    tokens = [*theirs.convert_ids_to_tokens(every[:-2]), "no-such-token", "<|sep|>"]
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens)
    assert ours.decode(theirs.all_special_ids[0]) == theirs.decode(theirs.all_special_ids[0])  # a single id


def _trained(kind: str):
    """A small tokenizer trained here on IOI-like text: byte-level BPE with GPT-2's special
    token, or SentencePiece's Metaspace with a Unigram model."""
    corpus = [TEXTS[0], TEXTS[1], TEXTS[2], "Kate gave a ball to Tom at school in 1987 ."] * 20
    if kind == "bpe":
        return trained_tokenizer("bpe", corpus, 320, ["<|endoftext|>"])
    return trained_tokenizer("unigram", corpus, 90, ["<unk>", "<s>", "</s>"])


def _saved(kind: str, path: str) -> str:
    """A tokenizer directory as jaxinterp's checkpoints have it (save_tokenizer); "edited":
    special tokens added by hand to tokenizer_config.json and special_tokens_map.json."""
    from transformers import PreTrainedTokenizerFast

    if kind == "word":  # what devtools.testing.save_random_gpt2 (every test checkpoint) writes
        tok = build_word_tokenizer(small_vocab())
    elif kind == "bpe":  # GPT-2's scheme and special tokens, plus an extra special token not in the vocabulary;
        # clean-up asked for, which transformers 5 refuses for a BPE model
        tok = PreTrainedTokenizerFast(tokenizer_object=_trained("bpe"), bos_token="<|endoftext|>",
                                      eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                      additional_special_tokens=["<|sep|>"], clean_up_tokenization_spaces=True)
    elif kind == "unigram":  # sentencepiece-like, clean-up on (applied: not BPE)
        tok = PreTrainedTokenizerFast(tokenizer_object=_trained("unigram"), unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>", pad_token="<pad>", clean_up_tokenization_spaces=True)
    save_tokenizer(build_word_tokenizer(small_vocab()) if kind == "edited" else tok, path)
    if kind == "edited":  # special tokens named in the configs only: transformers adds them at load
        _edit(os.path.join(path, "tokenizer_config.json"),
              sep_token="<sep>", mask_token={"__type": "AddedToken", "content": "<mask>", "lstrip": True,
                                             "rstrip": False, "normalized": False, "single_word": False,
                                             "special": False})  # named: made special at load
        _edit(os.path.join(path, "special_tokens_map.json"), pad_token="<eos>", additional_special_tokens=["<extra>"])
    return path


def _edit(path: str, **values) -> None:
    config = {}
    if os.path.exists(path):
        with open(path) as f:
            config = json.load(f)
    with open(path, "w") as f:
        json.dump({**config, **values}, f)


GOLDEN_4X = os.path.join(os.path.dirname(__file__), "golden", "tokenizer_4x")  # make_tokenizer_4x.py


@pytest.fixture(params=["demo", "word", "bpe", "unigram", "edited", "saved by transformers 4.57"])
def saved_dir(request, tmp_path):
    """The shipped demo model's, the kinds _saved writes, and one written by the reference's
    transformers (added_tokens_decoder in its config, special_tokens_map.json)."""
    if request.param == "demo":
        return demo_model_dir()
    return GOLDEN_4X if request.param.startswith("saved by") else _saved(request.param, str(tmp_path))


def test_reads_a_saved_tokenizer_as_transformers_does(saved_dir):
    from transformers import PreTrainedTokenizerFast

    assert_same(JsonTokenizer.from_dir(saved_dir), PreTrainedTokenizerFast.from_pretrained(saved_dir))


def test_what_it_saves_transformers_reads_back_the_same(saved_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    out = str(tmp_path / "saved")
    JsonTokenizer.from_dir(saved_dir).save_pretrained(out)
    theirs = PreTrainedTokenizerFast.from_pretrained(saved_dir)
    assert_same(PreTrainedTokenizerFast.from_pretrained(out), theirs)
    assert_same(JsonTokenizer.from_dir(out), theirs)
    for path in (saved_dir, out):  # save_tokenizer's too
        assert_readable_by_4x(path)


def assert_readable_by_4x(path: str) -> None:
    """What transformers 4.x (the reference's) needs of tokenizer_config.json, checked by
    loading these files with 4.57.6: a class name it knows, and extra special tokens
    under the name it reads as a list (a list as "extra_special_tokens" fails there:
    AttributeError: 'list' object has no attribute 'keys')."""
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        config = json.load(f)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not isinstance(config.get("extra_special_tokens"), list)


@pytest.mark.parametrize("name, content, cause", [
    ("tokenizer.json", '{"version": "1.0", "model": ', "the tokenizers package cannot read it"),
    ("tokenizer.json", '{"version": "1.0"}', "the tokenizers package cannot read it"),
    ("tokenizer_config.json", '{"bos_token": ', "cannot be read as JSON"),
    ("tokenizer_config.json", '["bos_token"]', "a JSON object was expected, found list"),
    ("special_tokens_map.json", '{"bos_token": 5}', "a special token of tokenizer_config.json or "
                                                    "special_tokens_map.json is malformed: TypeError: special token "
                                                    "bos_token has to be a string or an AddedToken, not 5"),
])
def test_a_broken_file_is_refused_naming_it(tmp_path, name, content, cause):
    path = _saved("word", str(tmp_path))
    (tmp_path / name).write_text(content)
    where = tmp_path if name == "special_tokens_map.json" else tmp_path / name
    with pytest.raises(TokenizerError, match=rf"^{where}: {cause}"):
        JsonTokenizer.from_dir(path)
