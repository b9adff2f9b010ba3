"""One file per Hugging Face ``model_type`` family; importing registers them."""

from . import gemma, gpt2, gpt_neox, llama  # noqa: F401
