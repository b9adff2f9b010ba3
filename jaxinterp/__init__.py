"""jaxinterp: circuit discovery (EAP, EAP-IG, exact patching) for language models in JAX."""

from .config import ModelConfig
from .graph import Graph, GraphSpec
from .loading import load_model
from .model import Model

__all__ = ["ModelConfig", "Graph", "GraphSpec", "Model", "load_model"]
__version__ = "0.1.0"
