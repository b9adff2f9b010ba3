"""Tokenizers: word-level ones for small shipped and test models (no download needed),
and the check that a tokenizer read from disk gives its own words back.

Why the check: ``transformers`` 5 picks a tokenizer class from the model's config as well
as from the files, and for some model types it rebuilds the tokenizer from the vocabulary
in its own way instead of reading ``tokenizer.json`` as it is: a word-level
``tokenizer.json`` in a ``qwen2`` checkpoint becomes a byte-level BPE without merges that
turns "When Mary and John went" into ``[24, 24]``, with no error. A model fed such ids
gives numbers for the wrong text.
"""

from __future__ import annotations

from typing import Iterable

from .errors import JaxinterpError

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
    name both versions know is written instead. That name says "tokenizer.json as it is",
    which :func:`jaxinterp.loading.load_tokenizer` honours for every model type (5.x's
    ``AutoTokenizer`` does not for ``qwen2``: see the module docstring).
    """
    import json
    import os

    from .io import atomic_write_text

    tokenizer.save_pretrained(path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["tokenizer_class"] = AS_SAVED[0]
    atomic_write_text(config_path, json.dumps(config, indent=2))


# tokenizer_config.json's class names that mean "the tokenizer.json as saved": the
# fast-tokenizer class of transformers 4 and 5, and transformers 5's own name for it
AS_SAVED = ("PreTrainedTokenizerFast", "TokenizersBackend")


class TokenizerError(JaxinterpError, ValueError):
    """A tokenizer that does not give its own words back (read as another class)."""


def probe_words(tokenizer, n: int = 4, head: int = 512, samples: int = 64) -> list[str]:
    """Up to ``2 n`` distinct words of the tokenizer's own vocabulary: single ids that
    decode to ASCII letters only (2 or more), ``n`` from the first ``head`` ids (word lists
    and BPE merges start there) and ``n`` from ``samples`` ids spread over the whole
    vocabulary. Decoding single ids, not reading the vocabulary, costs milliseconds even
    for 150k ids."""
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    words: list[str] = []
    for ids in (range(min(size, head)), range(0, size, max(1, size // samples))):
        found = 0
        for i in ids:
            if found == n:
                break
            word = "" if i in special else tokenizer.decode([i]).strip()
            if len(word) >= 2 and word.isascii() and word.isalpha() and word not in words:
                words.append(word)
                found += 1
    return words


def check_round_trip(tokenizer, source: str) -> None:
    """Refuse (:class:`TokenizerError`, naming ``source``) a tokenizer that does not give
    back a text made of its own vocabulary's words (:func:`probe_words`): encoded without
    special tokens and decoded, the text must come back, whitespace aside. Every faithful
    tokenizer does (word-level, byte-level BPE, SentencePiece); one that ``transformers``
    rebuilt as another class drops or merges the words. A tokenizer without such words
    (no ASCII words of two letters or more) is not checked."""
    words = probe_words(tokenizer)
    if not words:
        return
    text = " ".join(words)
    ids = tokenizer.encode(text, add_special_tokens=False)
    back = tokenizer.decode(ids, skip_special_tokens=True)
    if "".join(back.split()) != "".join(text.split()):
        raise TokenizerError(
            f"{source}: the tokenizer transformers reads there ({type(tokenizer).__name__}) does not give its own "
            f"words back: {text!r} encodes to {ids[:12]} and decodes to {back!r}, so the model would see the "
            f"wrong tokens. transformers may have rebuilt tokenizer.json as the class of the model type (it does "
            f"so for qwen2); if tokenizer.json is right as it is, set \"tokenizer_class\": "
            f"\"PreTrainedTokenizerFast\" in tokenizer_config.json")
