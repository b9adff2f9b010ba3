"""Make ``tests/golden/tokenizer_4x/``: a word tokenizer saved by transformers 4.57 (the
reference's venv), for ``tests/test_tokenizer.py``: the files a checkpoint saved on the
reference's stack has (``tokenizer_config.json`` with ``added_tokens_decoder``,
``special_tokens_map.json``), which jaxinterp reads with ``JsonTokenizer``. Not run in CI;
its outputs are committed. From the repository root::

    /tmp/refvenv/bin/python tests/golden/make_tokenizer_4x.py

The tokenizer: jaxinterp.tokenizer.build_word_tokenizer's construction (written out here:
the reference venv has no jaxinterp) over a few words, plus an extra special token and a
plain added token.
"""

import os

import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer_4x")
WORDS = ["When", "Mary", "and", "John", "went", "to", "the", "store", ",", "gave", "a", "drink", ".", "19", "87"]
SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def main():
    assert transformers.__version__.startswith("4."), transformers.__version__
    vocab = {}
    for w in ["<pad>", "<bos>", "<eos>", "<unk>", *WORDS]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.add_special_tokens({**SPECIAL, "additional_special_tokens": ["<extra>"]})
    fast.add_tokens([AddedToken("<plain>", special=False)])
    fast.save_pretrained(OUT)
    print(f"wrote {OUT} with transformers {transformers.__version__}: {sorted(os.listdir(OUT))}")


if __name__ == "__main__":
    main()
