"""Loading: the tokenizer a checkpoint directory holds is read as it was saved, and one
that does not give its own words back is refused, naming the directory.

The bug these guard: transformers 5 reads a word-level ``tokenizer.json`` in a ``qwen2``
checkpoint as ``Qwen2Tokenizer`` (a byte-level BPE rebuilt from the vocabulary, without
merges), which turns "When Mary and John went" into ``[24, 24]`` with no error.
"""

import json
import os
import shutil

import pytest

from devtools.testing import save_random_qwen2, small_vocab, trained_tokenizer
from jaxinterp import load_model
from jaxinterp.cli import main
from jaxinterp.loading import demo_model_dir, load_tokenizer
from jaxinterp.tokenizer import TokenizerError, build_word_tokenizer, check_round_trip, save_tokenizer

SENTENCE = "When Mary and John went to the store , John gave a drink to"


def word_ids(text):
    """The ids build_word_tokenizer documents: 4 special tokens, then the words in order."""
    return [4 + small_vocab().index(w) for w in text.split()]


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return save_random_qwen2(str(tmp_path_factory.mktemp("qwen2")))


@pytest.fixture(scope="module")
def misread_dir(qwen2_dir, tmp_path_factory):
    """The same checkpoint without the recorded tokenizer class: AutoTokenizer then takes
    the class of the model type."""
    path = str(tmp_path_factory.mktemp("misread") / "qwen2")
    shutil.copytree(qwen2_dir, path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    del config["tokenizer_class"]
    with open(config_path, "w") as f:
        json.dump(config, f)
    return path


def test_the_random_qwen2_checkpoint_reads_back_its_word_tokenizer(qwen2_dir):
    model = load_model(qwen2_dir)
    assert model.tokenizer(SENTENCE, add_special_tokens=False)["input_ids"] == word_ids(SENTENCE)


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "mistral", "qwen2", "gemma", "gemma2", "gpt_neox"])
def test_every_family_reads_back_the_saved_tokenizer(model_type, tmp_path):
    """Each model type devtools.testing writes (only the config matters to the choice)."""
    from transformers import AutoConfig

    AutoConfig.for_model(model_type).save_pretrained(tmp_path)
    save_tokenizer(build_word_tokenizer(small_vocab()), str(tmp_path))
    tok = load_tokenizer(str(tmp_path))
    assert tok(SENTENCE, add_special_tokens=False)["input_ids"] == word_ids(SENTENCE)
    assert tok.decode(word_ids(SENTENCE)) == SENTENCE.replace(" ,", ",")


def test_a_misread_qwen2_tokenizer_is_refused(misread_dir):
    from transformers import AutoTokenizer

    misread = AutoTokenizer.from_pretrained(misread_dir)(SENTENCE, add_special_tokens=False)["input_ids"]
    if misread == word_ids(SENTENCE):
        pytest.skip("this transformers reads tokenizer.json as it is for qwen2 (4.x): nothing to refuse")
    with pytest.raises(TokenizerError, match=rf"{misread_dir}: the tokenizer .*\(Qwen2Tokenizer\) does not give "
                                             r"its own words back: 'Mary John .*tokenizer_class"):
        load_model(misread_dir)


def test_the_command_line_refuses_it_in_one_line(misread_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    if AutoTokenizer.from_pretrained(misread_dir)("Mary John")["input_ids"] == word_ids("Mary John"):
        pytest.skip("this transformers reads tokenizer.json as it is for qwen2 (4.x): nothing to refuse")
    out = tmp_path / "pairs.csv"
    code = main(["generate", "ioi", "--n", "2", "--out", str(out), "--model", misread_dir])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"jaxinterp generate: error: {misread_dir}: the tokenizer"), err
    assert not out.exists()



def test_a_tokenizer_config_that_is_no_json_object_is_refused_in_one_line(tmp_path, capsys):
    """A tokenizer_config.json holding a list (not an object) is refused naming the file,
    exit status 2, before transformers fails on it with an AttributeError."""
    model = tmp_path / "model"
    shutil.copytree(demo_model_dir(), model)
    (model / "tokenizer_config.json").write_text('["bos_token"]')
    out = tmp_path / "pairs.csv"
    code = main(["generate", "ioi", "--n", "2", "--out", str(out), "--model", str(model)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err == (f"jaxinterp generate: error: {model / 'tokenizer_config.json'}: a JSON object was expected, "
                   f"found list"), err
    assert not out.exists()

def _trained(kind):
    """A small tokenizer trained here: byte-level BPE (GPT-2's scheme) or SentencePiece's
    Metaspace with a Unigram model, as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    corpus = [SENTENCE, "Then Alice and Bob had fun at the park .", "Kate gave a ball to Tom at school ."] * 20
    tok = trained_tokenizer("bpe", corpus, 300, ["<|endoftext|>"]) if kind == "byte-level BPE" else \
        trained_tokenizer("unigram", corpus, 80, ["<unk>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("kind", ["word", "demo", "byte-level BPE", "Metaspace Unigram"])
def test_faithful_tokenizers_pass_the_check(kind):
    """Every kind the project loads passes (SmolLM2's GGUF tokenizer: every load_model
    ("smollm2") in test_gguf and test_golden_smollm2 runs the check)."""
    if kind == "word":
        tok = build_word_tokenizer(small_vocab())
    elif kind == "demo":
        tok = load_tokenizer(demo_model_dir())  # checked inside
    else:
        tok = _trained(kind)
    check_round_trip(tok, kind)


def test_a_tokenizer_that_loses_words_is_refused():
    """The failure the check is for, without depending on transformers' choice of class:
    the word vocabulary split into single characters (most unknown), as a BPE without
    merges does."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", *small_vocab()])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(TokenizerError, match=r"^chars: the tokenizer .* does not give its own words back"):
        check_round_trip(fast, "chars")


def test_a_saved_tokenizer_loads_without_importing_transformers(tmp_path):
    """Importing transformers costs ~1.75 s of every command; a checkpoint whose tokenizer
    is tokenizer.json as saved (the demo model, every test checkpoint) needs none of it:
    load_model and a command that tokenises ('generate') leave it unimported."""
    import subprocess
    import sys

    out = str(tmp_path / "pairs.csv")
    code = ("import sys\n"
            "from jaxinterp import load_model\n"
            "from jaxinterp.cli import main\n"
            "from jaxinterp.loading import demo_model_dir\n"
            "tok = load_model(demo_model_dir()).tokenizer\n"
            f"assert main(['generate', 'ioi', '--n', '4', '--out', {out!r}]) == 0\n"
            "print(type(tok).__name__, tok('When Mary and John went')['input_ids'], 'transformers' in sys.modules)")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    expected = load_tokenizer(demo_model_dir())("When Mary and John went")["input_ids"]
    assert child.stdout.strip().splitlines()[-1] == f"JsonTokenizer {expected} False"
    assert os.path.getsize(out) > 0
