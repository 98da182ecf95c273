"""recursify: turn a pretrained decoder LLM into a (Relaxed) Recursive Transformer and run it fast."""

from recursify.checkpoint import load
from recursify.conversion.convert import convert
from recursify.errors import RecursifyError
from recursify.modeling.model import ModelOutput, RecursiveModel

__version__ = "0.1.0"
__all__ = ["ModelOutput", "RecursiveModel", "RecursifyError", "__version__", "convert", "load"]
