"""`evaluate` metric modules that ship with attend-robust, and a loader for them.

Each metric is a folder in the layout of a Hugging Face metric Space (`<name>/<name>.py`,
`README.md`, `app.py`, `requirements.txt`), so it loads offline with `evaluate.load(<folder>)`
and can be uploaded to the Hub unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES: tuple[str, ...] = ("hackattend",)


def metric_path(name: str = "hackattend") -> Path:
    """Return the folder of the bundled metric `name`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}. The bundled metrics are: {', '.join(METRIC_NAMES)}.")
    return METRICS_DIR / name


def load_metric(name: str = "hackattend", **kwargs: Any) -> evaluate.EvaluationModule:
    """Load a bundled metric with `evaluate.load`, without contacting the Hub.

    `kwargs` go to `evaluate.load` (for example `config_name="with_costs"`, `experiment_id`,
    `num_process` and `process_id`).
    """
    # Imported here so that `import attend_robust` stays fast: importing evaluate (and datasets)
    # took about 3 s on a 2-core development machine.
    import evaluate

    return evaluate.load(str(metric_path(name)), **kwargs)


__all__ = ["METRIC_NAMES", "load_metric", "metric_path"]
