"""Hugging Face checkpoints (config.json + safetensors) to jaxinterp parameter pytrees.

Installed as ``jaxinterp.conversion``. Each supported ``model_type`` is a small file in
``families/`` that turns the HF config into a :class:`jaxinterp.config.ModelConfig` and
lists, as data, which HF tensor fills which parameter and how.
"""

from .hf import FAMILIES, ConversionError, convert_hf, load_hf_checkpoint, read_hf_config
from .checkpoint import is_converted, load_converted, save_converted

__all__ = ["FAMILIES", "ConversionError", "convert_hf", "load_hf_checkpoint", "read_hf_config",
           "is_converted", "load_converted", "save_converted"]
