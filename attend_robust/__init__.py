"""attend-robust: structural attention masks, the HackAttend attack and S-Attend training."""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .adapters import SUPPORTED_MODEL_TYPES, ArchitectureAdapter
from .masked_model import SALIENCY_METHODS, AttentionMaskedModel
from .metrics import load_metric

# Imported on first use, because they pull in transformers.Trainer, accelerate and datasets.
_LAZY_EXPORTS = {
    "HackAttendConfig": "attend_robust.hackattend",
    "HackAttendEvaluator": "attend_robust.hackattend",
    "SAttendTrainer": "attend_robust.sattend",
    "SAttendTrainingArguments": "attend_robust.sattend",
    "finetune": "attend_robust.training",
    "load_task_dataset": "attend_robust.data",
    "plot_runs": "attend_robust.plots",
}


def __getattr__(name: str) -> Any:
    module = _LAZY_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'attend_robust' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "SALIENCY_METHODS",
    "SUPPORTED_MODEL_TYPES",
    "ArchitectureAdapter",
    "AttentionMaskedModel",
    "HackAttendConfig",
    "HackAttendEvaluator",
    "SAttendTrainer",
    "SAttendTrainingArguments",
    "__version__",
    "finetune",
    "load_metric",
    "load_task_dataset",
    "plot_runs",
]
