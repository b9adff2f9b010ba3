"""Tokenizers: word-level ones for small shipped and test models (no download needed),
and the check that a tokenizer read from disk gives its own words back.

Why the check: ``transformers`` 5 picks a tokenizer class from the model's config as well
as from the files, and for some model types it rebuilds the tokenizer from the vocabulary
in its own way instead of reading ``tokenizer.json`` as it is: a word-level
``tokenizer.json`` in a ``qwen2`` checkpoint becomes a byte-level BPE without merges that
turns "When Mary and John went" into ``[24, 24]``, with no error. A model fed such ids
gives numbers for the wrong text.

:class:`JsonTokenizer` reads such a ``tokenizer.json`` as it is without importing
``transformers`` (importing it costs ~1.75 s of every command: its lazy ``__init__`` scans
the whole package), with the special tokens and options of ``tokenizer_config.json``
resolved as ``PreTrainedTokenizerFast.from_pretrained`` (transformers 5) resolves them.
"""

from __future__ import annotations

import numbers
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

    transformers 5 records its new class name ``TokenizersBackend`` and a list of extra
    special tokens as ``extra_special_tokens``, which 4.x (what TransformerLens 2.x and so
    the reference need) cannot load; :func:`readable_by_4x` writes what both versions read.
    Its class name says "tokenizer.json as it is", which
    :func:`jaxinterp.loading.load_tokenizer` honours for every model type (5.x's
    ``AutoTokenizer`` does not for ``qwen2``: see the module docstring).
    """
    import json
    import os

    from .io import atomic_write_text

    tokenizer.save_pretrained(path)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    atomic_write_text(config_path, json.dumps(readable_by_4x(config), indent=2))


def readable_by_4x(config: dict) -> dict:
    """transformers 5's ``tokenizer_config.json`` as 4.x reads it too: the class name both
    know (:data:`AS_SAVED`), and the extra special tokens under their 4.x name
    ``additional_special_tokens`` (5 writes a list as ``extra_special_tokens``, which 4.x
    takes for a dict of named tokens and fails on; 5 reads either name)."""
    config = {**config, "tokenizer_class": AS_SAVED[0]}
    if isinstance(config.get("extra_special_tokens"), list):
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    return config


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


# transformers' named special tokens, in the order its ``all_special_tokens`` lists them
NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# what transformers' decode removes with clean_up_tokenization_spaces (WordPiece-era text)
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _added(obj):
    """``tokenizer_config.json``'s serialised ``AddedToken`` dicts (``"__type": "AddedToken"``)
    as :class:`tokenizers.AddedToken`, anywhere in ``obj`` (transformers' ``convert_added_tokens``)."""
    from tokenizers import AddedToken

    if isinstance(obj, dict) and obj.get("__type") == "AddedToken":
        return AddedToken(**{k: v for k, v in obj.items() if k != "__type"})
    if isinstance(obj, (list, tuple)):
        return [_added(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _added(v) for k, v in obj.items()}
    return obj


def resolve_special_tokens(config: dict, special_map: dict | None, added: list) -> tuple[dict, list, list]:
    """The special tokens of a saved tokenizer as transformers 5's ``from_pretrained`` and
    ``TokenizersBackend.__init__`` resolve them.

    config: ``tokenizer_config.json``; special_map: ``special_tokens_map.json`` (or None),
    read only when ``config`` has no ``added_tokens_decoder`` (transformers' legacy path);
    added: the ``AddedToken`` s of ``tokenizer.json`` (its ``added_tokens``).
    Returns ``(named, extra, to_add)``: ``named`` the named special tokens in
    ``all_special_tokens`` order (the seven standard names, then model-specific ``*_token``
    keys), each a string, an ``AddedToken`` or None; ``extra`` the extra special tokens;
    ``to_add`` the tokens transformers adds to the backend (``add_tokens``) at load.
    """
    from tokenizers import AddedToken

    kwargs = {k: v for k, v in config.items() if k not in ("tokenizer_class", "add_bos_token", "add_eos_token")}
    if "additional_special_tokens" in kwargs and not kwargs.get("extra_special_tokens"):
        kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
    # model-specific names given as plain strings (dicts become AddedTokens only below)
    explicit = {k: kwargs.pop(k) for k in list(kwargs)
                if k not in NAMED and k.endswith("_token") and isinstance(kwargs[k], str)}
    if isinstance(kwargs.get("extra_special_tokens"), dict):
        explicit.update(kwargs.pop("extra_special_tokens"))
    decoder: dict[int, AddedToken] = {}
    by_text: dict[str, AddedToken] = {}
    if "added_tokens_decoder" in kwargs:
        for idx, token in kwargs.pop("added_tokens_decoder").items():
            decoder[int(idx)] = token = _added({"__type": "AddedToken", **token} if isinstance(token, dict) else token)
            by_text[str(token)] = token
    else:  # legacy: special_tokens_map.json overrides the config; tokenizer.json's added tokens
        for key, value in (special_map or {}).items():
            if isinstance(value, dict) and key != "extra_special_tokens":
                value = AddedToken(**{k: v for k, v in value.items() if k not in ("special", "__type")}, special=True)
            elif key == "extra_special_tokens" and isinstance(value, list):
                merged = list(kwargs.get("extra_special_tokens") or [])
                for tok in value:
                    tok = AddedToken(**tok, special=True) if isinstance(tok, dict) else tok
                    if tok not in merged:
                        merged.append(tok)
                value = merged
            kwargs[key] = value
        if isinstance(kwargs.get("extra_special_tokens"), dict):
            explicit.update(kwargs.pop("extra_special_tokens"))
        for token in added:
            decoder[len(decoder)] = token  # ids do not matter here, only the order
            by_text[str(token)] = token
    kwargs = _added(kwargs)
    if "additional_special_tokens" in kwargs and "extra_special_tokens" not in kwargs:  # from the legacy map
        kwargs["extra_special_tokens"] = kwargs.pop("additional_special_tokens")
    named = {k: kwargs.get(k) for k in NAMED}
    for k in NAMED:
        if named[k] is not None and by_text:
            named[k] = by_text.get(str(named[k]), named[k])
    auto = {k: v for k, v in kwargs.items() if k not in NAMED and k.endswith("_token") and isinstance(v, AddedToken)}
    named.update({**auto, **_added(explicit)})
    extra = kwargs.get("extra_special_tokens") or []
    for name, token in [*named.items(), *(("extra_special_tokens", t) for t in extra)]:
        if token is not None and not isinstance(token, (str, AddedToken)):  # as transformers refuses it
            raise TypeError(f"special token {name} has to be a string or an AddedToken, not {token!r}")
    # TokenizersBackend.__init__: every token of the decoder (its duplicate check compares
    # ids with tokens, so none is ever dropped), then each special token not yet added
    to_add = [t for _, t in sorted(decoder.items(), key=lambda kv: kv[0])]
    return named, list(extra), to_add


class JsonTokenizer:
    """A ``tokenizer.json`` read with the Rust ``tokenizers`` package, offering the part of
    ``PreTrainedTokenizerFast`` jaxinterp uses, with the same results on the same files.

    Build with :meth:`from_dir`. Special tokens are ``<name>`` / ``<name>_id`` attributes
    (``bos_token``, ``bos_token_id``, ... ``None`` when unset; model-specific names such as
    ``image_token`` as the config gives them).
    """

    def __init__(self, backend, config: dict, named: dict, extra: list, source: str = ""):
        self._tokenizer = backend
        self.init_kwargs = dict(config)
        self._named = named
        self._extra = extra
        self.name_or_path = source
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._cleanup_bpe = bool(config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                                            False))

    @classmethod
    def from_dir(cls, path: str, config: dict | None = None) -> "JsonTokenizer":
        """``path``'s ``tokenizer.json``, with ``tokenizer_config.json`` (``config`` if already
        read) and ``special_tokens_map.json``. A file that cannot be read is refused
        (:class:`TokenizerError`) naming it and the cause."""
        import json
        import os

        from tokenizers import AddedToken, Tokenizer, processors

        def read(name: str, default):
            file = os.path.join(path, name)
            if not os.path.exists(file):
                return default
            try:
                with open(file, encoding="utf-8") as f:
                    value = json.load(f)
            except (OSError, ValueError) as e:
                raise TokenizerError(f"{file}: cannot be read as JSON: {e}") from None
            if not isinstance(value, dict):
                raise TokenizerError(f"{file}: a JSON object was expected, found {type(value).__name__}")
            return value

        config = read("tokenizer_config.json", {}) if config is None else config
        special_map = read("special_tokens_map.json", None)
        file = os.path.join(path, "tokenizer.json")
        try:
            backend = Tokenizer.from_file(file)
        except Exception as e:  # the Rust reader raises its own Exception type on malformed files
            raise TokenizerError(f"{file}: the tokenizers package cannot read it: {e}") from None
        added = [t for _, t in sorted(backend.get_added_tokens_decoder().items())]
        try:
            named, extra, to_add = resolve_special_tokens(config, special_map, added)
        except (TypeError, ValueError, AttributeError) as e:
            files = "tokenizer_config.json" + (" or special_tokens_map.json" if special_map else "")
            raise TokenizerError(f"{path}: a special token of {files} is malformed: {type(e).__name__}: {e}") from None
        # plain encode/decode: transformers turns the saved truncation and padding off per call
        backend.no_truncation()
        backend.no_padding()
        present = {t.content for t in backend.get_added_tokens_decoder().values()} | {str(t) for t in to_add}
        for token in [*(v for v in named.values() if v is not None), *extra]:
            if str(token) not in present and token not in to_add:
                to_add.append(token)
        named_texts = {str(v) for v in named.values() if v is not None}
        tokens = []
        for token in to_add:
            if isinstance(token, str):
                token = AddedToken(token, special=True)
            elif not token.special and str(token) in named_texts:
                token.special = True
            tokens.append(token)
        if tokens:
            backend.add_tokens(tokens)
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        if backend.post_processor is None:  # transformers installs an empty template (add_bos/eos are dropped)
            backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
        return cls(backend, config, named, extra, source=path)

    # --- special tokens ---------------------------------------------------------------------

    def __getattr__(self, key: str):
        named = self.__dict__.get("_named", {})
        name = key[:-3] if key.endswith("_id") else key
        if name not in named:
            raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")
        value = named[name]
        if value is None:
            return None
        return self.convert_tokens_to_ids(str(value)) if key != name else str(value)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: str(v) for k, v in self._named.items() if v is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens, then extra ones, each once (transformers' order)."""
        out: list[str] = []
        for token in [*(v for v in self._named.values() if v is not None), *self._extra]:
            if str(token) not in out:
                out.append(str(token))
        return out

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    # --- vocabulary ---------------------------------------------------------------------------

    @property
    def backend_tokenizer(self):
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """The full vocabulary, with added tokens (transformers' ``len(tokenizer)``)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        """A token's id (the unknown token's id, or None, for a token outside the vocabulary);
        a list of tokens gives a list."""
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens: bool = False):
        """An id's token (None outside the vocabulary); a sequence of ids gives a list."""
        if isinstance(ids, numbers.Integral):
            return self._tokenizer.id_to_token(int(ids))
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    # --- encoding and decoding ----------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """``text``'s ids; ``add_special_tokens`` applies the saved post-processor (e.g. a BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one text (str), not {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text, add_special_tokens: bool = True) -> dict[str, list]:
        """``{"input_ids": ids, "attention_mask": ones}`` of a text, or of each of a list of
        texts (lists of lists), unpadded, as transformers' ``tokenizer(text)`` returns them."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            ids = [e.ids for e in self._tokenizer.encode_batch(list(text), add_special_tokens=add_special_tokens)]
            return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        raise TypeError(f"a text (str) or a list of texts was expected, not {type(text).__name__}")

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        """The text of ``ids`` (an id, or a sequence of ids: list, tuple, 1-d numpy array).

        ``clean_up_tokenization_spaces`` (default: the config's, else False) removes spaces
        before punctuation, except for a BPE model, where transformers 5 skips it (it would
        corrupt the text) unless the config forces it."""
        if isinstance(ids, numbers.Integral):
            ids = [ids]
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean and (type(self._tokenizer.model).__name__ != "BPE" or self._cleanup_bpe):
            for before, after in _CLEANUP:
                text = text.replace(before, after)
        return text

    # --- saving -------------------------------------------------------------------------------

    def save_pretrained(self, path: str) -> None:
        """``tokenizer.json`` (with the tokens added at load) and ``tokenizer_config.json``
        (as read, with the resolved special tokens and the class name both transformers 4
        and 5 read as "tokenizer.json as it is"): what :func:`save_tokenizer` writes."""
        import json
        import os

        from .io import atomic_write_text

        os.makedirs(path, exist_ok=True)
        atomic_write_text(os.path.join(path, "tokenizer.json"), self._tokenizer.to_str(pretty=True))
        # as transformers 5's save_pretrained writes it (the resolved special tokens, the extra
        # ones as one list, added tokens only in tokenizer.json), then as save_tokenizer adapts it
        config = {k: v for k, v in self.init_kwargs.items()
                  if k not in ("added_tokens_decoder", "additional_special_tokens", "extra_special_tokens")}
        config.update(self.special_tokens_map)
        if self._extra:
            config["extra_special_tokens"] = [str(t) for t in self._extra]
        config = readable_by_4x(config)
        atomic_write_text(os.path.join(path, "tokenizer_config.json"), json.dumps(config, indent=2))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
                f"special_tokens={self.special_tokens_map})")
