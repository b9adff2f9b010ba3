"""Random-init Hugging Face checkpoints for tests and benchmarks (needs torch, a test
extra: this is development code, not part of the installed package).

Nothing is downloaded: the model is ``transformers`` code with random weights and the
tokenizer a word-level one over a small vocabulary. Read that tokenizer back with
``jaxinterp.loading.load_tokenizer`` (``load_model`` does): transformers 5's plain
``AutoTokenizer`` rebuilds the ``qwen2`` checkpoints' one as ``Qwen2Tokenizer``, which gives
wrong ids (``jaxinterp.tokenizer``'s docstring).
"""

from __future__ import annotations

import os
from typing import Sequence

from jaxinterp.tokenizer import build_word_tokenizer, save_tokenizer


def slow(reason: str):
    """A pytest mark: run only with ``JAXINTERP_SLOW=1``. For the secondary cases of a
    guard that costs minutes on a 2-core CPU, where a cheaper case in CI already guards the
    same bug (``reason`` says which), so that CI stays within its 30-minute budget."""
    import pytest

    return pytest.mark.skipif(not os.environ.get("JAXINTERP_SLOW"), reason=f"set JAXINTERP_SLOW=1 to run ({reason})")

def devices_env(n_devices: int) -> dict:
    """This process's environment for a subprocess on ``n_devices`` virtual CPU devices: the
    suite's other ``XLA_FLAGS`` (its LLVM level, tests/conftest.py) kept, the device count
    replaced."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={n_devices}"]))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


NAMES = ["Mary", "John", "Alice", "Bob", "Tom", "Kate", "Anna", "Paul", "Lucy", "Mark", "Emma", "Jack"]
WORDS = ["When", "and", "went", "to", "the", "store", ",", "gave", "a", "drink", "book", "ball",
         "park", "school", "Then", "had", "fun", "at", "."]


def write_ioi_csv(path: str, tokenizer, n: int = 12, seed: int = 0, ragged: bool = False) -> str:
    """``n`` IOI-shaped pairs over :data:`NAMES` for ``tokenizer`` (a word tokenizer over
    :func:`small_vocab`): 15 tokens each with BOS; ``ragged`` alternates two lengths."""
    import numpy as np

    from jaxinterp.data import write_pairs_csv

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b, c = rng.choice(NAMES, 3, replace=False)
        place = "school" if (ragged and i % 2) else "the store"
        rows.append({"clean": f"When {a} and {b} went to {place} , {b} gave a drink to",
                     "corrupted": f"When {a} and {b} went to {place} , {c} gave a drink to",
                     "correct_idx": tokenizer.convert_tokens_to_ids(a),
                     "incorrect_idx": tokenizer.convert_tokens_to_ids(b)})
    return write_pairs_csv(rows, str(path))


def small_vocab() -> list[str]:
    return NAMES + WORDS


def trained_tokenizer(kind: str, corpus: Sequence[str], vocab_size: int, special_tokens: Sequence[str]):
    """A small ``tokenizers.Tokenizer`` trained on ``corpus``: ``"bpe"``, byte-level BPE
    (GPT-2's scheme), or ``"unigram"``, SentencePiece's Metaspace with a Unigram model (its
    unknown token: the first of ``special_tokens``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      special_tokens=list(special_tokens))
    else:
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                          unk_token=special_tokens[0])
    tok.train_from_iterator(list(corpus), trainer)
    return tok


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
    save_tokenizer(tok, path)
    return path


def save_random_causal_lm(path: str, model_type: str, *, seed: int = 0, words: Sequence[str] | None = None,
                          norm_noise: float = 0.1, **config) -> str:
    """Save a random-init ``AutoModelForCausalLM`` of ``model_type`` (any family
    ``transformers`` knows) built from ``config`` plus a word tokenizer to ``path``.

    Norm weights and biases get ``norm_noise`` Gaussian noise, so that their conversion is
    tested (they initialise to constants).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_word_tokenizer(words if words is not None else small_vocab())
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(norm_noise * torch.randn_like(p))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    save_tokenizer(tok, path)
    return path


# Small shapes per family: 2 layers, d_model 32, 4 query heads over 2 key/value heads.
# A larger initializer_range than the default makes attention patterns far from uniform,
# so that positions (rotary) and masks visibly matter in parity tests.
_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.15)


def save_random_llama(path: str, **overrides) -> str:
    """Random ``LlamaForCausalLM`` (GQA 4/2 heads, untied) unless ``overrides`` say otherwise."""
    return save_random_causal_lm(path, "llama", **{**_SMALL, **overrides})


def save_random_mistral(path: str, **overrides) -> str:
    """Random ``MistralForCausalLM`` with a 4-token sliding window."""
    return save_random_causal_lm(path, "mistral", **{**_SMALL, "sliding_window": 4, **overrides})


def save_random_qwen2(path: str, **overrides) -> str:
    """Random ``Qwen2ForCausalLM`` (q/k/v biases; sliding window of 3 in layer 1)."""
    return save_random_causal_lm(path, "qwen2", **{**_SMALL, "use_sliding_window": True, "sliding_window": 3,
                                                   "max_window_layers": 1, **overrides})


def save_random_gemma(path: str, **overrides) -> str:
    """Random ``GemmaForCausalLM`` (head_dim 16 != d_model / heads, tied)."""
    return save_random_causal_lm(path, "gemma", **{**_SMALL, "head_dim": 16, **overrides})


def save_random_gemma2(path: str, **overrides) -> str:
    """Random ``Gemma2ForCausalLM`` with small soft-caps so that capping matters."""
    return save_random_causal_lm(path, "gemma2", **{**_SMALL, "head_dim": 16, "query_pre_attn_scalar": 12,
                                                    "sliding_window": 3, "attn_logit_softcapping": 2.0,
                                                    "final_logit_softcapping": 3.0, **overrides})


def save_random_gpt_neox(path: str, **overrides) -> str:
    """Random ``GPTNeoXForCausalLM`` (Pythia-like: parallel residual, rotary on 1/4 of each head)."""
    small = {k: v for k, v in _SMALL.items() if k != "num_key_value_heads"}
    return save_random_causal_lm(path, "gpt_neox", **{**small, "rotary_pct": 0.25, **overrides})
