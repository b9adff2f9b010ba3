"""Hugging Face checkpoints (config.json + safetensors) and GGUF files to jaxinterp
parameter pytrees.

Installed as ``jaxinterp.conversion``. Each supported ``model_type`` is a small file in
``families/`` that turns the HF config into a :class:`jaxinterp.config.ModelConfig` and
lists, as data, which HF tensor fills which parameter and how. ``gguf.py`` turns a GGUF
file (llama.cpp's format) into HF-named tensors and config fields for the same families.
"""

from .hf import FAMILIES, ConversionError, convert_hf, load_hf_checkpoint, read_hf_config
from .checkpoint import is_converted, load_converted, save_converted
from .gguf import convert_gguf, is_gguf, load_gguf_checkpoint, load_gguf_tokenizer, packaged_gguf

__all__ = ["FAMILIES", "ConversionError", "convert_hf", "load_hf_checkpoint", "read_hf_config",
           "is_converted", "load_converted", "save_converted",
           "convert_gguf", "is_gguf", "load_gguf_checkpoint", "load_gguf_tokenizer", "packaged_gguf"]
