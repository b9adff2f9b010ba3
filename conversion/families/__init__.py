"""One file per Hugging Face ``model_type`` family; importing registers them."""

from . import gpt2  # noqa: F401
