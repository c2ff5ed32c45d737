"""attend-robust: structural attention masks, the HackAttend attack and S-Attend training."""

from .adapters import SUPPORTED_MODEL_TYPES, ArchitectureAdapter
from .masked_model import SALIENCY_METHODS, AttentionMaskedModel
from .metrics import load_metric

from ._version import __version__

__all__ = [
    "SALIENCY_METHODS",
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureAdapter",
    "AttentionMaskedModel",
    "load_metric",
    "__version__",
]
