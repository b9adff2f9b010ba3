"""Clean/corrupted prompt pairs: the reference's CSV format, tokenised and batched.

CSV columns: ``clean``, ``corrupted`` and labels, either ``correct_idx, incorrect_idx``
(token ids, as the reference's IOI data) or ``label`` (an integer, as its greater-than
data: the two-digit start year).

Tokenisation follows TransformerLens ``to_tokens(prepend_bos=True, padding_side='right')``
as the reference uses it: BOS prepended, right padding, per-example lengths; the metric
reads the last real position. Unlike the reference (which raises when clean and corrupted
batches pad to different lengths) both are padded to one common length for the whole
data set, so every batch has the same shape and the program compiles once.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
from typing import Iterator, Optional, Sequence

import numpy as np


class DataError(ValueError):
    """A data file or row that cannot be used (the message names the row)."""


@dataclasses.dataclass(frozen=True)
class Pairs:
    """A tokenised data set, padded to one length.

    clean, corrupted: ``[example, pos]`` int32 token ids (right padded).
    attention_mask: ``[example, pos]`` int32, 1 on the clean prompt's real tokens (the
        reference runs both prompts with the clean mask).
    lengths: ``[example]`` clean lengths; the metric position is ``lengths - 1``.
    labels: ``[example, 2]`` (correct, incorrect token ids) or ``[example]`` (integer label).
    """

    clean: np.ndarray
    corrupted: np.ndarray
    attention_mask: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    corrupted_lengths: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.clean)

    @property
    def n_pos(self) -> int:
        return self.clean.shape[1]

    def head(self, n: int) -> "Pairs":
        """The first ``n`` examples (``n >= 1``; a slice would turn 0 into all and -15 into 1)."""
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"the number of examples to keep must be an integer >= 1, got {n!r}")
        return Pairs(*(None if a is None else a[:n] for a in dataclasses.astuple(self)))

    def padded_to(self, n_pos: int) -> "Pairs":
        """These pairs right-padded to ``n_pos >= self.n_pos`` tokens (attention mask 0).
        Harmless for every position-free result: attention is causal, so no real token
        sees a padding token, and metrics read each prompt's last real token."""
        if n_pos < self.n_pos:
            raise ValueError(f"cannot pad prompts of {self.n_pos} tokens to {n_pos}")
        if n_pos == self.n_pos:
            return self
        widen = lambda a: np.pad(a, ((0, 0), (0, n_pos - self.n_pos)), mode="edge")  # noqa: E731 (ids stay in the vocabulary)
        mask = np.pad(self.attention_mask, ((0, 0), (0, n_pos - self.n_pos)))
        return dataclasses.replace(self, clean=widen(self.clean), corrupted=widen(self.corrupted), attention_mask=mask)

    def batches(self, batch_size: int) -> Iterator[dict]:
        """Fixed-shape batches; the last is padded with copies of row 0 of weight 0. With
        fewer examples than ``batch_size``, the one batch has :func:`bucket` ``(len(self))``
        rows instead (less padding; a few shapes, so compiled programs are reused)."""
        check_batch_size(batch_size)
        n = len(self)
        batch_size = min(batch_size, bucket(n))
        for start in range(0, n, batch_size):
            idx = np.arange(start, start + batch_size)
            weight = (idx < n).astype(np.float32)
            idx = np.where(idx < n, idx, 0)
            yield {
                "clean": self.clean[idx], "corrupted": self.corrupted[idx],
                "attention_mask": self.attention_mask[idx], "lengths": self.lengths[idx],
                "labels": self.labels[idx], "weight": weight,
            }

    def n_batches(self, batch_size: int) -> int:
        check_batch_size(batch_size)
        return math.ceil(len(self) / batch_size)


def bucket(n: int) -> int:
    """The smallest of ``1, 2, 3, 4, 6, 8, 12, 16, 24, ...`` (powers of two and 1.5 times
    them) that is ``>= n``: a data set smaller than the batch size runs as one batch of
    this many rows, so runs on different data reuse a few compiled programs (the
    persistent compilation cache, :mod:`jaxinterp.cache`), at most 50% padding. Lengths
    have finer buckets (:func:`length_bucket`)."""
    return _round_up(n, (6, 8))


def length_bucket(n: int) -> int:
    """The smallest of ``8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ...`` (powers of two times
    1, 1.25, 1.5 or 1.75, from 8) that is ``>= n``: padded lengths are rounded up to these,
    at most 25% padding. Finer than :func:`bucket` because a program's time grows with its
    length (SmolLM2-135M EAP, 32 IOI pairs of 15-19 tokens in one batch: padded to 24, 10.3 s;
    to 20, 8.3 s), while a new length costs one compilation, kept by the persistent cache."""
    return _round_up(n, (5, 6, 7, 8), least=8)


def _round_up(n: int, eighths: tuple, least: int = 1) -> int:
    """The smallest ``p * e / 8 >= max(n, least)`` for ``e`` in ``eighths`` (ascending,
    ending with 8) and ``p`` the smallest power of two ``>= max(n, least)``."""
    if n < 1:
        raise ValueError(f"cannot bucket {n}")
    n = max(int(n), least)
    p = 1 << (n - 1).bit_length()
    return next(q for q in (p * e // 8 for e in eighths) if q >= n)


def bucket_length(pairs: "Pairs", n_ctx: Optional[int] = None) -> "Pairs":
    """``pairs`` right-padded to :func:`length_bucket` of their length (at most the model's
    context ``n_ctx``). For position-free results only: position-aware ones (scores or
    means per position) need the data's own length."""
    n_pos = length_bucket(pairs.n_pos)
    if n_ctx is not None:
        n_pos = max(min(n_pos, n_ctx), pairs.n_pos)
    return pairs.padded_to(n_pos)


def check_batch_size(batch_size) -> None:
    """ValueError unless ``batch_size`` is an integer >= 1 (a negative one once gave all-zero scores)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")


@contextlib.contextmanager
def text_errors(path: str):
    """Reading ``path`` inside: a decoding or CSV error becomes one :class:`DataError`
    naming the file and the cause."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except csv.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None


def read_pairs_csv(path: str) -> list[dict]:
    """Rows of a pairs CSV as dicts with ``clean``, ``corrupted`` and label fields (UTF-8;
    a byte-order mark is skipped). Errors name the file and the line."""
    from .io import open_text

    with text_errors(path), open_text(path, newline="") as f:
        return _read_pairs(path, f)


def write_pairs_csv(rows: Sequence[dict], path: str) -> str:
    """Write ``rows`` as a pairs CSV in the reference's format, atomically: the inverse of
    :func:`read_pairs_csv`, and the one writer of this format (generated tasks, MIB data,
    the tests' and benchmarks' data). Columns ``clean, corrupted`` and, from the first row,
    ``correct_idx, incorrect_idx`` or ``label``; a row's other keys are not written."""
    import io as _io

    from .io import atomic_write_text

    if not rows:
        raise DataError(f"{path}: no rows to write")
    labels = ["label"] if "label" in rows[0] else ["correct_idx", "incorrect_idx"]
    buf = _io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=["clean", "corrupted"] + labels, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return atomic_write_text(path, buf.getvalue())


def _read_pairs(path: str, f) -> list[dict]:
    reader = csv.DictReader(f)
    fields = set(reader.fieldnames or [])
    if not {"clean", "corrupted"} <= fields:
        raise DataError(f"{path}: needs columns 'clean' and 'corrupted', found {sorted(fields)}")
    pair_labels = {"correct_idx", "incorrect_idx"} <= fields
    if not pair_labels and "label" not in fields:
        raise DataError(f"{path}: needs label columns 'correct_idx','incorrect_idx' or 'label', "
                        f"found {sorted(fields)}")
    rows = []
    for i, row in enumerate(reader, start=2):  # line 1 is the header
        try:
            item = {"clean": row["clean"], "corrupted": row["corrupted"]}
            if pair_labels:
                item["labels"] = (int(row["correct_idx"]), int(row["incorrect_idx"]))
            else:
                item["labels"] = int(row["label"])
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: line {i}: unreadable row {row}: {e}") from None
        if not (item["clean"] or "").strip() or not (item["corrupted"] or "").strip():
            raise DataError(f"{path}: line {i}: empty prompt")
        item["line"] = i
        rows.append(item)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def bos_id(tokenizer) -> int:
    for tok_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tok_id is not None:
            return int(tok_id)
    raise DataError("the tokenizer has neither a BOS nor an EOS token to prepend")


def tokenize(tokenizer, texts: Sequence[str], where: Sequence[str] | None = None) -> list[list[int]]:
    """``[bos] + ids`` for each text (what TransformerLens' ``to_tokens`` produces)."""
    bos = bos_id(tokenizer)
    out = []
    unk = tokenizer.unk_token_id
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise DataError(f"{where[i] if where else f'text {i}'}: prompt tokenises to nothing")
        if unk is not None and unk in ids and tokenizer.unk_token not in text:
            raise DataError(f"{where[i] if where else f'text {i}'}: {text!r} has words outside "
                            f"the tokenizer's vocabulary")
        out.append([bos] + list(ids))
    return out


def year_token_ids(tokenizer) -> np.ndarray:
    """Token ids of ``"00" .. "99"`` (the reference's greater-than ``year_indices``)."""
    return np.array([tokenizer(f"{y:02d}", add_special_tokens=False)["input_ids"][0] for y in range(100)],
                    dtype=np.int32)


def load_pairs(path_or_rows, tokenizer, vocab_size: Optional[int] = None, n_ctx: Optional[int] = None) -> Pairs:
    """Read (if a path) and tokenise a pairs data set; validate labels against the vocabulary."""
    rows = read_pairs_csv(path_or_rows) if isinstance(path_or_rows, str) else list(path_or_rows)
    where = [f"line {r.get('line', i)}" for i, r in enumerate(rows)]
    clean = tokenize(tokenizer, [r["clean"] for r in rows], where)
    corrupted = tokenize(tokenizer, [r["corrupted"] for r in rows], where)
    n_pos = max(max(map(len, clean)), max(map(len, corrupted)))
    if n_ctx is not None and n_pos > n_ctx:
        raise DataError(f"prompts of {n_pos} tokens exceed the model's context of {n_ctx}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos_id(tokenizer)

    def padded(seqs):
        arr = np.full((len(seqs), n_pos), pad, dtype=np.int32)
        for i, s in enumerate(seqs):
            arr[i, :len(s)] = s
        return arr

    lengths = np.array([len(s) for s in clean], dtype=np.int32)
    labels = np.array([r["labels"] for r in rows], dtype=np.int32)
    if labels.ndim == 2 and vocab_size is not None:
        bad = np.nonzero((labels < 0) | (labels >= vocab_size))[0]
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{where[i]}: label ids {labels[i].tolist()} are outside the vocabulary of {vocab_size}")
    if labels.ndim == 1:
        bad = np.nonzero((labels < 0) | (labels > 99))[0]
        if len(bad):
            raise DataError(f"{where[int(bad[0])]}: label {labels[bad[0]]} is not a two-digit year (0..99)")
    return Pairs(
        clean=padded(clean), corrupted=padded(corrupted),
        attention_mask=(np.arange(n_pos)[None] < lengths[:, None]).astype(np.int32),
        lengths=lengths, labels=labels,
        corrupted_lengths=np.array([len(s) for s in corrupted], dtype=np.int32),
    )
