"""Random-init Hugging Face checkpoints for tests and benchmarks (needs torch).

Nothing is downloaded: the model is ``transformers`` code with random weights and the
tokenizer a word-level one over a small vocabulary.
"""

from __future__ import annotations

import os
from typing import Sequence

from .tokenizer import build_word_tokenizer

NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Kate", "Anna", "Paul", "Lucy", "Mark", "Emma", "Jack"]
WORDS = ["When", "and", "went", "to", "the", "store", ",", "gave", "a", "drink", "book", "ball",
         "park", "school", "Then", "had", "fun", "at", "."]


def small_vocab() -> list[str]:
    return NAMES + WORDS


def save_random_gpt2(path: str, *, n_layer: int = 2, n_head: int = 4, n_embd: int = 64, n_inner=None,
                     n_positions: int = 64, tie: bool = True, seed: int = 0,
                     words: Sequence[str] | None = None, **extra) -> str:
    """Save a random-init ``GPT2LMHeadModel`` plus a word tokenizer to ``path``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_word_tokenizer(words if words is not None else small_vocab())
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_inner=n_inner,
                        n_positions=n_positions, vocab_size=len(tok), tie_word_embeddings=tie,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random LayerNorm affine parameters, so that conversion of them is tested
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
