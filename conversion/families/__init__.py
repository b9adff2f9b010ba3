"""One file per Hugging Face ``model_type`` family; importing registers them."""

from . import gemma, gpt2, gpt_neox, llama

__all__ = ["gemma", "gpt2", "gpt_neox", "llama"]
