"""Word-level tokenizers for small shipped and test models (no download needed)."""

from __future__ import annotations

from typing import Iterable

SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def build_word_tokenizer(words: Iterable[str]):
    """A ``PreTrainedTokenizerFast`` over ``words`` split on whitespace and punctuation.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then ``words`` in first-seen
    order. The special tokens are registered as such, so ``"<bos>" + text`` (what
    TransformerLens prepends) tokenises to the BOS id followed by the words.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in ["<pad>", "<bos>", "<eos>", "<unk>", *words]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.add_special_tokens(dict(SPECIAL))
    return fast


def save_tokenizer(tokenizer, path: str) -> None:
    """``save_pretrained``, readable by transformers 4.x as well as 5.x.

    transformers 5 records its new class name ``TokenizersBackend``, which 4.x (what
    TransformerLens 2.x and so the reference need) cannot load; the fast-tokenizer class
    name both versions know is written instead.
    """
    import json
    import os

    tokenizer.save_pretrained(path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
